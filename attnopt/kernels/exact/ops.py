"""attnopt's torch custom ops: ``torch.ops.attnopt.attention`` and its backward.

Both ops have a fake implementation (so ``torch.compile`` and ``torch.export`` trace them without
running them), a CPU implementation (:mod:`attnopt.kernels.exact.cpu`: SDPA's CPU flash kernel where it computes
the call exactly, attnopt's blockwise kernel elsewhere; never the ``[Sq, Sk]`` reference) and a CUDA
implementation that launches the Triton kernel generated for the call's spec.

The CUDA forward first asks :mod:`attnopt.kernels.exact.dispatch` whether an SDPA backend runs the
call faster (measured once per shape bucket, cached on disk; ``ATTNOPT_SDPA_DISPATCH=0`` turns this
off) and, if so, takes ``(out, lse)`` from it; the backward is always attnopt's, which recomputes the
probabilities from ``lse``. A mask that is pure right key-padding (see
:mod:`attnopt.kernels.exact.padding`) reaches the kernels as per-row key lengths instead.

Layout is SDPA's: q [B, Hq, Sq, D], k [B, Hkv, Sk, D], v [B, Hkv, Sk, Dv] with Hq % Hkv == 0 (GQA is
native: k and v are never repeated). ``out`` has q's dim order (:func:`empty_out`, as SDPA's own ``out``),
each gradient its input's; ``lse`` is contiguous. ``causal`` is one of the ``CAUSAL_*`` codes of the reference;
``softcap`` > 0 applies ``cap * tanh(s / cap)`` to the scaled scores before the mask (Gemma 2).
Dropout is driven by a 0-d int64 ``seed`` tensor so the backward replays the forward's mask.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from attnopt.kernels import parallel
from attnopt.kernels.exact import cpu, dispatch, reference, triton_impl
from attnopt.kernels.exact.padding import key_padding_lengths
from attnopt.kernels.layout import acc_dtype, check_qkv, empty

_NAMESPACE = "attnopt"


def _check(q: Tensor, k: Tensor, v: Tensor, attn_mask: Optional[Tensor]) -> None:
    check_qkv(q, k, v, "attnopt::attention")
    if attn_mask is not None and attn_mask.dim() > 4:
        raise ValueError(f"attn_mask must broadcast to [B, H, Sq, Sk]; got shape {tuple(attn_mask.shape)}")
    check_mask_dtype(attn_mask)


def check_mask_dtype(attn_mask: Optional[Tensor]) -> None:
    """Refuse a mask that is neither bool nor floating point (as SDPA does): an int 0/1 mask read as additive
    would shift the scores by 0 or 1 and mask nothing."""
    if attn_mask is not None and attn_mask.dtype != torch.bool and not attn_mask.is_floating_point():
        raise ValueError(
            f"attn_mask has dtype {attn_mask.dtype}; attention takes a bool mask (True = attend) or a floating-point "
            "additive mask (0 = attend, -inf = masked), as SDPA does. For a 0/1 keep-mask (a Hugging Face "
            "attention_mask) pass attn_mask.bool(); for additive values pass a float mask"
        )


def _key_padding(q: Tensor, k: Tensor, attn_mask: Optional[Tensor]) -> tuple[Optional[Tensor], Optional[Tensor]]:
    """``(attn_mask, kv_lens)`` for the kernels: ``(None, lengths)`` when the mask is pure right key-padding
    and needs no gradient (exactly equivalent, no [Sq, Sk] reads), else the mask unchanged and None."""
    if attn_mask is None or attn_mask.requires_grad or (q.is_cuda and torch.cuda.is_current_stream_capturing()):
        return attn_mask, None  # the check syncs with the host, which CUDA graph capture forbids
    kv_lens = key_padding_lengths(attn_mask, (q.shape[0], q.shape[1], q.shape[2], k.shape[2]))
    return (attn_mask, None) if kv_lens is None else (None, kv_lens)


@torch.library.custom_op(f"{_NAMESPACE}::attention", mutates_args=())
def attention_fwd(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    attn_mask: Optional[Tensor],
    dropout_p: float,
    causal: int,
    scale: float,
    seed: Optional[Tensor],
    softcap: float = 0.0,
) -> tuple[Tensor, Tensor]:
    """Returns (out [B, Hq, Sq, Dv] in q's layout (:func:`empty_out`), lse [B, Hq, Sq] fp32, fp64 for fp64
    inputs)."""
    _check(q, k, v, attn_mask)
    routed = parallel.route("attention", q, k, v, attn_mask, dropout_p, causal, scale, seed, softcap)
    if routed is not None:
        return _result(q, v, *routed)
    return _result(q, v, *cpu.forward(q, k, v, attn_mask, dropout_p, causal, scale, seed, softcap))


def empty_out(q: Tensor, v: Tensor, device: Optional[str] = None) -> Tensor:
    """An empty ``out`` in the op's output layout (on ``device``, default q's): q's own dim order
    (``torch.empty_like(q)``, as SDPA's kernels allocate it) when Dv == D, else contiguous.

    A model passes q as a transposed [B, S, H, D] view and transposes ``out`` back before its output
    projection; an ``out`` in that same layout makes both transposes free, where a contiguous one cost two
    copies of ``out`` per call.
    """
    if v.shape[-1] == q.shape[-1]:
        return torch.empty_like(q, device=device)
    b, hq, sq, _ = q.shape
    return q.new_empty((b, hq, sq, v.shape[-1]), device=device)


def _result(q: Tensor, v: Tensor, out: Tensor, lse: Tensor) -> tuple[Tensor, Tensor]:
    """``(out, lse)`` in the layout the fake promises: ``out`` as :func:`empty_out` (copied only when an
    implementation wrote another layout: the layout is checked on a meta tensor, allocating nothing), ``lse``
    contiguous."""
    if out.stride() != empty_out(q, v, "meta").stride():
        out = empty_out(q, v).copy_(out)
    return out, lse.contiguous()


@attention_fwd.register_fake
def _(q, k, v, attn_mask, dropout_p, causal, scale, seed, softcap=0.0):
    _check(q, k, v, attn_mask)
    b, hq, sq, _ = q.shape
    return empty_out(q, v), empty(q, (b, hq, sq), acc_dtype(q))


@attention_fwd.register_kernel("cuda")
def _(q, k, v, attn_mask, dropout_p, causal, scale, seed, softcap=0.0):
    _check(q, k, v, attn_mask)
    routed = parallel.route("attention", q, k, v, attn_mask, dropout_p, causal, scale, seed, softcap)
    if routed is not None:
        return _result(q, v, *routed)
    if q.dtype == torch.float64:
        # The generated kernels take fp16, bf16 and fp32; fp64 runs the reference on the GPU.
        return _result(q, v, *reference.attention_forward(q, k, v, attn_mask, dropout_p, causal, scale, seed, softcap))
    decision = dispatch.choose(q, k, v, attn_mask, causal, scale, dropout_p, softcap)
    if decision.backend in dispatch.SDPA_BACKENDS:
        try:
            return _result(q, v, *dispatch.sdpa_forward(decision.backend, q, k, v, attn_mask, causal, scale))
        except RuntimeError:
            pass  # a shape of the bucket this backend refuses (alignment, head dim): attnopt's kernel runs it
    attn_mask, kv_lens = _key_padding(q, k, attn_mask)
    # Dropout draws its mask with the kernels' Philox generator: a different mask than the CPU reference's for
    # the same seed, replayed exactly by the CUDA backward.
    return _result(q, v, *triton_impl.forward(q, k, v, attn_mask, causal, scale, softcap=softcap, dropout_p=dropout_p,
                                              seed=seed, kv_lens=kv_lens))


@torch.library.custom_op(f"{_NAMESPACE}::attention_backward", mutates_args=())
def attention_bwd(
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    attn_mask: Optional[Tensor],
    dropout_p: float,
    causal: int,
    scale: float,
    seed: Optional[Tensor],
    mask_grad: bool,
    softcap: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Returns (dq, dk, dv, dmask); dmask is an empty tensor unless ``mask_grad``."""
    routed = parallel.route("attention_backward", dout, q, k, v, out, lse, attn_mask, dropout_p, causal, scale, seed,
                            mask_grad, softcap)  # fmt: skip
    if routed is not None:
        return _grads(q, k, v, *routed)
    dq, dk, dv, dmask = cpu.backward(dout, q, k, v, out, lse, attn_mask, dropout_p, causal, scale, seed, mask_grad,
                                     softcap)
    return _grads(q, k, v, dq, dk, dv, dmask)


def _grads(q, k, v, dq, dk, dv, dmask) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The backward's results in the layout its fake promises: each gradient in its input's layout
    (``torch.empty_like``: SDPA's CPU backward writes [B, S, H, D]-ordered gradients, which a model's transposed
    q, k, v views take without a copy), ``dmask`` contiguous (an empty tensor for none)."""
    grads = []
    for g, x in ((dq, q), (dk, k), (dv, v)):
        grads.append(g if g.stride() == torch.empty_like(x, device="meta").stride() else torch.empty_like(x).copy_(g))
    return (*grads, dmask.contiguous() if dmask is not None else q.new_empty(0))


@attention_bwd.register_kernel("cuda")
def _(dout, q, k, v, out, lse, attn_mask, dropout_p, causal, scale, seed, mask_grad, softcap=0.0):
    routed = parallel.route("attention_backward", dout, q, k, v, out, lse, attn_mask, dropout_p, causal, scale, seed,
                            mask_grad, softcap)  # fmt: skip
    if routed is not None:
        return _grads(q, k, v, *routed)
    dout = dout.contiguous()  # the CUDA kernels read rows of a contiguous dout (the CPU ones take its strides)
    if q.dtype == torch.float64:
        dq, dk, dv, dmask = reference.attention_backward(
            dout, q, k, v, out, lse, attn_mask, dropout_p, causal, scale, seed, mask_grad, softcap
        )
        return _grads(q, k, v, dq, dk, dv, dmask)
    kv_lens = None
    if not mask_grad:
        attn_mask, kv_lens = _key_padding(q, k, attn_mask)
    g = triton_impl.backward(dout, q, k, v, out, lse, attn_mask, causal, scale, softcap=softcap, dropout_p=dropout_p,
                             seed=seed, mask_grad=mask_grad, kv_lens=kv_lens)
    return _grads(q, k, v, g.dq, g.dk, g.dv, g.dmask)


@attention_bwd.register_fake
def _(dout, q, k, v, out, lse, attn_mask, dropout_p, causal, scale, seed, mask_grad, softcap=0.0):
    dmask = empty(attn_mask) if mask_grad else q.new_empty(0)
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), dmask


def _setup_context(ctx, inputs, output):
    q, k, v, attn_mask, dropout_p, causal, scale, seed, softcap = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, attn_mask, seed)
    ctx.params = (dropout_p, causal, scale, softcap)
    ctx.mask_grad = attn_mask is not None and attn_mask.is_floating_point() and attn_mask.requires_grad


def _backward(ctx, dout, _dlse):
    q, k, v, out, lse, attn_mask, seed = ctx.saved_tensors
    dropout_p, causal, scale, softcap = ctx.params
    dq, dk, dv, dmask = attention_bwd(
        dout, q, k, v, out, lse, attn_mask, dropout_p, causal, scale, seed, ctx.mask_grad, softcap
    )
    return dq, dk, dv, dmask if ctx.mask_grad else None, None, None, None, None, None


attention_fwd.register_autograd(_backward, setup_context=_setup_context)


def new_seed() -> Tensor:
    """A fresh dropout seed (0-d int64, CPU) drawn from torch's default generator, so ``torch.manual_seed`` applies."""
    return torch.randint(0, 2**62, (), dtype=torch.int64, device="cpu")
