"""``torch.ops.attnopt.sigmoid_attention`` and its backward: custom ops with fake, CPU and CUDA implementations.

Semantics are those of :mod:`attnopt.kernels.sigmoid.reference`:

    sigmoid_attention(q, k, v, attn_mask, causal, scale, bias) -> out [B, Hq, Sq, Dv]

``bias`` None means ``-log(Sk)``; ``causal`` takes the exact op's codes. The CPU implementation is the
reference; the CUDA implementation launches the generated Triton kernels
(:mod:`attnopt.kernels.sigmoid.triton_impl`, which imports triton only when it loads a kernel). Gradients flow to q, k,
v and to a floating-point mask that requires grad (a learned bias).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from attnopt.kernels.layout import check_qkv, contiguous, empty
from attnopt.kernels.sigmoid import reference, triton_impl


def _check(q: Tensor, k: Tensor, v: Tensor, attn_mask: Optional[Tensor]) -> None:
    check_qkv(q, k, v, "sigmoid attention")
    if attn_mask is not None and attn_mask.dim() > 4:
        raise ValueError(f"attn_mask must broadcast to [B, H, Sq, Sk]; got shape {tuple(attn_mask.shape)}")


def _triton(q: Tensor, k: Tensor, v: Tensor, attn_mask: Optional[Tensor]):
    """The Triton launcher when it takes these inputs, else None (the reference runs on the GPU)."""
    return triton_impl if triton_impl.supported(q, k, v, attn_mask) is None else None


@torch.library.custom_op("attnopt::sigmoid_attention", mutates_args=())
def sigmoid_attention(
    q: Tensor, k: Tensor, v: Tensor, attn_mask: Optional[Tensor], causal: int, scale: float, bias: Optional[float]
) -> Tensor:
    _check(q, k, v, attn_mask)
    return reference.sigmoid_attention(q, k, v, attn_mask, causal, scale, bias).contiguous()


@sigmoid_attention.register_fake
def _(q, k, v, attn_mask, causal, scale, bias):
    _check(q, k, v, attn_mask)
    return empty(q, (*q.shape[:3], v.shape[-1]))


@sigmoid_attention.register_kernel("cuda")
def _(q, k, v, attn_mask, causal, scale, bias):
    _check(q, k, v, attn_mask)
    impl = _triton(q, k, v, attn_mask)
    if impl is None:
        return reference.sigmoid_attention(q, k, v, attn_mask, causal, scale, bias).contiguous()
    return impl.forward(q, k, v, attn_mask, causal, scale, bias).contiguous()


@torch.library.custom_op("attnopt::sigmoid_attention_backward", mutates_args=())
def sigmoid_attention_backward(
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    attn_mask: Optional[Tensor],
    causal: int,
    scale: float,
    bias: Optional[float],
    mask_grad: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Returns (dq, dk, dv, dmask); dmask is an empty tensor unless ``mask_grad``."""
    dq, dk, dv, dmask = reference.sigmoid_attention_backward(dout, q, k, v, attn_mask, causal, scale, bias, mask_grad)
    return contiguous(dq, dk, dv, dmask if dmask is not None else q.new_empty(0))


@sigmoid_attention_backward.register_fake
def _(dout, q, k, v, attn_mask, causal, scale, bias, mask_grad):
    dmask = empty(attn_mask) if mask_grad else q.new_empty(0)
    return empty(q), empty(k), empty(v), dmask


@sigmoid_attention_backward.register_kernel("cuda")
def _(dout, q, k, v, attn_mask, causal, scale, bias, mask_grad):
    impl = _triton(q, k, v, attn_mask)
    run = reference.sigmoid_attention_backward if impl is None else impl.backward
    dq, dk, dv, dmask = run(dout, q, k, v, attn_mask, causal, scale, bias, mask_grad)
    return contiguous(dq, dk, dv, dmask if dmask is not None else q.new_empty(0))


def _setup_context(ctx, inputs, output):
    q, k, v, attn_mask, causal, scale, bias = inputs
    ctx.save_for_backward(q, k, v, attn_mask)
    ctx.params = (causal, scale, bias)
    ctx.mask_grad = attn_mask is not None and attn_mask.is_floating_point() and attn_mask.requires_grad


def _backward(ctx, dout):
    q, k, v, attn_mask = ctx.saved_tensors
    causal, scale, bias = ctx.params
    dq, dk, dv, dmask = sigmoid_attention_backward(dout.contiguous(), q, k, v, attn_mask, causal, scale, bias,
                                                   ctx.mask_grad)  # fmt: skip
    return dq, dk, dv, dmask if ctx.mask_grad else None, None, None, None


sigmoid_attention.register_autograd(_backward, setup_context=_setup_context)
