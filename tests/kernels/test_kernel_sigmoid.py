"""Sigmoid attention: the reference, the custom op and the generated Triton kernels (in Triton's CPU
interpreter), forward and backward, causal and masked, on odd sizes."""

import math

import re

import pytest
import torch

import attnopt.kernels.sigmoid  # noqa: F401  (registers torch.ops.attnopt.sigmoid_attention)
from attnopt.kernels.sigmoid import render as sigmoid_render
from attnopt.kernels.exact.reference import CAUSAL_BOTTOM_RIGHT, CAUSAL_NONE, CAUSAL_TOP_LEFT
from attnopt.kernels.sigmoid import reference, triton_impl

pytestmark = pytest.mark.usefixtures("temp_kernel_cache")

F32 = dict(atol=2e-5, rtol=2e-5)


def qkv(b=2, hq=4, hkv=2, sq=7, sk=33, d=24, dv=16, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, hq, sq, d, generator=g).to(dtype), torch.randn(b, hkv, sk, d, generator=g).to(dtype),
            torch.randn(b, hkv, sk, dv, generator=g).to(dtype))  # fmt: skip


def mask(kind, shape, seed=1):
    g = torch.Generator().manual_seed(seed)
    keep = torch.rand(shape, generator=g) > 0.3
    if kind == "bool":
        return keep
    if kind == "additive":
        return torch.randn(shape, generator=g).masked_fill(~keep, float("-inf"))
    return None


def test_reference_by_hand():
    """Default bias -log(Sk); masked keys contribute exactly 0; a row without keys is 0."""
    q, k, v = qkv(b=1, hq=1, hkv=1, sq=3, sk=5, dtype=torch.float64)
    keep = torch.ones(3, 5, dtype=torch.bool)
    keep[1, 2] = False
    keep[2] = False
    out = reference.sigmoid_attention(q, k, v, keep, CAUSAL_NONE, 0.5)
    p = torch.sigmoid(0.5 * q[0, 0] @ k[0, 0].T - math.log(5)) * keep
    torch.testing.assert_close(out[0, 0], p @ v[0, 0])
    assert (out[0, 0, 2] == 0).all()


@pytest.mark.parametrize("causal", [CAUSAL_NONE, CAUSAL_TOP_LEFT, CAUSAL_BOTTOM_RIGHT])
@pytest.mark.parametrize("kind", [None, "bool", "additive"])
def test_reference_backward_matches_autograd(causal, kind):
    q, k, v = (t.requires_grad_() for t in qkv(sq=6, sk=9, d=5, dv=3, dtype=torch.float64))
    m = mask(kind, (2, 1, 6, 9))
    if m is not None and m.is_floating_point():
        m = m.double().requires_grad_()
    out = reference.sigmoid_attention(q, k, v, m, causal, 0.3, -1.5)
    dout = torch.randn_like(out)
    leaves = [q, k, v] + ([m] if m is not None and m.requires_grad else [])
    want = torch.autograd.grad((out * dout).sum(), leaves)
    got = reference.sigmoid_attention_backward(dout, q, k, v, m, causal, 0.3, -1.5, mask_grad=len(leaves) == 4)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def test_op_registration_autograd_and_mask_gradient():
    q, k, v = qkv(b=1, hq=2, hkv=1, sq=5, sk=6, d=3, dv=2, dtype=torch.float64)
    bias = torch.randn(1, 2, 5, 6, dtype=torch.float64, requires_grad=True)
    for args in ((q, k, v, None, CAUSAL_TOP_LEFT, 0.3, None), (q, k, v, bias, CAUSAL_NONE, 0.3, -1.0),
                 (q, k, v, bias > 0, CAUSAL_BOTTOM_RIGHT, 0.3, None)):  # fmt: skip
        torch.library.opcheck(torch.ops.attnopt.sigmoid_attention.default, args)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = torch.ops.attnopt.sigmoid_attention(*leaves, bias, CAUSAL_NONE, 0.3, None)
    out.sum().backward()
    want = reference.sigmoid_attention_backward(torch.ones_like(out), q, k, v, bias, CAUSAL_NONE, 0.3, None, True)
    for t, g in zip(leaves + [bias], want):
        torch.testing.assert_close(t.grad, g)


def _check(q, k, v, m=None, causal=CAUSAL_NONE, bias=None, tol=F32, grads=True, mask_grad=False):
    want = reference.sigmoid_attention(q, k, v, m, causal, 0.3, bias)
    got = triton_impl.forward(q, k, v, m, causal, 0.3, bias)
    assert got.dtype == q.dtype
    torch.testing.assert_close(got, want, **tol)
    if grads:
        dout = torch.randn(want.shape, generator=torch.Generator().manual_seed(7)).to(q.dtype)
        want_g = reference.sigmoid_attention_backward(dout, q, k, v, m, causal, 0.3, bias, mask_grad)
        got_g = triton_impl.backward(dout, q, k, v, m, causal, 0.3, bias, mask_grad)
        assert (got_g[3] is None) == (want_g[3] is None) == (not mask_grad)
        for name, a, b in zip(("dq", "dk", "dv", "dmask"), got_g[:3 + mask_grad], want_g):
            assert a.dtype == b.dtype and a.shape == b.shape, name
            torch.testing.assert_close(a, b, **tol, msg=lambda msg, n=name: f"{n}: {msg}")


@pytest.mark.parametrize("sq, sk", [(7, 33), (33, 7), (70, 70)])
@pytest.mark.parametrize("causal", [CAUSAL_NONE, CAUSAL_TOP_LEFT, CAUSAL_BOTTOM_RIGHT])
def test_triton_causal_and_lengths(sq, sk, causal):
    _check(*qkv(sq=sq, sk=sk), causal=causal)


@pytest.mark.parametrize("kind, shape", [("bool", (2, 1, 65, 40)), ("additive", (65, 40)), ("additive", (1, 4, 65, 1))])
@pytest.mark.parametrize("causal", [CAUSAL_NONE, CAUSAL_BOTTOM_RIGHT])
def test_triton_masks(kind, shape, causal):
    _check(*qkv(sq=65, sk=40), mask(kind, shape), causal=causal, bias=-2.0)


@pytest.mark.parametrize("shape, causal", [((2, 4, 33, 40), CAUSAL_NONE), ((33, 40), CAUSAL_BOTTOM_RIGHT),
                                           ((1, 4, 33, 1), CAUSAL_TOP_LEFT), ((2, 1, 1, 40), CAUSAL_NONE)])  # fmt: skip
def test_triton_mask_gradient_sums_over_broadcast_dims(shape, causal):
    """dmask is dS summed over the dims the mask broadcasts along (batch, heads, query or key rows);
    0 at -inf entries and at keys the causal diagonal hides."""
    _check(*qkv(sq=33, sk=40), mask("additive", shape), causal=causal, bias=-2.0, mask_grad=True)


def test_mask_gradient_spec_and_errors():
    with_ds = sigmoid_render.default_spec("bwd_q", 24, 16, "float32", CAUSAL_NONE, "additive", write_ds=True)
    without = sigmoid_render.default_spec("bwd_q", 24, 16, "float32", CAUSAL_NONE, "additive")
    assert with_ds.name.startswith("attnopt_sigmoid_bwd_q_") and with_ds.key != without.key
    assert "DS" in sigmoid_render.kernel_arg_names(with_ds) and "DS" not in sigmoid_render.kernel_arg_names(without)
    assert "tl.store(ds_row[:, None] + cols[None, :], ds" in sigmoid_render.render(with_ds)
    for direction, kind in (("bwd_kv", "additive"), ("bwd_q", "bool")):
        with pytest.raises(ValueError, match="write_ds needs direction 'bwd_q' and mask 'additive'"):
            sigmoid_render.default_spec(direction, 24, 16, "float32", CAUSAL_NONE, kind, write_ds=True)
    with pytest.raises(ValueError, match="SigmoidSpec.block_m must be a power of two"):
        sigmoid_render.SigmoidSpec(direction="fwd", head_dim=8, head_dim_v=8, dtype="float32", causal=0, mask="none",
                                   block_m=48, block_n=16, num_warps=4, num_stages=2)  # fmt: skip
    with pytest.raises(ValueError, match="mask_grad needs an additive"):
        triton_impl.backward(torch.zeros(2, 4, 7, 16), *qkv(), mask("bool", (7, 33)), mask_grad=True)


def test_triton_fully_masked_rows_are_zero():
    keep = torch.ones(2, 4, 9, 17, dtype=torch.bool)
    keep[0, 1, 3] = False
    q, k, v = qkv(sq=9, sk=17)
    _check(q, k, v, keep)
    assert (triton_impl.forward(q, k, v, keep, CAUSAL_NONE, 0.3)[0, 1, 3] == 0).all()


def test_triton_head_dims_strides_float16():
    q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in qkv(hq=4, hkv=1, sq=33, sk=40, d=40, dv=72))
    assert not q.is_contiguous()
    _check(q, k, v, causal=CAUSAL_TOP_LEFT)
    _check(*qkv(sq=33, sk=40, d=40, dtype=torch.float16), mask("additive", (33, 40)).half(), CAUSAL_BOTTOM_RIGHT,
           tol=dict(atol=3e-3, rtol=3e-3), grads=False)  # fmt: skip


def test_triton_empty_and_rejected():
    out = triton_impl.forward(*qkv(sq=5, sk=0))
    assert out.shape == (2, 4, 5, 16) and (out == 0).all()
    q, k, v = qkv(dtype=torch.float64)
    assert "float16, bfloat16 or float32" in triton_impl.supported(q, k, v, None)
    with pytest.raises(ValueError, match="does not broadcast"):
        triton_impl.forward(*qkv(), torch.ones(3, 7, 33, dtype=torch.bool))


def test_addresses_take_int64_tile_starts_and_unit_step_loops():
    """Tile starts enter addresses as int64; loops run over unit-step tile indices (a strided range kept a
    wgmma in flight across the loop exit on sm_90a)."""
    for direction in ("fwd", "bwd_kv", "bwd_q"):
        src = sigmoid_render.render(sigmoid_render.default_spec(direction, 24, 16, "bfloat16", CAUSAL_TOP_LEFT, "bool"))
        assert "row0 = tl.cast(start_m, tl.int64)" in src and "col0 = tl.cast(start_n, tl.int64)" in src, direction
        assert "rows[:, None] * stride" not in src and "cols[None, :] * stride" not in src, direction
        assert not re.search(r"range\([^()]*, BLOCK_[MN]\):", src), direction
