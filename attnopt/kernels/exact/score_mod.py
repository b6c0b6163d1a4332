"""Exact attention with a FlexAttention-style ``score_mod``, compiled into attnopt's kernels.

:func:`attention` traces ``score_mod(score, b, h, q_idx, kv_idx)`` once per function
(:mod:`attnopt.kernels.exact.score_trace`) into an expression whose canonical text names the kernels
(:attr:`attnopt.codegen.spec.KernelSpec.score_mod`), then runs ``torch.ops.attnopt.score_mod_attention``:

* on CUDA, the generated Triton kernels with the expression (and, in the backward, its derivative) compiled
  into the scoring (:mod:`attnopt.kernels.exact.render_score_mod`), the captured tensors read in the kernel;
* elsewhere, and for the backward of captured tensors that need a gradient (learned bias tables), the
  blockwise torch path (:mod:`attnopt.kernels.exact.score_mod_cpu`).

Neither builds an ``[Sq, Sk]`` tensor. The op takes the expression's text and the captured tensors, so
``torch.compile`` and ``torch.export`` see one custom op with a fake implementation. Under ``torch.compile``
(``fullgraph=True`` works) the trace is a constant of the compiled graph (:func:`_plan`), the captured tensors
are read through their closure paths (graph inputs) and the captured numbers are guarded on; there the mask
must be None or ``masks.causal()``.

Masks: ``mask`` is an :mod:`attnopt.masks` descriptor. Plain causal (``masks.causal()``, bottom-right aligned)
runs as the kernels' causal mode (tiles above the diagonal are skipped); any other descriptor's predicate is
traced into the expression (``-inf`` where it hides a key).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from attnopt.codegen.score_expr import parse
from attnopt.kernels.exact import score_mod_cpu, triton_impl
from attnopt.kernels.exact.reference import CAUSAL_BOTTOM_RIGHT, CAUSAL_NONE, CAUSAL_TOP_LEFT
from attnopt.kernels.exact.score_trace import ScoreModError, buffer_paths, closure_values, resolve, trace
from attnopt.kernels.layout import acc_dtype, assume_constant_result, check_qkv, contiguous, empty
from attnopt.masks import Mask, SlidingWindow, TopLeft

__all__ = ["ScoreModError", "attention"]


def attention(q: Tensor, k: Tensor, v: Tensor, score_mod, *, mask: Optional[Mask] = None,
              scale: Optional[float] = None, enable_gqa: bool = False, is_causal: bool = False) -> tuple[Tensor, Tensor]:
    """``(out [B, Hq, Sq, Dv], lse [B, Hq, Sq])`` of ``softmax(score_mod(scale · q kᵀ))`` over the keys ``mask``
    lets each query see (SDPA's layout; ``scale`` defaults to ``1/sqrt(D)``; GQA with ``enable_gqa``).
    ``is_causal`` is SDPA's causal mask (top-left aligned), run as the kernels' causal mode, with ``mask=None``.

    Differentiable in q, k, v and every captured tensor that requires a gradient. Raises
    :class:`ScoreModError` (a ValueError) for a score_mod that cannot be compiled, naming the op and the fix.
    """
    check_qkv(q, k, v, "attnopt.attention with a score_mod")
    b, hq, sq, d = q.shape
    if k.shape[1] != hq and not enable_gqa:
        raise ValueError(f"q has {hq} heads and k, v {k.shape[1]}: pass enable_gqa=True for grouped-query attention")
    if mask is not None and not isinstance(mask, Mask):
        raise TypeError(f"mask must be an attnopt.masks descriptor or None; got {type(mask).__name__}")
    causal_mode = CAUSAL_NONE
    if is_causal:
        if mask is not None:
            raise ValueError("score_mod attention: pass either mask or is_causal=True, not both (combine them: "
                             "mask & masks.causal('top-left'))")
        causal_mode = CAUSAL_TOP_LEFT
    elif _is_causal(mask):
        causal_mode, mask = CAUSAL_BOTTOM_RIGHT, None
    elif isinstance(mask, TopLeft) and _is_causal(mask.window):
        causal_mode, mask = CAUSAL_TOP_LEFT, None
    elif mask is not None and torch.compiler.is_compiling():
        # torch.compile hands a mask built inside the compiled function to the constant plan with its fields
        # lost (torch 2.13), which would be a silent wrong answer: refuse instead.
        raise NotImplementedError("under torch.compile, attnopt.attention with a score_mod takes mask=None, "
                                  "masks.causal() or masks.causal('top-left'); apply another mask outside the compiled function")
    # the sizes matter only to a traced-in mask; without one they stay out of the plan (symbolic under compile)
    text, paths, values = _plan(score_mod, mask, *((sq, k.shape[2], hq) if mask is not None else (0, 0, 0)))
    for now, planned in zip(closure_values(score_mod), values):
        if now != planned:  # never true in eager; under torch.compile this comparison is the guard on the value
            raise RuntimeError("score_mod's captured values changed between planning and the call")
    if paths is None:  # a captured tensor outside the function's closure (a global): found by tracing again
        buffers = list(trace(score_mod, mask, sq, k.shape[2]).buffers)
    else:
        buffers = [resolve(score_mod, path) for path in paths]
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    buffers = [t.to(q.device) for t in buffers]
    return torch.ops.attnopt.score_mod_attention(q, k, v, text, buffers, scale, causal_mode)


def _is_causal(mask) -> bool:
    """Plain causal (``masks.causal()``, bottom-right), which the kernels run as their causal mode; read field by
    field, which torch.compile follows."""
    return (isinstance(mask, SlidingWindow) and mask.left is None and mask.right == 0 and mask.dilation == 1)


@assume_constant_result
def _plan(score_mod, mask: Optional[Mask], sq: int, sk: int, heads: int) -> tuple:
    """``(expression text, closure paths of its buffers, captured plain values)``; ``mask`` is traced in.

    Under ``torch.compile`` this is a constant of the compiled graph (traced once, when the graph is built), so
    calls compile without a graph break. The caller compares the plain values the function captures (traced into
    the text as literals) with the planned ones: that comparison makes the compiled code guard on them, so the
    same code over another number recompiles instead of reusing a stale expression."""
    if mask is not None:
        mask.check(sq, sk, heads)
    traced = trace(score_mod, mask, sq, sk)
    return traced.expr.text(), buffer_paths(score_mod, traced), closure_values(score_mod)


def _offset(causal_mode: int, q: Tensor, k: Tensor) -> Optional[int]:
    """Key ``j`` is visible to query ``i`` iff ``j <= i + offset`` (None: every key)."""
    return {CAUSAL_NONE: None, CAUSAL_TOP_LEFT: 0, CAUSAL_BOTTOM_RIGHT: k.shape[2] - q.shape[2]}[causal_mode]


@torch.library.custom_op("attnopt::score_mod_attention", mutates_args=())
def score_mod_attention(q: Tensor, k: Tensor, v: Tensor, expr: str, buffers: list[Tensor], scale: float,
                        causal: int) -> tuple[Tensor, Tensor]:
    """``(out, lse)`` of attention with the score_mod whose canonical text is ``expr``; see the module docstring."""
    return contiguous(*score_mod_cpu.forward(q, k, v, parse(expr), buffers, scale, _offset(causal, q, k)))


@score_mod_attention.register_kernel("cuda")
def _(q, k, v, expr, buffers, scale, causal):
    return contiguous(*triton_impl.forward(q, k, v, None, causal, scale, score_mod=parse(expr),
                                           mod_buffers=buffers))


@score_mod_attention.register_fake
def _(q, k, v, expr, buffers, scale, causal):
    b, hq, sq, _ = q.shape
    return empty(q, (b, hq, sq, v.shape[-1])), empty(q, (b, hq, sq), acc_dtype(q))


@torch.library.custom_op("attnopt::score_mod_attention_backward", mutates_args=())
def score_mod_attention_backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, expr: str,
                                 buffers: list[Tensor], scale: float, causal: int,
                                 buffer_grads: list[bool]) -> tuple[Tensor, Tensor, Tensor, list[Tensor]]:
    """``(dq, dk, dv, [d buffer])``; a buffer's gradient is an empty tensor unless ``buffer_grads`` asks for it."""
    dq, dk, dv, dbufs = score_mod_cpu.backward(dout, q, k, v, out, lse, parse(expr), buffers, scale,
                                               _offset(causal, q, k), buffer_grads)
    return (*contiguous(dq, dk, dv), _buffer_grads(dbufs, q))


def _buffer_grads(dbufs, q: Tensor) -> list[Tensor]:
    return [g.contiguous() if g is not None else q.new_empty(0) for g in dbufs]


@score_mod_attention_backward.register_kernel("cuda")
def _(dout, q, k, v, out, lse, expr, buffers, scale, causal, buffer_grads):
    if any(buffer_grads):  # gradients of captured tensors: autograd through the expression, tile by tile
        dq, dk, dv, dbufs = score_mod_cpu.backward(dout, q, k, v, out, lse, parse(expr), buffers, scale,
                                                   _offset(causal, q, k), buffer_grads)
        return (*contiguous(dq, dk, dv), _buffer_grads(dbufs, q))
    g = triton_impl.backward(dout, q, k, v, out, lse, None, causal, scale, score_mod=parse(expr),
                             mod_buffers=buffers)
    return (*contiguous(g.dq, g.dk, g.dv), [q.new_empty(0) for _ in buffers])


@score_mod_attention_backward.register_fake
def _(dout, q, k, v, out, lse, expr, buffers, scale, causal, buffer_grads):
    return empty(q), empty(k), empty(v), [empty(t) if need else q.new_empty(0) for t, need in zip(buffers, buffer_grads)]


def _setup_context(ctx, inputs, output):
    q, k, v, expr, buffers, scale, causal = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, *buffers)
    ctx.params = (expr, scale, causal, [t.requires_grad for t in buffers])


def _backward(ctx, dout, _dlse):
    q, k, v, out, lse, *buffers = ctx.saved_tensors
    expr, scale, causal, buffer_grads = ctx.params
    dq, dk, dv, dbufs = score_mod_attention_backward(dout.contiguous(), q, k, v, out, lse, expr, buffers, scale,
                                                     causal, buffer_grads)
    grads = [g if need else None for g, need in zip(dbufs, buffer_grads)]
    return dq, dk, dv, None, grads, None, None


score_mod_attention.register_autograd(_backward, setup_context=_setup_context)

OP = torch.ops.attnopt.score_mod_attention.default  # what a rewritten graph calls (attnopt.patterns.score_terms)
