"""attnopt's dynamic-sparse custom ops.

``block_sparse_attention(q, k, v, kv_num, kv_idx, kv_valid, block_m, block_n, causal, scale) -> (out, lse)``
is attention restricted to run-time block lists (:mod:`attnopt.kernels.dynamic.blocks`), the site's causal
rule and key padding; differentiable in q, k, v (the backward runs on the same lists).

``dynamic_attention(q, k, v, attn_mask, causal, scale, mask) -> (out, lse, kv_num, kv_idx)`` estimates the
block lists of the :class:`attnopt.masks.Dynamic` descriptor ``mask`` (its :meth:`~attnopt.masks.Mask.key`)
from q and k, then runs them; the lists come back so the backward reuses the forward's selection. The site's
mask tensor must be causal and/or key padding (recognized at run time), else a ValueError says so.

One implementation per op: the generated Triton kernels for CUDA tensors (:mod:`.triton_impl`; the ``pooled`` and
``antidiagonal`` estimators too, :mod:`.estimate_triton`), the blockwise path and the torch estimators on CPU
(:mod:`.cpu`, :mod:`.estimate`). Each call of ``dynamic_attention`` records its achieved density and the
estimator's share of its time (:func:`last_stats`), which the report reads.
"""

from __future__ import annotations

import time
from typing import Optional

import torch
from torch import Tensor

from attnopt.codegen.spec import CAUSAL_BOTTOM_RIGHT, CAUSAL_NONE
from attnopt.kernels.dynamic import blocks, cpu, estimate_triton, native, triton_impl
from attnopt.kernels.dynamic.estimate import estimate
from attnopt.kernels.dynamic.select import select
from attnopt.kernels.layout import HIDDEN_BELOW, acc_dtype, check_qkv, contiguous, empty
from attnopt.kernels.sparse.structure import recognize
from attnopt.masks import Dynamic, lookup

_NS = "attnopt"
_STATS: dict[str, dict] = {}


def triton_path(q: Tensor) -> bool:
    """Whether the generated Triton kernels run (CUDA tensors; triton is imported at the first load). A function, so
    the interpreter tests can take the Triton path with CPU tensors."""
    return q.is_cuda


def _impl(q: Tensor):
    """The generated Triton kernels for CUDA tensors, else the CPU path."""
    return triton_impl if triton_path(q) else cpu


@torch.library.custom_op(f"{_NS}::block_sparse_attention", mutates_args=())
def block_sparse_attention(q: Tensor, k: Tensor, v: Tensor, kv_num: Tensor, kv_idx: Tensor, kv_valid: Optional[Tensor],
                           block_m: int, block_n: int, causal: int, scale: float) -> tuple[Tensor, Tensor]:  # fmt: skip
    """Returns (out [B, Hq, Sq, Dv], lse [B, Hq, Sq] fp32, fp64 for fp64 inputs)."""
    check_qkv(q, k, v, "block-sparse attention")
    blocks.check(q, k, kv_num, kv_idx, block_m, block_n, kv_valid)
    return contiguous(*_impl(q).forward(q, k, v, kv_num, kv_idx, block_m, block_n, causal, kv_valid, scale))


@block_sparse_attention.register_fake
def _(q, k, v, kv_num, kv_idx, kv_valid, block_m, block_n, causal, scale):
    b, hq, sq, _ = q.shape
    return empty(q, (b, hq, sq, v.shape[-1])), empty(q, (b, hq, sq), acc_dtype(q))


@torch.library.custom_op(f"{_NS}::block_sparse_attention_backward", mutates_args=())
def block_sparse_attention_backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                                    kv_num: Tensor, kv_idx: Tensor, kv_valid: Optional[Tensor], block_m: int,
                                    block_n: int, causal: int, scale: float) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """Returns (dq, dk, dv) on the forward's block lists."""
    return contiguous(*_impl(q).backward(dout, q, k, v, out, lse, kv_num, kv_idx, block_m, block_n, causal, kv_valid,
                                         scale))  # fmt: skip


@block_sparse_attention_backward.register_fake
def _(dout, q, k, v, out, lse, kv_num, kv_idx, kv_valid, block_m, block_n, causal, scale):
    return empty(q), empty(k), empty(v)


def _setup(ctx, inputs, output):
    q, k, v, kv_num, kv_idx, kv_valid, block_m, block_n, causal, scale = inputs
    ctx.save_for_backward(q, k, v, output[0], output[1], kv_num, kv_idx, kv_valid)
    ctx.params = (block_m, block_n, causal, scale)


def _backward(ctx, dout, _dlse):
    q, k, v, out, lse, kv_num, kv_idx, kv_valid = ctx.saved_tensors
    dq, dk, dv = block_sparse_attention_backward(dout.contiguous(), q, k, v, out, lse, kv_num, kv_idx, kv_valid,
                                                 *ctx.params)  # fmt: skip
    return dq, dk, dv, None, None, None, None, None, None, None


block_sparse_attention.register_autograd(_backward, setup_context=_setup)


# --- estimation + block-sparse attention ------------------------------------------------------------------
def site_mask(attn_mask: Optional[Tensor], causal: int, q: Tensor, k: Tensor) -> tuple[int, Optional[Tensor]]:
    """``(causal code, kv_valid or None)`` equal to the site's own mask; ValueError when it is neither causal nor
    key padding (a dynamic selection combines with those only)."""
    if attn_mask is None:
        return causal, None
    b, hq, sq, _ = q.shape
    padding = _key_padding(attn_mask, b, k.shape[2])
    if padding is not None:
        return causal, padding
    found = recognize(attn_mask, causal, b, hq, sq, k.shape[2])
    if found is None:
        dense = bool(attn_mask.all()) if attn_mask.dtype == torch.bool else bool((attn_mask == 0).all())
        if dense:
            return causal, None
        raise ValueError("dynamic sparsity combines with the site's causal mask and key padding only; this site's "
                         "mask tensor is neither (use a static attnopt.masks descriptor, or keep the site exact)")  # fmt: skip
    window, kv_valid = found
    if window.left is None and window.right is None:
        return CAUSAL_NONE, kv_valid
    if window.left is None and window.right == 0:
        return CAUSAL_BOTTOM_RIGHT, kv_valid
    raise ValueError(f"dynamic sparsity does not combine with the site's sliding window {window} yet; keep the site "
                     "exact or use attnopt.Sparse('auto')")  # fmt: skip


def _key_padding(attn_mask: Tensor, b: int, sk: int) -> Optional[Tensor]:
    """bool [B, Sk] when ``attn_mask`` is a key padding mask broadcast over heads and rows ([B or 1, 1, 1, Sk]: bool,
    or 0 / hidden additive), else None."""
    if attn_mask.dim() != 4 or tuple(attn_mask.shape[1:3]) != (1, 1) or attn_mask.shape[3] != sk:
        return None
    row = attn_mask[:, 0, 0]
    if row.dtype != torch.bool:
        if not bool(((row == 0) | (row <= HIDDEN_BELOW)).all()):
            return None
        row = row == 0
    return row.expand(b, sk).contiguous()


def select_blocks(q: Tensor, k: Tensor, mask: Dynamic, causal: int = CAUSAL_NONE, scale: float | None = None):
    """``(kv_num, kv_idx)`` int32: ``mask``'s selection for q and k (no gradient)."""
    sq, sk = q.shape[2], k.shape[2]
    offset = blocks.causal_offset(causal, sq, sk)
    run = estimate_triton.estimate if triton_path(q) else estimate  # Triton kernels or torch, on q's device
    probs = run(mask.estimator, q, k, mask.block_m, mask.block_n, offset, scale, **dict(mask.options))
    if not mask.per_head:
        probs = probs.mean(1, keepdim=True)
    rule = native.select if probs.device.type == "cpu" and native.unavailable() is None else select  # same rule
    return rule(probs, sq, sk, mask.block_m, mask.block_n, offset, top_k=mask.top_k, threshold=mask.threshold,
                sink=mask.sink, local=mask.local)  # fmt: skip


def _record(key: str, kv_num: Tensor, allowed: Tensor, seconds_estimate: float, seconds_total: float) -> None:
    """Density per head = selected blocks / blocks the site's mask allows."""
    per_head = kv_num.double().sum((0, 2)) / (kv_num.shape[0] * allowed.sum().clamp_min(1).double())
    mean, low, high = torch.stack([per_head.mean(), per_head.min(), per_head.max()]).tolist()  # one host sync
    _STATS[key] = {"density_mean": mean, "density_min": low, "density_max": high, "estimate_s": seconds_estimate,
                   "total_s": seconds_total, "estimate_share": seconds_estimate / max(seconds_total, 1e-12)}


def last_stats(mask_key: str) -> dict | None:
    """The last ``dynamic_attention`` call's stats for this mask key in this process, or None."""
    return _STATS.get(mask_key)


@torch.library.custom_op(f"{_NS}::dynamic_attention", mutates_args=())
def dynamic_attention(q: Tensor, k: Tensor, v: Tensor, attn_mask: Optional[Tensor], causal: int, scale: float,
                      mask: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    """Returns (out, lse, kv_num, kv_idx)."""
    check_qkv(q, k, v, "dynamic-sparse attention")
    spec = lookup(mask)
    if not isinstance(spec, Dynamic):
        raise ValueError(f"dynamic_attention takes a Dynamic mask's key; got {spec}")
    t0 = time.perf_counter()
    code, kv_valid = site_mask(attn_mask, causal, q, k)
    num, idx = select_blocks(q, k, spec, code, scale)
    t1 = time.perf_counter()
    out, lse = _impl(q).forward(q, k, v, num, idx, spec.block_m, spec.block_n, code, kv_valid, scale)
    if q.is_cuda:
        torch.cuda.synchronize(q.device)
    allowed = blocks.allowed_blocks(q.shape[2], k.shape[2], spec.block_m, spec.block_n,
                                    blocks.causal_offset(code, q.shape[2], k.shape[2]), q.device)  # fmt: skip
    _record(mask, num, allowed, t1 - t0, time.perf_counter() - t0)
    return contiguous(out, lse, num, idx)


@dynamic_attention.register_fake
def _(q, k, v, attn_mask, causal, scale, mask):
    spec = lookup(mask)
    b, hq, sq, _ = q.shape
    nq, nk = blocks.num_blocks(sq, spec.block_m), blocks.num_blocks(k.shape[2], spec.block_n)
    heads = hq if spec.per_head else 1
    ctx = torch.library.get_ctx()
    length = ctx.new_dynamic_size(min=1, max=max(nk, 1)) if hasattr(ctx, "new_dynamic_size") else nk
    return (empty(q, (b, hq, sq, v.shape[-1])), empty(q, (b, hq, sq), acc_dtype(q)),
            q.new_empty((b, heads, nq), dtype=torch.int32), q.new_empty((b, heads, nq, length), dtype=torch.int32))  # fmt: skip


def _setup_dynamic(ctx, inputs, output):
    q, k, v, attn_mask, causal, scale, mask = inputs
    ctx.save_for_backward(q, k, v, output[0], output[1], output[2], output[3], attn_mask)
    ctx.params = (causal, scale, mask)


def _backward_dynamic(ctx, dout, _dlse, _dnum, _didx):
    q, k, v, out, lse, num, idx, attn_mask = ctx.saved_tensors
    causal, scale, mask = ctx.params
    spec = lookup(mask)
    code, kv_valid = site_mask(attn_mask, causal, q, k)
    dq, dk, dv = block_sparse_attention_backward(dout.contiguous(), q, k, v, out, lse, num, idx, kv_valid,
                                                 spec.block_m, spec.block_n, code, scale)  # fmt: skip
    return dq, dk, dv, None, None, None, None


dynamic_attention.register_autograd(_backward_dynamic, setup_context=_setup_dynamic)
