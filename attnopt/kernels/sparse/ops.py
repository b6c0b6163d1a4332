"""attnopt's sparse custom ops: ``torch.ops.attnopt.sparse_attention`` and ``sparse_attention_auto``.

``sparse_attention(q, k, v, attn_mask, kv_valid, mask, scale, softcap) -> (out, lse)`` is attention
restricted to the mask descriptor ``mask`` (the :meth:`attnopt.masks.Mask.key` string: canonical JSON,
or ``ref:<digest>`` of a mask registered in this process), to the key padding ``kv_valid`` (bool
[B, Sk], optional) and to an optional dense ``attn_mask`` read only on the visited tiles (bool or
additive, broadcasting to [B, Hq, Sq, Sk]). Layout is SDPA's with native GQA.

``sparse_attention_auto(q, k, v, attn_mask, causal, scale, softcap) -> (out, lse)`` is *exact*
attention (``attnopt::attention`` semantics, no dropout) that recognizes, at run time, when the
site's own mask is structured (causal, a sliding window, key padding; see
:mod:`attnopt.kernels.sparse.structure`) and then runs the sparse path; otherwise it runs the exact
op. It never returns a different function: a mask whose structure does not hold takes the exact path.

One implementation per op (device-dispatched inside): the generated Triton kernels for CUDA tensors
they take, else the blockwise PyTorch path (CPU, and the CUDA fallback); plus fake implementations
(shapes only). A mask with a tile shape (``Neighborhood(..., tile=(8, 8))``) runs on tokens reordered
into spatial tiles, the outputs put back in the model's order; a mask with :class:`~attnopt.masks.Strided`
parts runs on keys sorted by residue (:func:`~attnopt.masks.residue_order`; queries keep their order), so
each head visits only its own key tiles. Both ops are differentiable in q, k, v.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from attnopt.kernels import parallel
from attnopt.kernels.layout import acc_dtype, check_qkv, contiguous, empty
from attnopt.kernels.sparse import blockwise, triton_impl
from attnopt.kernels.sparse.structure import recognize
from attnopt.masks import Blocked, Neighborhood, lookup, residue_order

_NS = "attnopt"


def _check(q: Tensor, k: Tensor, v: Tensor, kv_valid: Optional[Tensor]) -> None:
    check_qkv(q, k, v, "sparse attention")
    if kv_valid is not None and (kv_valid.dtype != torch.bool or tuple(kv_valid.shape) != (q.shape[0], k.shape[2])):
        raise ValueError(f"kv_valid must be bool [B, Sk] = {(q.shape[0], k.shape[2])}; got {kv_valid.dtype} "
                         f"{tuple(kv_valid.shape)}")  # fmt: skip


def _impl(q: Tensor, attn_mask: Optional[Tensor]):
    """The implementation module: the Triton kernels for CUDA tensors they take, else the blockwise path."""
    if q.is_cuda and triton_impl.supports(q, attn_mask):
        return triton_impl
    return blockwise


def _tiled(mask) -> bool:
    """Whether the mask asks for its grid tokens reordered into spatial tiles (see ``Neighborhood.tile``; the
    token-grid masks are Neighborhood and Blocked)."""
    return isinstance(mask, (Blocked, Neighborhood)) and mask.tile is not None and mask.order == "row-major"


def _permute(x: Optional[Tensor], perm: Tensor, dims=(2,)) -> Optional[Tensor]:
    """``x`` with ``perm`` applied along ``dims`` (skipping broadcast dims of size 1)."""
    if x is None:
        return None
    for d in dims:
        if x.shape[d] != 1:
            x = x.index_select(d, perm)
    return x


def _rows(x: Optional[Tensor], b: int) -> Optional[Tensor]:
    """Batch row ``b`` of ``x`` (kept when ``x`` broadcasts over the batch)."""
    return x if x is None or x.shape[0] == 1 else x[b:b + 1]


def forward(impl, q, k, v, mask, kv_valid=None, attn_mask=None, scale=None, softcap=0.0):
    """The sparse forward through ``impl`` (:mod:`.triton_impl` or :mod:`.blockwise`): masks that depend on the
    batch row run one row at a time; masks with a tile shape on tile-major tokens, back in row-major order."""
    if mask.batch_dependent(q.shape[0]):
        parts = [forward(impl, q[b:b + 1], k[b:b + 1], v[b:b + 1], mask.at_batch(b), _rows(kv_valid, b),
                         _rows(attn_mask, b), scale, softcap) for b in range(q.shape[0])]  # fmt: skip
        return torch.cat([o for o, _ in parts]), torch.cat([lse for _, lse in parts])
    by_residue = None if _tiled(mask) else residue_order(mask)
    if by_residue is not None:  # keys (not queries) in residue order: the outputs need no reordering
        perm = by_residue.permutation(k.shape[2]).to(q.device)
        return impl.forward(q, _permute(k, perm), _permute(v, perm), by_residue, _permute(kv_valid, perm, (1,)),
                            _permute(attn_mask, perm, (3,)), scale, softcap)  # fmt: skip
    if not _tiled(mask):
        return impl.forward(q, k, v, mask, kv_valid, attn_mask, scale, softcap)
    perm = mask.permutation(k.shape[2]).to(q.device)
    inv = torch.argsort(perm)
    out, lse = impl.forward(_permute(q, perm), _permute(k, perm), _permute(v, perm), mask.tiled(),
                            _permute(kv_valid, perm, (1,)), _permute(attn_mask, perm, (2, 3)), scale, softcap)  # fmt: skip
    return out.index_select(2, inv), lse.index_select(2, inv)


def backward(impl, dout, q, k, v, out, lse, mask, kv_valid=None, attn_mask=None, scale=None, softcap=0.0):
    """``(dq, dk, dv)`` of :func:`forward`, the same way."""
    if mask.batch_dependent(q.shape[0]):
        parts = [backward(impl, *(t[b:b + 1] for t in (dout, q, k, v, out, lse)), mask.at_batch(b), _rows(kv_valid, b),
                          _rows(attn_mask, b), scale, softcap) for b in range(q.shape[0])]  # fmt: skip
        return tuple(torch.cat(g) for g in zip(*parts))
    by_residue = None if _tiled(mask) else residue_order(mask)
    if by_residue is not None:
        perm = by_residue.permutation(k.shape[2]).to(q.device)
        dq, dk, dv = impl.backward(dout, q, _permute(k, perm), _permute(v, perm), out, lse, by_residue,
                                   _permute(kv_valid, perm, (1,)), _permute(attn_mask, perm, (3,)), scale, softcap)  # fmt: skip
        inv = torch.argsort(perm)
        return dq, dk.index_select(2, inv), dv.index_select(2, inv)
    if not _tiled(mask):
        return impl.backward(dout, q, k, v, out, lse, mask, kv_valid, attn_mask, scale, softcap)
    perm = mask.permutation(k.shape[2]).to(q.device)
    inv = torch.argsort(perm)
    p = [_permute(t, perm) for t in (dout, q, k, v, out, lse)]
    dq, dk, dv = impl.backward(*p, mask.tiled(), _permute(kv_valid, perm, (1,)), _permute(attn_mask, perm, (2, 3)),
                               scale, softcap)  # fmt: skip
    return dq.index_select(2, inv), dk.index_select(2, inv), dv.index_select(2, inv)


@torch.library.custom_op(f"{_NS}::sparse_attention", mutates_args=())
def sparse_attention(q: Tensor, k: Tensor, v: Tensor, attn_mask: Optional[Tensor], kv_valid: Optional[Tensor],
                     mask: str, scale: float, softcap: float = 0.0) -> tuple[Tensor, Tensor]:  # fmt: skip
    """Returns (out [B, Hq, Sq, Dv], lse [B, Hq, Sq] fp32, fp64 for fp64 inputs)."""
    _check(q, k, v, kv_valid)
    routed = parallel.route("sparse_attention", q, k, v, attn_mask, kv_valid, mask, scale, softcap)
    if routed is not None:
        return routed
    return contiguous(*forward(_impl(q, attn_mask), q, k, v, lookup(mask), kv_valid, attn_mask, scale, softcap))


@sparse_attention.register_fake
def _(q, k, v, attn_mask, kv_valid, mask, scale, softcap=0.0):
    _check(q, k, v, kv_valid)
    b, hq, sq, _ = q.shape
    return empty(q, (b, hq, sq, v.shape[-1])), empty(q, (b, hq, sq), acc_dtype(q))


@torch.library.custom_op(f"{_NS}::sparse_attention_backward", mutates_args=())
def sparse_attention_backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                              attn_mask: Optional[Tensor], kv_valid: Optional[Tensor], mask: str, scale: float,
                              softcap: float = 0.0) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """Returns (dq, dk, dv)."""
    routed = parallel.route("sparse_attention_backward", dout, q, k, v, out, lse, attn_mask, kv_valid, mask, scale,
                            softcap)  # fmt: skip
    if routed is not None:
        return routed
    return contiguous(*backward(_impl(q, attn_mask), dout, q, k, v, out, lse, lookup(mask), kv_valid, attn_mask, scale,
                                softcap))  # fmt: skip


@sparse_attention_backward.register_fake
def _(dout, q, k, v, out, lse, attn_mask, kv_valid, mask, scale, softcap=0.0):
    return empty(q), empty(k), empty(v)


def _setup(ctx, inputs, output):
    q, k, v, attn_mask, kv_valid, mask, scale, softcap = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, attn_mask, kv_valid)
    ctx.params = (mask, scale, softcap)


def _backward(ctx, dout, _dlse):
    q, k, v, out, lse, attn_mask, kv_valid = ctx.saved_tensors
    mask, scale, softcap = ctx.params
    dq, dk, dv = sparse_attention_backward(dout.contiguous(), q, k, v, out, lse, attn_mask, kv_valid, mask, scale,
                                           softcap)  # fmt: skip
    return dq, dk, dv, None, None, None, None, None


sparse_attention.register_autograd(_backward, setup_context=_setup)


# --- exact-sparse: the site's own mask, recognized at run time ------------------------------------------
def _auto_forward(q, k, v, attn_mask, causal, scale, softcap):
    found = recognize(attn_mask, causal, q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    if found is None:
        out, lse = torch.ops.attnopt.attention.default(q, k, v, attn_mask, 0.0, causal, scale, None, softcap)
        return out, lse
    mask, kv_valid = found
    return torch.ops.attnopt.sparse_attention.default(q, k, v, None, kv_valid, mask.key(), scale, softcap)


@torch.library.custom_op(f"{_NS}::sparse_attention_auto", mutates_args=())
def sparse_attention_auto(q: Tensor, k: Tensor, v: Tensor, attn_mask: Optional[Tensor], causal: int, scale: float,
                          softcap: float = 0.0) -> tuple[Tensor, Tensor]:  # fmt: skip
    """Exact attention; sparse when the mask's structure is recognized. Returns (out, lse)."""
    _check(q, k, v, None)
    routed = parallel.route("sparse_attention_auto", q, k, v, attn_mask, causal, scale, softcap)
    if routed is not None:
        return routed
    with torch.no_grad():
        out, lse = _auto_forward(q, k, v, attn_mask, causal, scale, softcap)
    return contiguous(out, lse.to(acc_dtype(q)))


@sparse_attention_auto.register_fake
def _(q, k, v, attn_mask, causal, scale, softcap=0.0):
    _check(q, k, v, None)
    b, hq, sq, _ = q.shape
    return empty(q, (b, hq, sq, v.shape[-1])), empty(q, (b, hq, sq), acc_dtype(q))


@torch.library.custom_op(f"{_NS}::sparse_attention_auto_backward", mutates_args=())
def sparse_attention_auto_backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                                   attn_mask: Optional[Tensor], causal: int, scale: float,
                                   softcap: float = 0.0) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """(dq, dk, dv): recognizes the mask again (deterministic) and takes the forward's path."""
    routed = parallel.route("sparse_attention_auto_backward", dout, q, k, v, out, lse, attn_mask, causal, scale, softcap)
    if routed is not None:
        return routed
    found = recognize(attn_mask, causal, q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    if found is None:
        dq, dk, dv, _ = torch.ops.attnopt.attention_backward.default(
            dout, q, k, v, out, lse, attn_mask, 0.0, causal, scale, None, False, softcap)
        return contiguous(dq, dk, dv)
    mask, kv_valid = found
    return contiguous(*torch.ops.attnopt.sparse_attention_backward.default(dout, q, k, v, out, lse, None, kv_valid,
                                                                           mask.key(), scale, softcap))  # fmt: skip


@sparse_attention_auto_backward.register_fake
def _(dout, q, k, v, out, lse, attn_mask, causal, scale, softcap=0.0):
    return empty(q), empty(k), empty(v)


def _setup_auto(ctx, inputs, output):
    q, k, v, attn_mask, causal, scale, softcap = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, attn_mask)
    ctx.params = (causal, scale, softcap)


def _backward_auto(ctx, dout, _dlse):
    q, k, v, out, lse, attn_mask = ctx.saved_tensors
    causal, scale, softcap = ctx.params
    dq, dk, dv = sparse_attention_auto_backward(dout.contiguous(), q, k, v, out, lse, attn_mask, causal, scale,
                                                softcap)  # fmt: skip
    return dq, dk, dv, None, None, None, None


sparse_attention_auto.register_autograd(_backward_auto, setup_context=_setup_auto)
