"""Exact attention through the generated Triton kernels: validation, spec choice and launch.

:func:`forward` and :func:`backward` are the CUDA implementation behind ``torch.ops.attnopt.attention``
and its backward, and match ``reference.attention_forward`` / ``reference.attention_backward``:
``out`` in q's dtype, ``lse`` fp32 natural-log, fully masked rows give zeros and ``-inf`` (and zero
gradients). q, k, v and every per-element tensor are read through their strides (no copies, k and
v never repeated for GQA, broadcast dims read with stride 0).

Beyond the op's surface the launchers take the score features the kernels implement:

* ``bias``: an additive score tensor broadcastable to ``[B, Hq, Sq, Sk]`` (T5/Swin position bias
  already gathered), with its gradient on request;
* ``alibi_slopes``: ``[Hq]`` or ``[B, Hq]``, bias ``-slope_h * |j - i - (Sk - Sq)|`` computed in the
  kernel (the FlashAttention-2 convention; for causal attention it equals Bloom's ``slope_h * j`` up
  to a per-row constant, which the softmax cancels: same output, different ``lse``);
* ``rel_table`` ``[num_buckets, Hq]`` with ``rel_buckets`` ``[Sq + Sk - 1]`` (integers): bias
  ``rel_table[rel_buckets[j - i + Sq - 1], h]`` gathered in the kernel (T5's relative attention bias:
  ``rel_buckets = bucket_fn(arange(-(Sq - 1), Sk))``), with the table's gradient on request;
* ``kv_lens`` ``[B]`` (integers): keys ``j >= kv_lens[b]`` are masked for batch row ``b`` (right
  padding, the BERT/Hugging Face case) without any ``[Sq, Sk]`` mask; causal alignment still uses Sk;
* ``score_mod`` (a :class:`~attnopt.codegen.score_expr.ScoreExpr`) with ``mod_buffers`` (the tensors it
  captured, in its buffer order): each scaled score passes through the expression, compiled into the kernels
  with its derivative for the backward (:mod:`attnopt.kernels.exact.score_mod`); not with softcap or a bias.

At most one of ``bias``, ``alibi_slopes`` and ``rel_table`` per call; each combines with a mask,
causality, key padding, softcap and dropout.

Dropout uses Triton's in-kernel Philox generator (see :mod:`attnopt.kernels.exact.render_common`): the keep-mask
is a pure function of ``(seed, philox_offset)`` and the element's index, the same in the forward and
the backward, and :func:`dropout_mask` materializes it for tests. It is *not* the reference's mask
(``torch.Generator`` + ``torch.rand``): the CPU (reference) and CUDA (kernel) paths of the op draw
different masks for one seed, each consistent between its forward and backward.

Triton is imported only when the first kernel is loaded.
"""

from __future__ import annotations

import contextvars
import math
from dataclasses import dataclass, replace
from typing import Callable, NamedTuple

import torch

from attnopt.codegen import tuning
from attnopt.codegen.score_expr import ScoreExpr
from attnopt.codegen.score_triton import buffer_pointer, buffer_strides
from attnopt.codegen.spec import (
    CAUSAL_MODES,
    MAX_BATCH_HEADS,
    MAX_GROUP,
    MAX_HEAD_DIM,
    KernelSpec,
    default_tiles,
    dtype_name,
    mask_kind,
)
from attnopt.kernels.exact.render import load_kernel
from attnopt.kernels.layout import check_qkv
from attnopt.kernels.exact.render_common import normalizes_rows


class Grads(NamedTuple):
    """The gradients :func:`backward` returns; the optional ones are None unless requested."""

    dq: torch.Tensor
    dk: torch.Tensor
    dv: torch.Tensor
    dmask: torch.Tensor | None = None
    dbias: torch.Tensor | None = None
    drel_table: torch.Tensor | None = None


@dataclass
class _Call:
    """The validated inputs of one call: tensors as strided views, features as spec fields."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    causal: int
    scale: float
    mask: torch.Tensor | None  # [B, Hq, Sq, Sk] view; bool masks viewed as uint8
    mask_kind: str
    bias: torch.Tensor | None  # [B, Hq, Sq, Sk] view
    slopes: torch.Tensor | None  # [B, Hq] fp32 view
    rel_table: torch.Tensor | None  # [num_buckets, Hq]
    rel_buckets: torch.Tensor | None  # [Sq + Sk - 1] int32
    kv_lens: torch.Tensor | None  # [B] int32
    softcap: float
    dropout_p: float
    seed: int
    philox_offset: int
    score_mod: ScoreExpr | None = None
    mod_buffers: tuple = ()

    @property
    def shape(self) -> tuple[int, int, int, int, int]:
        """``(B, Hq, Hkv, Sq, Sk)``."""
        return self.q.shape[0], self.q.shape[1], self.k.shape[1], self.q.shape[2], self.k.shape[2]

    @property
    def bias_kind(self) -> str:
        if self.bias is not None:
            return "tensor"
        if self.slopes is not None:
            return "alibi"
        return "relpos" if self.rel_table is not None else "none"

    def spec(self, direction: str, write_ds: bool = False) -> KernelSpec:
        """The spec of this call's ``direction`` kernel."""
        dtype, d, dv = dtype_name(self.q.dtype), self.q.shape[3], self.v.shape[3]
        strided_kv = direction == "fwd" and not (_descriptor_ok(self.k) and _descriptor_ok(self.v))
        return KernelSpec(
            direction=direction, head_dim=d, head_dim_v=dv, dtype=dtype, causal=self.causal, mask=self.mask_kind,
            bias=self.bias_kind, key_padding=self.kv_lens is not None, softcap=self.softcap > 0.0,
            dropout=self.dropout_p > 0.0, group=self.q.shape[1] // self.k.shape[1], write_ds=write_ds,
            strided_kv=strided_kv, score_mod=self.score_mod.text() if self.score_mod is not None else "",
            **default_tiles(direction, dtype, d, dv),
        )

    def feature_args(self) -> dict:
        """The kernel arguments of the features and the shared scalars."""
        b, hq, _, sq, sk = self.shape
        args = dict(num_heads=hq, seq_q=sq, seq_k=sk, scale=self.scale)
        for name, t in (("mask", self.mask), ("bias", self.bias)):
            if t is not None:
                args[name.capitalize()] = t
                args.update({f"stride_{name}_{d}": t.stride(i) for i, d in enumerate("bhmn")})
        if self.slopes is not None:
            args.update(Slopes=self.slopes, stride_slopes_b=self.slopes.stride(0),
                        stride_slopes_h=self.slopes.stride(1))
        if self.rel_table is not None:
            args.update(RelTable=self.rel_table, RelBucket=self.rel_buckets,
                        stride_rel_n=self.rel_table.stride(0), stride_rel_h=self.rel_table.stride(1))
        if self.kv_lens is not None:
            args["KvLen"] = self.kv_lens
        if self.softcap > 0.0:
            args["softcap"] = self.softcap
        if self.dropout_p > 0.0:
            args.update(dropout_p=self.dropout_p, seed=self.seed, philox_offset=self.philox_offset)
        if self.score_mod is not None:
            for buf, t in zip(self.score_mod.buffers, self.mod_buffers):
                args[buffer_pointer(buf)] = t
                args.update(dict(zip(buffer_strides(buf), t.stride())))
        return args


def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None = None,
            causal: int = 0, scale: float | None = None, *, softcap: float = 0.0, dropout_p: float = 0.0,
            seed: int | torch.Tensor | None = None, philox_offset: int = 0, bias: torch.Tensor | None = None,
            alibi_slopes: torch.Tensor | None = None, rel_table: torch.Tensor | None = None,
            rel_buckets: torch.Tensor | None = None, kv_lens: torch.Tensor | None = None,
            score_mod: ScoreExpr | None = None, mod_buffers=()) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns ``(out [B, Hq, Sq, Dv] in q.dtype, lse [B, Hq, Sq] fp32 contiguous)``; see the module docstring.

    ``scale`` defaults to ``1 / sqrt(D)``. Raises ValueError for inputs the kernel does not take.
    """
    call = _prepare(q, k, v, attn_mask, causal, scale, softcap, dropout_p, seed, philox_offset, bias,
                    alibi_slopes, rel_table, rel_buckets, kv_lens)
    call = _with_score_mod(call, score_mod, mod_buffers)
    b, hq, _, sq, _ = call.shape
    out = torch.empty((b, hq, sq, v.shape[3]), dtype=q.dtype, device=q.device)
    lse = torch.empty((b, hq, sq), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse
    if call.scale < 0.0 and score_mod is None:
        # The forward takes the row maximum of the raw q·k and scales it (render_fwd.folds_scale), which
        # needs scale >= 0: scale * q·k = (-scale) * q·(-k). A copy of k, only for a negative scale.
        k = k.neg()
        call = replace(call, k=k, scale=-call.scale)
    args = dict(Q=q, K=k, V=v, Out=out, Lse=lse, **_strides(q=q, k=k, v=v, o=out), **call.feature_args())
    _run(call, call.spec("fwd"), lambda s: (-(-sq // s.block_m), b * hq), args)
    return out, lse


def backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
             lse: torch.Tensor, attn_mask: torch.Tensor | None = None, causal: int = 0, scale: float | None = None,
             *, softcap: float = 0.0, dropout_p: float = 0.0, seed: int | torch.Tensor | None = None,
             philox_offset: int = 0, bias: torch.Tensor | None = None, alibi_slopes: torch.Tensor | None = None,
             rel_table: torch.Tensor | None = None, rel_buckets: torch.Tensor | None = None,
             kv_lens: torch.Tensor | None = None, mask_grad: bool = False, bias_grad: bool = False,
             rel_grad: bool = False, score_mod: ScoreExpr | None = None, mod_buffers=()) -> Grads:
    """Gradients of :func:`forward` given ``dout`` and the forward's ``out`` and ``lse``.

    ``mask_grad`` (additive masks), ``bias_grad`` and ``rel_grad`` ask for the gradients of the
    additive mask, the bias tensor (each reduced to its own broadcast shape) and the relative
    position table. They need the score gradient ``dS``, which the dQ kernel then stores in a
    ``[B, Hq, Sq, Sk]`` fp32 buffer: O(S²) memory, only on request.
    """
    call = _prepare(q, k, v, attn_mask, causal, scale, softcap, dropout_p, seed, philox_offset, bias,
                    alibi_slopes, rel_table, rel_buckets, kv_lens)
    call = _with_score_mod(call, score_mod, mod_buffers)
    b, hq, hkv, sq, sk = call.shape
    if mask_grad and call.mask_kind != "additive":
        raise ValueError("mask_grad needs an additive (floating point) attn_mask")
    if bias_grad and call.bias is None:
        raise ValueError("bias_grad needs a bias tensor")
    if rel_grad and call.rel_table is None:
        raise ValueError("rel_grad needs rel_table")
    if dout.shape != out.shape or out.shape != (b, hq, sq, v.shape[3]):
        raise ValueError(f"dout {tuple(dout.shape)} and out {tuple(out.shape)} must be {(b, hq, sq, v.shape[3])}")
    if lse.shape != (b, hq, sq):
        raise ValueError(f"lse must be [B, Hq, Sq] = {(b, hq, sq)}; got {tuple(lse.shape)}")
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    write_ds = mask_grad or bias_grad or rel_grad
    ds = torch.zeros((b, hq, sq, sk), dtype=torch.float32, device=q.device) if write_ds else None
    if b * hq * sq == 0 or sk == 0:
        dq.zero_(), dk.zero_(), dv.zero_()
    else:
        lse = lse.to(torch.float32).contiguous()
        delta = torch.empty((b, hq, sq), dtype=torch.float32, device=q.device)
        lse2 = torch.empty_like(delta)
        # bwd_pre depends only on the value head dim and the dtype; its other fields are fixed.
        dtype, dv_dim = dtype_name(q.dtype), v.shape[3]
        pre = KernelSpec(direction="bwd_pre", head_dim=dv_dim, head_dim_v=dv_dim, dtype=dtype, causal=0, mask="none",
                         **default_tiles("bwd_pre", dtype, dv_dim, dv_dim))
        _run(call, pre, lambda s: (-(-sq // s.block_m), b * hq),
             dict(Out=out, DOut=dout, Lse=lse, Delta=delta, Lse2=lse2, **_strides(o=out, do=dout), num_heads=hq,
                  seq_q=sq), tune=False)
        common = dict(Q=q, K=k, V=v, DOut=dout, Lse2=lse2, Delta=delta, **call.feature_args())
        dq_spec = call.spec("bwd_dq", write_ds=write_ds)
        if normalizes_rows(dq_spec):  # bwd_dq stores 1 / Σ_j P_ij per row, bwd_dkdv reads it (see kernels.exact.render_bwd)
            common["RowScale"] = torch.empty((b, hq, sq), dtype=torch.float32, device=q.device)
        args = dict(common, DQ=dq, **_strides(q=q, k=k, v=v, do=dout, dq=dq))
        if write_ds:
            args["DS"] = ds
        _run(call, dq_spec, lambda s: (-(-sq // s.block_m), b * hq), args)
        if write_ds and "RowScale" in common:
            ds.mul_(common["RowScale"][..., None])  # dS is linear in P, stored before the row scale
        _run(call, call.spec("bwd_dkdv"), lambda s: (-(-sk // s.block_n), b * hkv),
             dict(common, DK=dk, DV=dv, **_strides(q=q, k=k, v=v, do=dout, dk=dk, dv=dv)))
    dmask = _sum_to(ds, attn_mask.shape).to(attn_mask.dtype) if mask_grad else None
    dbias = _sum_to(ds, bias.shape).to(bias.dtype) if bias_grad else None
    drel = _rel_table_grad(ds, call.rel_buckets, rel_table) if rel_grad else None
    return Grads(dq, dk, dv, dmask, dbias, drel)


def dropout_mask(shape: tuple[int, int, int, int], dropout_p: float, seed: int | torch.Tensor, philox_offset: int = 0,
                 device: torch.device | str = "cpu") -> torch.Tensor:
    """The boolean keep-mask ``[B, Hq, Sq, Sk]`` the kernels draw for ``(dropout_p, seed, philox_offset)``.

    For tests and debugging: it runs the same Philox draw as the attention kernels, element by element.
    """
    from attnopt.kernels.exact.dropout import keep_mask  # imports triton (its module defines a @triton.jit kernel)

    return keep_mask(shape, float(dropout_p), _seed_int(seed), int(philox_offset), torch.device(device))


def relative_buckets(seq_q: int, seq_k: int, bucket_fn, device=None) -> torch.Tensor:
    """``rel_buckets`` for a bucket function of the relative position ``j - i`` (T5's
    ``_relative_position_bucket``): ``bucket_fn(arange(-(Sq - 1), Sk))``, int32."""
    rel = torch.arange(-(seq_q - 1), seq_k, device=device)
    return bucket_fn(rel).to(torch.int32)


def _run(call: _Call, spec: KernelSpec, grid: Callable[[KernelSpec], tuple[int, int]], args: dict,
         tune: bool = True) -> None:
    """Launches ``spec``'s kernel, its tiles chosen by :func:`attnopt.codegen.tuning.select` on a GPU.

    ``grid`` maps a spec to its launch grid (it depends on the tiles); when the tuner times
    candidates it launches each on these same arguments (the outputs are rewritten by the final launch).
    """
    device = call.q.device
    if device.type == "cuda":

        def launch(candidate: KernelSpec) -> None:
            _launch(candidate, grid(candidate), args, device)

        _, _, _, sq, sk = call.shape
        gpu = tuning.cuda_device(device.index if device.index is not None else 0)
        spec = tuning.select(spec, sq, sk, gpu, run=launch if tune else None)
        while True:
            try:
                return launch(spec)
            except Exception as exc:
                next_spec = tuning.fallback(spec, gpu) if tuning.is_config_error(exc) else None
                if next_spec is None:
                    raise
                spec = next_spec
    _launch(spec, grid(spec), args, device)


def _launch(spec: KernelSpec, grid: tuple[int, int], args: dict, device: torch.device) -> None:
    if grid[0] == 0 or grid[1] == 0:
        return
    kernel = load_kernel(spec)
    if device.type != "cuda":
        kernel[grid](**args, num_warps=spec.num_warps, num_stages=spec.num_stages)
        return

    def launch() -> None:
        import triton

        # A kernel that builds tensor descriptors on the device needs Triton's global scratch allocator
        # (a context variable: set in a copy of the context, so the caller's allocator is untouched).
        triton.set_allocator(_scratch)
        with torch.cuda.device(device):
            kernel[grid](**args, num_warps=spec.num_warps, num_stages=spec.num_stages)

    contextvars.copy_context().run(launch)


def _scratch(size: int, alignment: int, stream: int | None) -> torch.Tensor:
    """Triton's global scratch memory (tensor descriptors built in the kernel), on the current device."""
    return torch.empty(size, dtype=torch.int8, device="cuda")


def _descriptor_ok(t: torch.Tensor) -> bool:
    """Whether a tensor descriptor (TMA) can read ``t`` [B, H, S, D]: a unit head-dim stride, a 16-byte
    aligned start and 16-byte multiples for the other strides (so every (b, h) base and row is aligned)."""
    size = t.element_size()
    return (t.stride(3) == 1 and t.data_ptr() % 16 == 0
            and all(stride * size % 16 == 0 for stride in t.stride()[:3]))


def _strides(**tensors: torch.Tensor) -> dict:
    """``stride_<name><dim>`` for 4-D tensors: dims b, h, then m (queries) or n (keys), then d."""
    key_side = {"k", "v", "dk", "dv"}
    args = {}
    for name, t in tensors.items():
        dims = "bhnd" if name in key_side else "bhmd"
        args.update({f"stride_{name}{d}": t.stride(i) for i, d in enumerate(dims)})
    return args


def _seed_int(seed) -> int:
    if isinstance(seed, torch.Tensor):
        if seed.numel() != 1 or seed.is_floating_point():
            raise ValueError(f"seed must be an int or a one-element integer tensor; got {seed}")
        return int(seed.item())
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an int or a one-element integer tensor; got {seed!r}")
    return seed


def _prepare(q, k, v, attn_mask, causal, scale, softcap, dropout_p, seed, philox_offset, bias, alibi_slopes,
             rel_table, rel_buckets, kv_lens) -> _Call:
    """Validates a call (ValueError for anything the kernels do not take) and views its tensors for them."""
    check_qkv(q, k, v, "attention")
    dtype_name(q.dtype)
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v must share one dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.device != q.device or v.device != q.device:
        raise ValueError(f"q, k, v must be on one device; got {q.device}, {k.device}, {v.device}")
    b, hq, sq, d = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    if hq // hkv > MAX_GROUP:
        raise ValueError(f"at most {MAX_GROUP} query heads per key/value head; got {hq // hkv}")
    for name, dim in (("q/k", d), ("v", v.shape[3])):
        if not 1 <= dim <= MAX_HEAD_DIM:
            raise ValueError(f"{name} head dim must be in 1..{MAX_HEAD_DIM}; got {dim}")
    if causal not in CAUSAL_MODES or isinstance(causal, bool):
        raise ValueError(f"causal must be one of {CAUSAL_MODES} (none, top-left, bottom-right); got {causal!r}")
    if b * hq > MAX_BATCH_HEADS:
        raise ValueError(f"batch * query heads must be at most {MAX_BATCH_HEADS}; got {b * hq}")
    if softcap < 0.0 or not math.isfinite(softcap):
        raise ValueError(f"softcap must be >= 0 (0 = off); got {softcap}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1); got {dropout_p}")
    if dropout_p > 0.0 and seed is None:
        raise ValueError("attention with dropout_p > 0 needs a seed so that backward can replay the mask")
    if sum(x is not None for x in (bias, alibi_slopes, rel_table)) > 1:
        raise ValueError("pass at most one of bias, alibi_slopes and rel_table")
    if (rel_table is None) != (rel_buckets is None):
        raise ValueError("rel_table and rel_buckets go together")
    scores = (b, hq, sq, sk)
    kind = mask_kind(attn_mask)
    mask = _score_view("attn_mask", attn_mask, scores, q.device)
    return _Call(
        q=q, k=k, v=v, causal=int(causal),
        scale=1.0 / math.sqrt(d) if scale is None else float(scale),
        mask=mask.view(torch.uint8) if kind == "bool" else mask, mask_kind=kind,
        bias=_score_view("bias", bias, scores, q.device),
        slopes=_slopes(alibi_slopes, b, hq, q.device),
        rel_table=_rel_table(rel_table, hq, q.device),
        rel_buckets=_rel_buckets(rel_buckets, rel_table, sq, sk, q.device),
        kv_lens=_kv_lens(kv_lens, b, q.device),
        softcap=float(softcap), dropout_p=float(dropout_p),
        seed=_seed_int(seed) if dropout_p > 0.0 else 0, philox_offset=int(philox_offset),
    )


def _with_score_mod(call: _Call, expr: ScoreExpr | None, buffers) -> _Call:
    """``call`` with a score_mod and its captured tensors, checked against the expression's buffers."""
    if expr is None:
        if buffers:
            raise ValueError("mod_buffers without a score_mod")
        return call
    if call.softcap > 0.0 or call.bias_kind != "none":
        raise ValueError("a score_mod takes no softcap or bias: write them into the score_mod")
    buffers = tuple(buffers)
    if len(buffers) != len(expr.buffers):
        raise ValueError(f"the score_mod reads {len(expr.buffers)} captured tensors; got {len(buffers)} mod_buffers")
    for buf, t in zip(expr.buffers, buffers):
        if t.device != call.q.device or str(t.dtype).replace("torch.", "") != buf.dtype or t.dim() != buf.ndim:
            raise ValueError(f"mod_buffers {buf.name} must be {buf.dtype} with {buf.ndim} dims on {call.q.device} "
                             f"(as traced); got {t.dtype} {tuple(t.shape)} on {t.device}")
    return replace(call, score_mod=expr, mod_buffers=buffers)


def _score_view(name: str, t: torch.Tensor | None, target: tuple, device) -> torch.Tensor | None:
    if t is None:
        return None
    if name == "bias" and not t.is_floating_point():
        raise ValueError(f"bias must be floating point; got {t.dtype}")
    if t.device != device:
        raise ValueError(f"{name} must be on {device}; got {t.device}")
    try:
        return t.expand(target)
    except RuntimeError as e:
        raise ValueError(f"{name} of shape {tuple(t.shape)} does not broadcast to {target}") from e


def _slopes(slopes: torch.Tensor | None, b: int, hq: int, device) -> torch.Tensor | None:
    if slopes is None:
        return None
    if slopes.device != device or not slopes.is_floating_point() or slopes.shape not in ((hq,), (b, hq)):
        raise ValueError(f"alibi_slopes must be floating point [{hq}] or [{b}, {hq}] on {device}; "
                         f"got {slopes.dtype} {tuple(slopes.shape)} on {slopes.device}")
    return slopes.to(torch.float32).expand(b, hq)


def _rel_table(table: torch.Tensor | None, hq: int, device) -> torch.Tensor | None:
    if table is None:
        return None
    if table.device != device or not table.is_floating_point() or table.dim() != 2 or table.shape[1] != hq:
        raise ValueError(f"rel_table must be floating point [num_buckets, {hq}] on {device}; "
                         f"got {table.dtype} {tuple(table.shape)} on {table.device}")
    return table


def _rel_buckets(buckets: torch.Tensor | None, table: torch.Tensor | None, sq: int, sk: int,
                 device) -> torch.Tensor | None:
    if buckets is None:
        return None
    n = max(sq + sk - 1, 0)
    if buckets.device != device or buckets.is_floating_point() or buckets.shape != (n,):
        raise ValueError(f"rel_buckets must be integer [Sq + Sk - 1 = {n}] on {device}; "
                         f"got {buckets.dtype} {tuple(buckets.shape)} on {buckets.device}")
    if n and (int(buckets.min()) < 0 or int(buckets.max()) >= table.shape[0]):
        raise ValueError(f"rel_buckets must index rel_table's {table.shape[0]} buckets")
    return buckets.to(torch.int32).contiguous()


def _kv_lens(kv_lens: torch.Tensor | None, b: int, device) -> torch.Tensor | None:
    if kv_lens is None:
        return None
    if kv_lens.device != device or kv_lens.is_floating_point() or kv_lens.shape != (b,):
        raise ValueError(f"kv_lens must be integer [{b}] on {device}; got {kv_lens.dtype} {tuple(kv_lens.shape)}")
    return kv_lens.to(torch.int32).contiguous()


def _sum_to(t: torch.Tensor, shape) -> torch.Tensor:
    """Sums ``t`` over the dimensions along which a tensor of ``shape`` was broadcast to ``t.shape``."""
    lead = t.dim() - len(shape)
    t = t.sum(dim=tuple(range(lead))) if lead else t
    dims = tuple(i for i, n in enumerate(shape) if n == 1 and t.shape[i] != 1)
    return t.sum(dim=dims, keepdim=True) if dims else t


def _rel_table_grad(ds: torch.Tensor, buckets: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """``d table[n, h] = Σ_{b, i, j : bucket[j - i + Sq - 1] = n} dS[b, h, i, j]``."""
    _, hq, sq, sk = ds.shape
    rel = torch.arange(sk, device=ds.device)[None, :] - torch.arange(sq, device=ds.device)[:, None] + sq - 1
    index = buckets.long()[rel].reshape(-1)  # [Sq * Sk] bucket of each (i, j)
    per_pos = ds.sum(dim=0).permute(1, 2, 0).reshape(-1, hq)  # [Sq * Sk, Hq]
    grad = torch.zeros(table.shape, dtype=torch.float32, device=ds.device)
    return grad.index_add_(0, index, per_pos).to(table.dtype)
