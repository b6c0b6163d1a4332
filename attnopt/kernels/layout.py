"""The conventions of attnopt's custom ops: SDPA's layout for the inputs (:func:`check_qkv`), contiguous outputs,
the accumulation dtype, and the additive-mask value that hides a key (:data:`HIDDEN_BELOW`).

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

# An additive mask entry at or below this hides its key: exp(s + fill - max) underflows to exactly 0 in fp32 when
# fill <= -1e4 and the scores spread less than about 9.9e3, as (soft-capped or normalized) attention scores do.
HIDDEN_BELOW = -1e4


def acc_dtype(t: Tensor) -> torch.dtype:
    """The accumulation dtype (and the dtype of a log-sum-exp output): fp32, or fp64 for fp64 inputs."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def empty(like: Tensor, shape=None, dtype: torch.dtype | None = None) -> Tensor:
    """A contiguous empty tensor on ``like``'s device (``like``'s shape and dtype unless given)."""
    return like.new_empty(tuple(like.shape) if shape is None else tuple(shape), dtype=dtype or like.dtype)


def contiguous(*tensors: Tensor) -> tuple[Tensor, ...]:
    """``tensors`` in the promised layout, each contiguous."""
    return tuple(t.contiguous() for t in tensors)


def check_qkv(q: Tensor, k: Tensor, v: Tensor, op: str) -> None:
    """Raises ValueError unless q, k, v have SDPA's layout, which every attnopt op takes: q [B, Hq, Sq, D],
    k [B, Hkv, Sk, D], v [B, Hkv, Sk, Dv] with Hq a multiple of Hkv (GQA). ``op`` names the caller in the
    message."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"{op}: q, k, v must be 4-D [B, H, S, D]; got {q.dim()}-D, {k.dim()}-D, {v.dim()}-D")
    if k.shape[1] == 0 or q.shape[1] % k.shape[1] != 0 or k.shape[1] != v.shape[1]:
        raise ValueError(f"query heads ({q.shape[1]}) must be a multiple of key/value heads ({k.shape[1]}, {v.shape[1]})")
    if q.shape[-1] != k.shape[-1] or k.shape[-2] != v.shape[-2] or not q.shape[0] == k.shape[0] == v.shape[0]:
        raise ValueError(f"incompatible shapes q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")


def assume_constant_result(fn):
    """``torch.compiler.assume_constant_result`` without importing ``torch._dynamo`` (and with it triton) when
    attnopt is imported: torch's decorator imports dynamo, then only marks the function, which this does
    (``tests/test_errors.py`` checks that both mark a function the same way)."""
    fn._dynamo_marked_constant = True
    return fn
