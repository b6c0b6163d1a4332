"""The memory layout every attnopt custom op promises for its outputs: contiguous.

A custom op's fake implementation tells ``torch.compile`` the shape *and strides* of each output, and
Inductor asserts them on the real outputs (``assert_size_stride``). The inputs arrive in any layout
(Hugging Face models pass q, k, v as transposed [B, S, H, D] views; SDPA's flash backend returns a
transposed ``out``), so "like the input" is not one layout the fake can name reliably. Every op
therefore returns contiguous tensors: the fakes allocate with :func:`empty`, the real implementations
pass their results through :func:`contiguous` (free when a kernel already wrote them contiguously).
"""

from __future__ import annotations

import torch
from torch import Tensor


def empty(like: Tensor, shape=None, dtype: torch.dtype | None = None) -> Tensor:
    """A contiguous empty tensor on ``like``'s device (``like``'s shape and dtype unless given)."""
    return like.new_empty(tuple(like.shape) if shape is None else tuple(shape), dtype=dtype or like.dtype)


def contiguous(*tensors: Tensor) -> tuple[Tensor, ...]:
    """``tensors`` in the promised layout, each contiguous."""
    return tuple(t.contiguous() for t in tensors)
