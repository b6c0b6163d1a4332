"""The generated exact-attention forward kernel against the reference.

Kernels run in Triton's CPU interpreter, or compiled on a GPU with ``ATTNOPT_TEST_GPU=1`` (see
``_exact_helpers``).
"""

import json

import pytest
import torch
from _exact_helpers import (
    DEVICE,
    alibi_bias,
    float16_case,
    gpu_only,
    ignore_exp2_overflow,
    kernel_cache,  # noqa: F401  (autouse fixture)
    masked_rows,
    padding_keep,
    qkv,
    rand,
    randn,
)

from attnopt.kernels.exact import reference, triton_impl
from attnopt.kernels.exact.reference import CAUSAL_BOTTOM_RIGHT, CAUSAL_NONE, CAUSAL_TOP_LEFT

FP32_TOL = dict(atol=1e-5, rtol=1e-5)
FP16_TOL = dict(atol=2e-3, rtol=2e-3)
pytestmark = ignore_exp2_overflow


def check(q, k, v, attn_mask=None, causal=CAUSAL_NONE, scale=None, tol=FP32_TOL, ref_mask=None, softcap=0.0,
          **features):
    """Kernel vs reference; ``ref_mask`` is the reference's equivalent of the features (default attn_mask)."""
    out, lse = triton_impl.forward(q, k, v, attn_mask, causal, scale, softcap=softcap, **features)
    ref_mask = attn_mask if ref_mask is None else ref_mask
    ref_out, ref_lse = reference.attention_forward(q, k, v, ref_mask, causal=causal, scale=scale, softcap=softcap)
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
    keep = rand(*shape) > 0.3
    mask = keep if kind == "bool" else randn(*shape).masked_fill(~keep, float("-inf"))
    check(*qkv(sq=7, sk=33), mask, causal=causal)


@pytest.mark.parametrize("layout, strided_kv", [("contiguous", False), ("odd_rows", True), ("strided_d", True),
                                                ("offset", True)])
def test_key_value_through_descriptors_or_pointers(layout, strided_kv, monkeypatch, tmp_path):
    """K and V go through tensor descriptors when every row is 16-byte aligned with a unit head-dim
    stride, else through pointers (spec.strided_kv); both match the reference over several key tiles."""
    monkeypatch.setenv("ATTNOPT_CACHE_DIR", str(tmp_path))
    q, k, v = qkv(b=1, hq=2, sq=9, sk=70, d=7 if layout == "odd_rows" else 16)
    if layout == "strided_d":
        k, v = (torch.stack([t, t], -1).flatten(-2)[..., ::2] for t in (k, v))
    elif layout == "offset":
        k, v = (torch.cat([t.flatten(), t.flatten()[:1]])[1:].view(t.shape) for t in (k, v))
    check(q, k, v, causal=CAUSAL_BOTTOM_RIGHT)
    specs = [json.loads(f.read_text().splitlines()[1][len("# spec: "):]) for f in tmp_path.glob("kernels/*fwd*.py")]
    assert [spec["strided_kv"] for spec in specs] == [strided_kv]


def test_non_contiguous_inputs_and_mask():
    """[B, S, H, D] storage seen as [B, H, S, D], and a transposed mask."""
    q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in qkv(hq=4, hkv=2, sq=9, sk=20, d=24))
    mask = randn(2, 4, 20, 9).transpose(-1, -2)
    assert not q.is_contiguous() and not mask.is_contiguous()
    check(q, k, v, mask, causal=CAUSAL_TOP_LEFT)


@pytest.mark.parametrize("hq, hkv", [(4, 2), (4, 1), (6, 3)])
@pytest.mark.parametrize("causal", [CAUSAL_NONE, CAUSAL_BOTTOM_RIGHT])
def test_gqa(hq, hkv, causal):
    mask = rand(1, hq, 9, 17, seed=2) > 0.2
    check(*qkv(hq=hq, hkv=hkv, sq=9, sk=17, d=40, dv=24), mask, causal=causal)


@pytest.mark.parametrize("kind", ["bool", "additive"])
def test_fully_masked_rows(kind):
    mask, _ = masked_rows(kind)
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
    check(*qkv(sq=9, sk=12), randn(9, 12), causal=CAUSAL_TOP_LEFT, scale=1.0)


@pytest.mark.parametrize("scale", [-0.7, 0.0])
@pytest.mark.parametrize("causal", [CAUSAL_NONE, CAUSAL_BOTTOM_RIGHT])
def test_scale_negative_or_zero(scale, causal):
    """Interior key tiles take the max of the raw products and fold the scale into the exponent
    (render_fwd.folds_scale): a negative scale must not turn that max into the minimum, which overflows
    exp2 once the scores of a row span more than 128 (base 2)."""
    q, k, v = qkv(b=1, hq=2, sq=9, sk=70)
    check(q * 10.0, k * 10.0, v, causal=causal, scale=scale, tol=dict(atol=1e-4, rtol=1e-4))


@pytest.mark.parametrize("causal, mask_kind", [(CAUSAL_NONE, None), (CAUSAL_TOP_LEFT, "bool"),
                                               (CAUSAL_BOTTOM_RIGHT, "additive")])
def test_float16(causal, mask_kind):
    q, k, v, mask = float16_case(mask_kind)
    check(q, k, v, mask, causal=causal, tol=FP16_TOL)


@gpu_only
@pytest.mark.gpu
@pytest.mark.parametrize("causal", [CAUSAL_NONE, CAUSAL_BOTTOM_RIGHT])
def test_bfloat16(causal):
    """Triton's interpreter does not support bfloat16 tl.dot (triton-lang/triton#11584): GPU only."""
    check(*qkv(sq=33, sk=40, d=40, dtype=torch.bfloat16), causal=causal, tol=dict(atol=2e-2, rtol=2e-2))


# ---------------------------------------------------------------------------------------------------------------
# Score features: softcap, ALiBi, bias tensor, relative position bias, key-padding lengths, dropout


def t5_buckets(rel):
    """A T5-like bucketing of relative positions j - i: signed, clipped to 8 buckets."""
    return rel.clamp(-3, 4) + 3


def rel_bias(table, buckets, sq, sk):
    """table[buckets[j - i + Sq - 1], h] as [1, Hq, Sq, Sk]."""
    rel = torch.arange(sk, device=DEVICE)[None, :] - torch.arange(sq, device=DEVICE)[:, None] + sq - 1
    return table[buckets.long()[rel]].permute(2, 0, 1)[None]


@pytest.mark.parametrize("causal", [CAUSAL_NONE, CAUSAL_TOP_LEFT, CAUSAL_BOTTOM_RIGHT])
@pytest.mark.parametrize("cap", [0.5, 30.0])
def test_softcap(causal, cap):
    check(*qkv(hq=4, hkv=2, sq=19, sk=40, d=24), causal=causal, scale=2.0, softcap=cap)


def test_softcap_with_mask_fp16():
    mask = randn(1, 2, 19, 40).half()
    check(*qkv(sq=19, sk=40, d=24, dtype=torch.float16), mask, CAUSAL_BOTTOM_RIGHT, softcap=5.0, tol=FP16_TOL)


@pytest.mark.parametrize("causal", [CAUSAL_NONE, CAUSAL_TOP_LEFT, CAUSAL_BOTTOM_RIGHT])
@pytest.mark.parametrize("per_batch", [False, True])
def test_alibi(causal, per_batch):
    q, k, v = qkv(hq=4, hkv=2, sq=19, sk=70)
    slopes = rand(2, 4) if per_batch else rand(4)
    check(q, k, v, causal=causal, alibi_slopes=slopes, ref_mask=alibi_bias(slopes, 19, 70))


@pytest.mark.parametrize("shape", [(1, 4, 19, 40), (2, 1, 1, 40), (19, 40)])
def test_bias_tensor_with_bool_mask(shape):
    q, k, v = qkv(hq=4, hkv=2, sq=19, sk=40)
    bias = randn(*shape)
    keep = rand(2, 1, 19, 40) > 0.2
    check(q, k, v, keep, CAUSAL_TOP_LEFT, bias=bias, ref_mask=bias.masked_fill(~keep, float("-inf")))


@pytest.mark.parametrize("sq, sk", [(19, 40), (40, 19)])
def test_relative_position_bias(sq, sk):
    q, k, v = qkv(hq=4, sq=sq, sk=sk)
    table = randn(8, 4)
    buckets = triton_impl.relative_buckets(sq, sk, t5_buckets, device=DEVICE)
    mask = randn(sq, sk, seed=2)
    check(q, k, v, mask, CAUSAL_NONE, rel_table=table, rel_buckets=buckets,
          ref_mask=mask + rel_bias(table, buckets, sq, sk))


@pytest.mark.parametrize("causal", [CAUSAL_NONE, CAUSAL_BOTTOM_RIGHT])
def test_key_padding_lengths(causal):
    """Right padding per batch row, including a row with every key padded (zeros, lse -inf)."""
    q, k, v = qkv(b=4, hq=2, sq=19, sk=70)
    kv_lens = torch.tensor([70, 33, 1, 0], device=DEVICE)
    out, lse = check(q, k, v, None, causal, kv_lens=kv_lens, ref_mask=padding_keep(kv_lens, 70))
    assert (out[3] == 0).all() and (lse[3] == float("-inf")).all()


def test_key_padding_with_additive_mask_and_alibi():
    q, k, v = qkv(b=2, hq=2, sq=19, sk=40)
    kv_lens = torch.tensor([25, 40], device=DEVICE)
    slopes, mask = rand(2), randn(2, 1, 19, 40)
    ref = (mask + alibi_bias(slopes, 19, 40)).masked_fill(~padding_keep(kv_lens, 40), float("-inf"))
    check(q, k, v, mask, CAUSAL_TOP_LEFT, kv_lens=kv_lens, alibi_slopes=slopes, ref_mask=ref)


def dropout_check(q, k, v, attn_mask, causal, p, seed, monkeypatch, philox_offset=0, tol=FP32_TOL):
    """Kernel with dropout vs the reference math with the kernel's own keep-mask (materialized)."""
    keep = triton_impl.dropout_mask(q.shape[:3] + k.shape[2:3], p, seed, philox_offset, device=DEVICE)
    monkeypatch.setattr(reference, "dropout_keep", lambda shape, p, s, device: keep.expand(shape))
    out, lse = triton_impl.forward(q, k, v, attn_mask, causal, dropout_p=p, seed=seed, philox_offset=philox_offset)
    ref_out, ref_lse = reference.attention_forward(q, k, v, attn_mask, p, causal, seed=torch.tensor(0))
    torch.testing.assert_close(out, ref_out, **tol)
    torch.testing.assert_close(lse, ref_lse, **tol)
    return out, keep


@pytest.mark.parametrize("causal", [CAUSAL_NONE, CAUSAL_BOTTOM_RIGHT])
def test_dropout_matches_reference_with_kernel_mask(causal, monkeypatch):
    q, k, v = qkv(hq=4, hkv=2, sq=19, sk=70, d=24)
    dropout_check(q, k, v, rand(19, 70) > 0.2, causal, 0.3, 1234, monkeypatch)


def test_dropout_seed_offset_and_tensor_seed(monkeypatch):
    q, k, v = qkv(sq=19, sk=40)
    out_a, keep_a = dropout_check(q, k, v, None, CAUSAL_NONE, 0.5, 7, monkeypatch)
    out_b, keep_b = dropout_check(q, k, v, None, CAUSAL_NONE, 0.5, 2**40 + 3, monkeypatch)
    out_c, keep_c = dropout_check(q, k, v, None, CAUSAL_NONE, 0.5, 7, monkeypatch, philox_offset=12345)
    assert not torch.equal(keep_a, keep_b) and not torch.equal(keep_a, keep_c)
    again, _ = triton_impl.forward(q, k, v, None, CAUSAL_NONE, dropout_p=0.5, seed=torch.tensor(7))
    torch.testing.assert_close(again, out_a, rtol=0, atol=0)


def test_dropout_keeps_one_minus_p():
    """The keep fraction is 1 - p within 4 standard deviations, and every (head, row) draws its own mask."""
    shape = (1, 2, 32, 64)
    n = 1 * 2 * 32 * 64
    for p in (0.1, 0.5, 0.9):
        keep = triton_impl.dropout_mask(shape, p, seed=99, device=DEVICE)
        assert abs(keep.float().mean().item() - (1 - p)) < 4 * (p * (1 - p) / n) ** 0.5
    keep = triton_impl.dropout_mask(shape, 0.5, seed=99, device=DEVICE)
    assert not torch.equal(keep[0, 0], keep[0, 1]) and not torch.equal(keep[0, 0, 0], keep[0, 0, 1])


def test_all_features_together(monkeypatch):
    """GQA, bottom-right causal, bool mask, ALiBi, key padding, softcap and dropout in one kernel, odd dims."""
    q, k, v = qkv(b=2, hq=4, hkv=2, sq=21, sk=50, d=20, dv=12)
    keep_mask = rand(2, 1, 21, 50) > 0.1
    slopes, kv_lens = rand(4), torch.tensor([50, 30], device=DEVICE)
    keep = triton_impl.dropout_mask((2, 4, 21, 50), 0.2, 5, device=DEVICE)
    monkeypatch.setattr(reference, "dropout_keep", lambda shape, p, s, device: keep)
    ref_mask = alibi_bias(slopes, 21, 50).masked_fill(~(keep_mask & padding_keep(kv_lens, 50)), float("-inf"))
    out, lse = triton_impl.forward(q, k, v, keep_mask, CAUSAL_BOTTOM_RIGHT, softcap=3.0, dropout_p=0.2, seed=5,
                                   alibi_slopes=slopes, kv_lens=kv_lens)
    ref_out, ref_lse = reference.attention_forward(q, k, v, ref_mask, 0.2, CAUSAL_BOTTOM_RIGHT, seed=torch.tensor(0),
                                                   softcap=3.0)
    torch.testing.assert_close(out, ref_out, **FP32_TOL)
    torch.testing.assert_close(lse, ref_lse, **FP32_TOL)


# ---------------------------------------------------------------------------------------------------------------
# Validation


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda q, k, v, m: (q[0], k, v, m), "must be 4-D"),
        (lambda q, k, v, m: (q.double(), k.double(), v.double(), m), "float16, bfloat16 or float32"),
        (lambda q, k, v, m: (q, k.half(), v, m), "share one dtype"),
        (lambda q, k, v, m: (q[:, :, :, :8], k, v, m), "incompatible shapes"),
        (lambda q, k, v, m: (q[:, :1], k, v, m), "multiple of key/value heads"),
        (lambda q, k, v, m: (q.new_zeros(2, 2, 7, 300), k.new_zeros(2, 2, 7, 300), v, m), "head dim must be in"),
        (lambda q, k, v, m: (q, k, v, torch.ones(3, 7, 7, dtype=torch.bool, device=DEVICE)), "does not broadcast"),
        (lambda q, k, v, m: (q, k, v, torch.ones(7, 7, dtype=torch.int32, device=DEVICE)), "bool .* or floating point"),
    ],
)
def test_rejects_bad_inputs(change, match):
    q, k, v = qkv()
    with pytest.raises(ValueError, match=match):
        triton_impl.forward(*change(q, k, v, None), CAUSAL_NONE, None)


@pytest.mark.parametrize(
    "features, match",
    [
        (dict(causal=3), "causal must be one of"),
        (dict(softcap=-1.0), "softcap must be >= 0"),
        (dict(dropout_p=1.0, seed=1), r"dropout_p must be in \[0, 1\)"),
        (dict(dropout_p=0.1), "needs a seed"),
        (dict(dropout_p=0.1, seed=1.5), "seed must be an int"),
        (dict(alibi_slopes=torch.ones(2), bias=torch.zeros(7, 7)), "at most one of"),
        (dict(alibi_slopes=torch.ones(3)), "alibi_slopes must be"),
        (dict(bias=torch.zeros(7, 7, dtype=torch.int64)), "bias must be floating point"),
        (dict(rel_table=torch.zeros(4, 2)), "rel_table and rel_buckets go together"),
        (dict(rel_table=torch.zeros(4, 2), rel_buckets=torch.zeros(12, dtype=torch.int64)),
         r"rel_buckets must be integer \[Sq \+ Sk - 1 = 13\]"),
        (dict(rel_table=torch.zeros(4, 2), rel_buckets=torch.full((13,), 4)), "must index rel_table's 4 buckets"),
        (dict(rel_table=torch.zeros(4, 3), rel_buckets=torch.zeros(13, dtype=torch.int64)), "rel_table must be"),
        (dict(kv_lens=torch.ones(3, dtype=torch.int64)), r"kv_lens must be integer \[2\]"),
    ],
)
def test_rejects_bad_features(features, match):
    features = {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in features.items()}
    causal = features.pop("causal", CAUSAL_NONE)
    with pytest.raises(ValueError, match=match):
        triton_impl.forward(*qkv(), None, causal, **features)
