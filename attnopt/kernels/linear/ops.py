"""``torch.ops.attnopt.linear_attention`` and its backward: custom ops with fake, CPU and CUDA implementations.

Semantics are those of :mod:`attnopt.kernels.linear.reference` (q and k are features, the feature map
already applied). The CPU implementation is the chunked PyTorch code of
:mod:`attnopt.kernels.linear.chunked`; the CUDA implementation launches the generated Triton kernels
(:mod:`attnopt.kernels.linear.triton_impl`, which imports triton only when it loads a kernel, so registering
these ops imports no triton).

    linear_attention(q, k, v, log_decay, causal, normalize, scale, eps, initial_state, initial_norm)
        -> (out [B, Hq, Sq, Dv] q.dtype, den [B, Hq, Sq], state [B, Hq, D, Dv], norm [B, Hq, D])

``den`` (the scaled denominator, saved for the backward; not differentiable) and ``norm`` are empty
unless ``normalize``; states are fp32 (fp64 for fp64 inputs). Gradients flow to q, k, v and to the
initial state and norm (so a sequence processed in pieces trains like a whole one); ``log_decay`` is
a fixed schedule and gets none.
"""

from __future__ import annotations

import torch
from torch import Tensor

from attnopt.kernels import parallel
from attnopt.kernels.layout import acc_dtype, contiguous, empty
from attnopt.kernels.linear import chunked, triton_impl
from attnopt.kernels.linear.operands import check


def _validate(q, k, v, log_decay, causal, scale, initial_state, initial_norm) -> None:
    check(q, k, v, log_decay, causal, initial_state, initial_norm)
    if not scale > 0:
        raise ValueError(f"linear attention needs a positive scale; got {scale}")


def _cuda_ok(q: Tensor, k: Tensor, v: Tensor) -> bool:
    return triton_impl.supported(q, k, v) is None


# The parameters both ops share after their tensors, in schema form (the Python signatures follow it).
_PARAMS = ("Tensor? log_decay, bool causal, bool normalize, float scale, float eps, Tensor? initial_state, "
           "Tensor? initial_norm")  # fmt: skip


@torch.library.custom_op("attnopt::linear_attention", mutates_args=(),
                         schema=f"(Tensor q, Tensor k, Tensor v, {_PARAMS}) -> (Tensor, Tensor, Tensor, Tensor)")
def linear_attention(q, k, v, log_decay, causal, normalize, scale, eps, initial_state, initial_norm):
    _validate(q, k, v, log_decay, causal, scale, initial_state, initial_norm)
    routed = parallel.route("linear_attention", q, k, v, log_decay, causal, normalize, scale, eps, initial_state,
                            initial_norm)  # fmt: skip
    if routed is not None:
        return routed
    return contiguous(*chunked.forward(q, k, v, log_decay, causal, normalize, scale, eps, initial_state, initial_norm))


@linear_attention.register_fake
def _(q, k, v, log_decay, causal, normalize, scale, eps, initial_state, initial_norm):
    _validate(q, k, v, log_decay, causal, scale, initial_state, initial_norm)
    b, hq, sq, d = q.shape
    acc = acc_dtype(q)
    den = empty(q, (b, hq, sq) if normalize else (0,), acc)
    norm = empty(q, (b, hq, d) if normalize else (0,), acc)
    return empty(q, (b, hq, sq, v.shape[-1])), den, empty(q, (b, hq, d, v.shape[-1]), acc), norm


@linear_attention.register_kernel("cuda")
def _(q, k, v, log_decay, causal, normalize, scale, eps, initial_state, initial_norm):
    _validate(q, k, v, log_decay, causal, scale, initial_state, initial_norm)
    routed = parallel.route("linear_attention", q, k, v, log_decay, causal, normalize, scale, eps, initial_state,
                            initial_norm)  # fmt: skip
    if routed is not None:
        return routed
    if not _cuda_ok(q, k, v):
        return contiguous(*chunked.forward(q, k, v, log_decay, causal, normalize, scale, eps, initial_state,
                                           initial_norm))  # fmt: skip
    return contiguous(*triton_impl.forward(q, k, v, log_decay, causal, normalize, scale, eps, initial_state,
                                           initial_norm))  # fmt: skip


@torch.library.custom_op("attnopt::linear_attention_backward", mutates_args=(),
                         schema=f"(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor den, {_PARAMS}, "
                                "Tensor? dstate, Tensor? dnorm) -> (Tensor, Tensor, Tensor, Tensor, Tensor)")  # fmt: skip
def linear_attention_backward(dout, q, k, v, out, den, log_decay, causal, normalize, scale, eps, initial_state,
                              initial_norm, dstate, dnorm):  # fmt: skip
    """Returns (dq, dk, dv, dinitial_state, dinitial_norm); the last two are empty for non-causal calls."""
    routed = parallel.route("linear_attention_backward", dout, q, k, v, out, den, log_decay, causal, normalize, scale,
                            eps, initial_state, initial_norm, dstate, dnorm)  # fmt: skip
    if routed is not None:
        return _fill_empty(q, routed)
    grads = chunked.backward(dout, q, k, v, out, den, log_decay, causal, normalize, scale, eps, initial_state,
                             initial_norm, dstate, dnorm)  # fmt: skip
    return _fill_empty(q, grads)


def _fill_empty(q: Tensor, grads) -> tuple:
    """None gradients become distinct empty tensors (a custom op returns tensors, never the same one twice);
    the others are made contiguous, the layout the fake promises."""
    return contiguous(*(g if g is not None else q.new_empty(0, dtype=acc_dtype(q)) for g in grads))


@linear_attention_backward.register_fake
def _(dout, q, k, v, out, den, log_decay, causal, normalize, scale, eps, initial_state, initial_norm, dstate, dnorm):
    b, hq, _, d = q.shape
    acc = acc_dtype(q)
    dinit = empty(q, (b, hq, d, v.shape[-1]) if causal else (0,), acc)
    dinit_norm = empty(q, (b, hq, d) if causal and normalize else (0,), acc)
    return empty(q), empty(k), empty(v), dinit, dinit_norm


@linear_attention_backward.register_kernel("cuda")
def _(dout, q, k, v, out, den, log_decay, causal, normalize, scale, eps, initial_state, initial_norm, dstate, dnorm):
    routed = parallel.route("linear_attention_backward", dout, q, k, v, out, den, log_decay, causal, normalize, scale,
                            eps, initial_state, initial_norm, dstate, dnorm)  # fmt: skip
    if routed is not None:
        return _fill_empty(q, routed)
    if not _cuda_ok(q, k, v):
        grads = chunked.backward(dout, q, k, v, out, den, log_decay, causal, normalize, scale, eps, initial_state,
                                 initial_norm, dstate, dnorm)  # fmt: skip
        return _fill_empty(q, grads)
    grads = triton_impl.backward(dout, q, k, v, out, den, log_decay, causal, normalize, scale, eps, initial_state,
                                 initial_norm, dstate, dnorm)  # fmt: skip
    return _fill_empty(q, grads)


def _setup_context(ctx, inputs, output):
    q, k, v, log_decay, causal, normalize, scale, eps, initial_state, initial_norm = inputs
    out, den, _, _ = output
    ctx.save_for_backward(q, k, v, out, den, log_decay, initial_state, initial_norm)
    ctx.params = (causal, normalize, scale, eps)
    ctx.mark_non_differentiable(den)


def _backward(ctx, dout, _dden, dstate, dnorm):
    q, k, v, out, den, log_decay, initial_state, initial_norm = ctx.saved_tensors
    causal, normalize, scale, eps = ctx.params
    if dout is None:
        dout = torch.zeros_like(out)
    dnorm = dnorm if normalize else None
    dq, dk, dv, dinit, dinit_norm = linear_attention_backward(
        dout.contiguous(), q, k, v, out, den, log_decay, causal, normalize, scale, eps, initial_state, initial_norm,
        dstate, dnorm,
    )
    dinit = dinit.to(initial_state.dtype) if initial_state is not None else None
    dinit_norm = dinit_norm.to(initial_norm.dtype) if initial_norm is not None and normalize else None
    return dq, dk, dv, None, None, None, None, None, dinit, dinit_norm


linear_attention.register_autograd(_backward, setup_context=_setup_context)
