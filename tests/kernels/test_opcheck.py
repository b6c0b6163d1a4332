"""``torch.library.opcheck`` on every attnopt custom op, forward and backward, with q, k, v in several layouts.

opcheck compares each fake implementation with the real one (shapes, dtypes *and strides*: what
Inductor asserts at run time), checks the autograd registration and traces the op through AOT
autograd with dynamic shapes. Inputs come contiguous, as transposed [B, S, H, D] views (how Hugging
Face models pass them) and as non-dense slices of a wider projection.
"""

import pytest
import torch

import attnopt  # noqa: F401  (registers the ops)
import attnopt.kernels.linear  # noqa: F401
import attnopt.kernels.sigmoid  # noqa: F401
import attnopt.kernels.sparse  # noqa: F401
from attnopt import masks

B, HQ, HKV, S, D = 2, 4, 2, 6, 4
LAYOUTS = ["contiguous", "bshd", "sliced"]
ops = torch.ops.attnopt


def _laid_out(t: torch.Tensor, layout: str) -> torch.Tensor:
    """``t`` [B, H, S, D] with the same values in ``layout``."""
    if layout == "bshd":  # a [B, S, H, D] buffer seen as [B, H, S, D]
        return t.transpose(1, 2).contiguous().transpose(1, 2)
    if layout == "sliced":  # the first D columns of a [B, H, S, 2D] buffer: not dense
        return torch.cat([t, torch.zeros_like(t)], dim=-1)[..., : t.shape[-1]]
    return t


def _qkv(layout: str, positive: bool = False, grad: bool = True):
    g = torch.Generator().manual_seed(0)
    make = (lambda *s: torch.rand(*s, generator=g, dtype=torch.float64) + 0.1) if positive else (
        lambda *s: torch.randn(*s, generator=g, dtype=torch.float64))  # fmt: skip
    ts = (make(B, HQ, S, D), make(B, HKV, S, D), make(B, HKV, S, D))
    return tuple(_laid_out(t, layout).requires_grad_(grad) for t in ts)


def _dout(layout: str) -> torch.Tensor:
    return _laid_out(torch.randn(B, HQ, S, D, generator=torch.Generator().manual_seed(1), dtype=torch.float64), layout)


def _check(op, args):
    torch.library.opcheck(op, args)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("mask", ["none", "bool", "additive"])
def test_exact_attention(layout, mask):
    q, k, v = _qkv(layout)
    m = {"none": None, "bool": torch.ones(S, S, dtype=torch.bool).tril(),
         "additive": torch.randn(1, HQ, S, S, dtype=torch.float64)}[mask]  # fmt: skip
    _check(ops.attention.default, (q, k, v, m, 0.0, 0, 0.4, None, 0.0))
    with torch.no_grad():
        out, lse = ops.attention(q, k, v, m, 0.0, 1, 0.4, None, 0.0)
    args = (_dout(layout), q.detach(), k.detach(), v.detach(), out, lse, m, 0.0, 1, 0.4, None, False, 0.0)
    _check(ops.attention_backward.default, args)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("causal", [True, False])
def test_linear_attention(layout, causal):
    q, k, v = _qkv(layout, positive=True)
    _check(ops.linear_attention.default, (q, k, v, None, causal, True, 0.3, 1e-6, None, None))
    with torch.no_grad():
        out, den, state, norm = ops.linear_attention(q, k, v, None, causal, True, 0.3, 1e-6, None, None)
    args = (_dout(layout), q.detach(), k.detach(), v.detach(), out, den, None, causal, True, 0.3, 1e-6, None, None,
            torch.ones_like(state), torch.ones_like(norm))  # fmt: skip
    _check(ops.linear_attention_backward.default, args)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_sigmoid_attention(layout):
    q, k, v = _qkv(layout)
    bias = torch.randn(1, HQ, S, S, dtype=torch.float64, requires_grad=True)
    _check(ops.sigmoid_attention.default, (q, k, v, bias, 0, 0.3, None))
    args = (_dout(layout), q.detach(), k.detach(), v.detach(), bias.detach(), 0, 0.3, None, True)
    _check(ops.sigmoid_attention_backward.default, args)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_sparse_attention(layout):
    q, k, v = _qkv(layout)
    key = masks.SlidingWindow(2, 0).key()
    _check(ops.sparse_attention.default, (q, k, v, None, None, key, 0.35, 0.0))
    with torch.no_grad():
        out, lse = ops.sparse_attention(q, k, v, None, None, key, 0.35, 0.0)
    args = (_dout(layout), q.detach(), k.detach(), v.detach(), out, lse, None, None, key, 0.35, 0.0)
    _check(ops.sparse_attention_backward.default, args)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("mask", ["causal", "dense"])
def test_sparse_attention_auto(layout, mask):
    """Both paths: a causal site (recognized, sparse) and a dense random mask (the exact op)."""
    q, k, v = _qkv(layout)
    m, causal = (None, 1) if mask == "causal" else (torch.rand(S, S, generator=torch.Generator().manual_seed(2)) < 0.7,
                                                    0)  # fmt: skip
    if m is not None:
        m[:, 0] = True
    _check(ops.sparse_attention_auto.default, (q, k, v, m, causal, 0.35, 0.0))
    with torch.no_grad():
        out, lse = ops.sparse_attention_auto(q, k, v, m, causal, 0.35, 0.0)
    args = (_dout(layout), q.detach(), k.detach(), v.detach(), out, lse, m, causal, 0.35, 0.0)
    _check(ops.sparse_attention_auto_backward.default, args)
