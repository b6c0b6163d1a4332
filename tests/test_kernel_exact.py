"""The generated exact-attention forward kernel against the reference, in Triton's CPU interpreter."""

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: kernels run on CPU tensors

import pytest
import torch

from attnopt.kernels.exact import reference, triton_impl
from attnopt.kernels.exact.reference import CAUSAL_BOTTOM_RIGHT, CAUSAL_NONE, CAUSAL_TOP_LEFT

FP32_TOL = dict(atol=1e-5, rtol=1e-5)
FP16_TOL = dict(atol=2e-3, rtol=2e-3)


@pytest.fixture(autouse=True, scope="module")
def _kernel_cache(tmp_path_factory):
    """Generated kernels go to a temporary cache, not the user's."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ATTNOPT_CACHE_DIR", str(tmp_path_factory.mktemp("attnopt_cache")))
        yield


def qkv(b=2, hq=2, hkv=None, sq=7, sk=7, d=16, dv=None, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    hkv = hq if hkv is None else hkv
    dv = d if dv is None else dv
    q = torch.randn(b, hq, sq, d, generator=g).to(dtype)
    k = torch.randn(b, hkv, sk, d, generator=g).to(dtype)
    v = torch.randn(b, hkv, sk, dv, generator=g).to(dtype)
    return q, k, v


def check(q, k, v, attn_mask=None, causal=CAUSAL_NONE, scale=None, tol=FP32_TOL):
    out, lse = triton_impl.forward(q, k, v, attn_mask, causal, scale)
    ref_out, ref_lse = reference.attention_forward(q, k, v, attn_mask, causal=causal, scale=scale)
    assert out.dtype == q.dtype and out.shape == ref_out.shape
    assert lse.dtype == torch.float32 and lse.is_contiguous() and lse.shape == q.shape[:3]
    assert not out.isnan().any() and not lse.isnan().any()
    torch.testing.assert_close(out, ref_out, **tol)
    torch.testing.assert_close(lse, ref_lse, **tol)
    return out, lse


@pytest.mark.parametrize("sq, sk", [(1, 1), (1, 33), (7, 7), (33, 7), (7, 33), (33, 33)])
@pytest.mark.parametrize("causal", [CAUSAL_NONE, CAUSAL_TOP_LEFT, CAUSAL_BOTTOM_RIGHT])
def test_sequence_lengths(sq, sk, causal):
    check(*qkv(sq=sq, sk=sk), causal=causal)


@pytest.mark.parametrize("sq, sk", [(130, 70), (70, 130), (129, 129)])
@pytest.mark.parametrize("causal", [CAUSAL_NONE, CAUSAL_TOP_LEFT, CAUSAL_BOTTOM_RIGHT])
def test_several_tiles(sq, sk, causal):
    """More than one query and key tile: interior tiles, diagonal tiles and skipped tiles all occur."""
    check(*qkv(b=1, hq=1, sq=sq, sk=sk), causal=causal)


@pytest.mark.parametrize("offset", [-34, -33, -32, -31, -30, -2, -1, 1, 2, 30, 31, 32, 33, 34])
def test_causal_diagonal_near_tile_edges(offset):
    """Bottom-right diagonals (Sk - Sq = offset) landing on and beside the 32-key tile edges."""
    check(*qkv(b=1, hq=1, sq=65, sk=65 + offset), causal=CAUSAL_BOTTOM_RIGHT)


@pytest.mark.parametrize("d, dv", [(16, 16), (24, 24), (40, 40), (64, 64), (72, 72), (3, 5), (24, 72), (72, 40),
                                   (128, 128), (200, 256)])
def test_head_dims(d, dv):
    check(*qkv(b=1, sq=9, sk=33, d=d, dv=dv), causal=CAUSAL_BOTTOM_RIGHT)


@pytest.mark.parametrize("kind", ["bool", "additive"])
@pytest.mark.parametrize("shape", [(2, 1, 7, 33), (1, 2, 7, 33), (7, 33), (33,), (2, 2, 7, 33)])
@pytest.mark.parametrize("causal", [CAUSAL_NONE, CAUSAL_BOTTOM_RIGHT])
def test_masks(kind, shape, causal):
    g = torch.Generator().manual_seed(1)
    keep = torch.rand(shape, generator=g) > 0.3
    mask = keep if kind == "bool" else torch.randn(shape, generator=g).masked_fill(~keep, float("-inf"))
    check(*qkv(sq=7, sk=33), mask, causal=causal)


def test_non_contiguous_inputs_and_mask():
    """[B, S, H, D] storage seen as [B, H, S, D], and a transposed mask."""
    q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in qkv(hq=4, hkv=2, sq=9, sk=20, d=24))
    mask = torch.randn(2, 4, 20, 9).transpose(-1, -2)
    assert not q.is_contiguous() and not mask.is_contiguous()
    check(q, k, v, mask, causal=CAUSAL_TOP_LEFT)


@pytest.mark.parametrize("hq, hkv", [(4, 2), (4, 1), (6, 3)])
@pytest.mark.parametrize("causal", [CAUSAL_NONE, CAUSAL_BOTTOM_RIGHT])
def test_gqa(hq, hkv, causal):
    mask = torch.rand(1, hq, 9, 17, generator=torch.Generator().manual_seed(2)) > 0.2
    check(*qkv(hq=hq, hkv=hkv, sq=9, sk=17, d=40, dv=24), mask, causal=causal)


@pytest.mark.parametrize("kind", ["bool", "additive"])
def test_fully_masked_rows(kind):
    keep = torch.ones(2, 2, 9, 17, dtype=torch.bool)
    keep[0, 1, 3] = False
    keep[1, :, 8] = False
    mask = keep if kind == "bool" else torch.zeros(keep.shape).masked_fill(~keep, float("-inf"))
    out, lse = check(*qkv(sq=9, sk=17), mask)
    assert (out[0, 1, 3] == 0).all() and (out[1, :, 8] == 0).all()
    assert lse[0, 1, 3] == float("-inf") and (lse[1, :, 8] == float("-inf")).all()
    assert torch.isfinite(lse[0, 0]).all()


def test_causal_rows_without_keys():
    """Bottom-right with Sq > Sk: the first Sq - Sk queries see no key."""
    out, lse = check(*qkv(sq=33, sk=7), causal=CAUSAL_BOTTOM_RIGHT)
    assert (out[:, :, :26] == 0).all() and (lse[:, :, :26] == float("-inf")).all()
    assert torch.isfinite(lse[:, :, 26:]).all()


def test_empty_keys_and_queries():
    out, lse = check(*qkv(sq=5, sk=0))
    assert (out == 0).all() and (lse == float("-inf")).all()
    out, lse = triton_impl.forward(*qkv(sq=0, sk=5), None, CAUSAL_NONE, None)
    assert out.shape == (2, 2, 0, 16) and lse.shape == (2, 2, 0)


def test_scale():
    check(*qkv(sq=9, sk=12), scale=0.3)
    check(*qkv(sq=9, sk=12), torch.randn(9, 12), causal=CAUSAL_TOP_LEFT, scale=1.0)


@pytest.mark.parametrize("causal, mask_kind", [(CAUSAL_NONE, None), (CAUSAL_TOP_LEFT, "bool"),
                                               (CAUSAL_BOTTOM_RIGHT, "additive")])
def test_float16(causal, mask_kind):
    q, k, v = qkv(hq=4, hkv=2, sq=33, sk=40, d=40, dv=24, dtype=torch.float16)
    mask = None
    if mask_kind == "bool":
        mask = torch.rand(33, 40, generator=torch.Generator().manual_seed(3)) > 0.3
    elif mask_kind == "additive":
        mask = torch.randn(2, 1, 33, 40, generator=torch.Generator().manual_seed(3)).half()
    check(q, k, v, mask, causal=causal, tol=FP16_TOL)


@pytest.mark.skip(reason="Triton's interpreter does not support bfloat16 tl.dot (triton-lang/triton#11584)")
def test_bfloat16():
    check(*qkv(sq=33, sk=40, d=40, dtype=torch.bfloat16), causal=CAUSAL_BOTTOM_RIGHT, tol=dict(atol=2e-2, rtol=2e-2))


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda q, k, v, m: (q[0], k, v, m), "must be 4-D"),
        (lambda q, k, v, m: (q.double(), k.double(), v.double(), m), "float16, bfloat16 or float32"),
        (lambda q, k, v, m: (q, k.half(), v, m), "share one dtype"),
        (lambda q, k, v, m: (q[:, :, :, :8], k, v, m), "incompatible shapes"),
        (lambda q, k, v, m: (q[:, :1], k, v, m), "multiple of key/value heads"),
        (lambda q, k, v, m: (q.new_zeros(2, 2, 7, 300), k.new_zeros(2, 2, 7, 300), v, m), "head dim must be in"),
        (lambda q, k, v, m: (q, k, v, torch.ones(3, 7, 7, dtype=torch.bool)), "does not broadcast"),
        (lambda q, k, v, m: (q, k, v, torch.ones(7, 7, dtype=torch.int32)), "bool .* or floating point"),
    ],
)
def test_rejects_bad_inputs(change, match):
    q, k, v = qkv()
    with pytest.raises(ValueError, match=match):
        triton_impl.forward(*change(q, k, v, None), CAUSAL_NONE, None)


def test_rejects_bad_causal():
    with pytest.raises(ValueError, match="causal must be one of"):
        triton_impl.forward(*qkv(), None, 3, None)
