"""torch.ops.attnopt.attention: the CPU reference against SDPA, gradients, dropout replay, compile/export."""

import pytest
import torch
import torch.nn.functional as F

import attnopt
from attnopt.kernels.exact import reference


def _qkv(b=2, hq=4, hkv=4, sq=7, sk=7, d=12, dv=None, dtype=torch.float64, grad=False):
    g = torch.Generator().manual_seed(0)
    mk = lambda *s: torch.randn(*s, generator=g, dtype=dtype).requires_grad_(grad)  # noqa: E731
    return mk(b, hq, sq, d), mk(b, hkv, sk, d), mk(b, hkv, sk, dv or d)


@pytest.mark.parametrize("hq,hkv", [(4, 4), (4, 2), (4, 1)])
@pytest.mark.parametrize("sq,sk", [(7, 7), (5, 9), (1, 3)])
@pytest.mark.parametrize("mask", ["none", "bool", "additive", "causal"])
def test_matches_sdpa(hq, hkv, sq, sk, mask):
    q, k, v = _qkv(hq=hq, hkv=hkv, sq=sq, sk=sk, d=12, dv=12)
    attn_mask, is_causal = None, mask == "causal"
    if mask == "bool":
        attn_mask = torch.rand(2, 1, sq, sk, generator=torch.Generator().manual_seed(1)) > 0.3
        attn_mask[..., 0] = True  # SDPA gives NaN on fully masked rows; attnopt gives zeros (tested below)
    elif mask == "additive":
        attn_mask = torch.randn(1, hq, sq, sk, dtype=torch.float64)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal, enable_gqa=True)
    got = attnopt.attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal)
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("shapes, message", [
    (((2, 4, 7, 12), (1, 4, 7, 12), (1, 4, 7, 12)), "incompatible shapes"),  # the CPU op used to broadcast the batch
    (((2, 4, 7, 12), (2, 0, 7, 12), (2, 0, 7, 12)), "must be a multiple"),  # used to divide by zero
    (((2, 4, 7, 12), (2, 3, 7, 12), (2, 3, 7, 12)), "must be a multiple"),
    (((4, 7, 12), (2, 4, 7, 12), (2, 4, 7, 12)), "must be 4-D"),
])
def test_refuses_a_bad_layout_by_name(shapes, message):
    q, k, v = (torch.randn(shape, dtype=torch.float64) for shape in shapes)
    with pytest.raises(ValueError, match=message):
        torch.ops.attnopt.attention(q, k, v, None, 0.0, reference.CAUSAL_NONE, 0.5, None)


@pytest.mark.parametrize("causal", [reference.CAUSAL_NONE, reference.CAUSAL_TOP_LEFT, reference.CAUSAL_BOTTOM_RIGHT])
@pytest.mark.parametrize("hkv", [3, 1])
def test_gradcheck(causal, hkv):
    q, k, v = _qkv(b=1, hq=3, hkv=hkv, sq=5, sk=6, d=4, dv=3, grad=True)
    mask = torch.randn(1, 1, 5, 6, dtype=torch.float64, requires_grad=True)
    fn = lambda q, k, v, m: torch.ops.attnopt.attention(q, k, v, m, 0.0, causal, 0.7, None, 0.0)[0]  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q, k, v, mask))


def test_gradcheck_softcap_and_dropout_replay():
    q, k, v = _qkv(b=1, hq=2, hkv=2, sq=5, sk=5, d=4, grad=True)
    seed = torch.tensor(1234)
    fn = lambda q, k, v: torch.ops.attnopt.attention(q, k, v, None, 0.3, 0, 0.5, seed, 2.0)[0]  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q, k, v))
    torch.testing.assert_close(fn(q, k, v), fn(q, k, v))  # same seed, same mask


def test_causal_alignments_differ_when_sq_ne_sk():
    q, k, v = _qkv(sq=3, sk=6)
    top = torch.ops.attnopt.attention(q, k, v, None, 0.0, reference.CAUSAL_TOP_LEFT, 0.5, None)[0]
    bottom = torch.ops.attnopt.attention(q, k, v, None, 0.0, reference.CAUSAL_BOTTOM_RIGHT, 0.5, None)[0]
    full = torch.ops.attnopt.attention(q, k, v, None, 0.0, reference.CAUSAL_NONE, 0.5, None)[0]
    torch.testing.assert_close(bottom[:, :, -1], full[:, :, -1])  # last query sees every key
    assert not torch.allclose(top[:, :, -1], full[:, :, -1])


def test_fully_masked_rows_are_zero_not_nan():
    q, k, v = _qkv(sq=4, sk=5)
    mask = torch.ones(1, 1, 4, 5, dtype=torch.bool)
    mask[..., 2, :] = False
    out = attnopt.attention(q, k, v, attn_mask=mask)
    assert torch.isfinite(out).all()
    assert (out[:, :, 2] == 0).all()


def test_low_precision_output_dtype():
    q, k, v = (t.to(torch.bfloat16) for t in _qkv())
    out = attnopt.attention(q, k, v)
    assert out.dtype == torch.bfloat16
    want = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
    torch.testing.assert_close(out.float(), want, atol=2e-2, rtol=2e-2)


def test_three_d_inputs():
    q, k, v = (t[0] for t in _qkv())
    torch.testing.assert_close(attnopt.attention(q, k, v), F.scaled_dot_product_attention(q, k, v))


def test_compile_and_export_trace_the_op():
    q, k, v = _qkv(dtype=torch.float32)

    class M(torch.nn.Module):
        def forward(self, q, k, v):
            return attnopt.attention(q, k, v, is_causal=True)

    want = M()(q, k, v)
    torch.testing.assert_close(torch.compile(M(), backend="aot_eager", fullgraph=True)(q, k, v), want)
    ep = torch.export.export(M(), (q, k, v))
    assert any("attnopt.attention" in str(n.target) for n in ep.graph.nodes)
    torch.testing.assert_close(ep.module()(q, k, v), want)


def test_opcheck():
    q, k, v = _qkv(dtype=torch.float32, grad=True)
    mask = torch.randn(1, 4, 7, 7)
    torch.library.opcheck(torch.ops.attnopt.attention.default, (q, k, v, mask, 0.0, 1, 0.3, None, 0.0))


@pytest.mark.parametrize("bad,match", [
    (lambda q, k, v: attnopt.attention(q, k, v, attn_mask=torch.ones(7, 7, dtype=torch.bool), is_causal=True), "either"),
    (lambda q, k, v: attnopt.attention(q[0, 0], k[0, 0], v[0, 0]), "3-D or 4-D"),
    (lambda q, k, v: attnopt.attention(q, k[:, :3], v[:, :3]), "multiple"),
])  # fmt: skip
def test_bad_input_errors(bad, match):
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=match):
        bad(q, k, v)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8])
def test_integer_mask_is_refused_like_sdpa(dtype):
    """A Hugging Face style 0/1 mask read as additive would mask nothing."""
    q, k, v = _qkv(dtype=torch.float32)
    keep = torch.ones(1, 1, 7, 7, dtype=dtype).tril()
    with pytest.raises(ValueError, match=rf"{dtype}.*attn_mask\.bool\(\).*float mask"):
        attnopt.attention(q, k, v, attn_mask=keep)
    with pytest.raises(ValueError, match=r"attn_mask\.bool\(\)"):
        torch.ops.attnopt.attention(q, k, v, keep, 0.0, 0, 0.5, None)
    torch.testing.assert_close(attnopt.attention(q, k, v, attn_mask=keep.bool()),
                               F.scaled_dot_product_attention(q, k, v, attn_mask=keep.bool()))


def test_fully_masked_row_with_finite_fill_is_a_mean_not_a_sum():
    """Every score of row 0 is finfo.min: softmax is uniform, so the output is mean(V) (as eager computes)."""
    q, k, v = _qkv(dtype=torch.float32)
    mask = torch.zeros(1, 1, 7, 7)
    mask[..., 0, :] = torch.finfo(torch.float32).min
    want = torch.softmax(q @ k.transpose(-2, -1) * 0.5 + mask, dim=-1) @ v
    got = attnopt.attention(q, k, v, attn_mask=mask, scale=0.5)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got[:, :, 0], v.mean(dim=-2))
