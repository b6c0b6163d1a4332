"""The cost model: its expressions against hand counts, and its predictions against the H100 anchors of docs/cost-model.md."""

import pytest
import sympy

from attnopt import cost, masks
from attnopt.cost import BN, DV, SK, SQ, B, C, D, E, H, H_KV, T
from attnopt.policy import Exact, Keep, Linear, Sigmoid, Sparse
from attnopt.report import Site


def shape(s, batch=1, heads=16, d=128, causal=False, kind="sdpa", **kw):
    return cost.Shape(batch, heads, heads, s, s, d, d, causal=causal, kind=kind, **kw)


def ms(c, sh):
    return 1e3 * cost.seconds(c, sh)


def _same(a, b):
    return sympy.simplify(a - b) == 0


def test_flop_and_byte_expressions_by_hand():
    whole = {SK: 64 * BN}  # whole tiles: ceil(S_k / B_N) = S_k / B_N
    # 4·B·H·Sq·Sk·D at Dv = D
    assert _same(cost.exact().flops.subs(whole), (2 * B * H * SQ * SK * (D + DV)).subs(whole))
    assert _same(cost.exact(causal=True).flops.subs(whole), (B * H * SQ * (SK + BN) * (D + DV)).subs(whole))
    assert _same(cost.sparse().flops, 2 * B * H * SQ * T * BN * (D + DV))
    assert _same(cost.exact().bytes, E * (B * H * SQ * (D + DV) + B * H_KV * SK * (D + DV)))
    assert _same(cost.sigmoid().flops, cost.exact().flops)
    per_token = cost.linear(causal=True, normalize=False).flops / (B * H * SQ)
    assert _same(per_token, 2 * C * (D + DV) + 4 * D * DV)
    assert per_token.subs({C: 64, D: 128, DV: 128}) == 98304
    assert _same(cost.linear(causal=False, normalize=False).flops, 2 * B * H * D * DV * (SQ + SK))
    eager = cost.eager(score_ops=3)
    assert _same(eager.bytes - eager.kernels[0].bytes - eager.kernels[2].bytes, 6 * E * B * H * SQ * SK)


def test_causal_flops_are_halved_up_to_the_diagonal_tiles():
    sh = shape(16384, causal=True)
    full, causal = (float(cost.exact(c).flops.subs(sh.values())) for c in (False, True))
    assert full == 4 * 16 * 16384**2 * 128 and causal / full == pytest.approx(0.5, rel=0.01)


@pytest.mark.parametrize("left,right", [(1023, 0), (64, 64), (100, 300), (0, 0), (None, 0)])
@pytest.mark.parametrize("s", [128, 1000, 1152, 4096, 32768])
def test_window_tiles_closed_form_matches_the_block_map(left, right, s):
    mask = masks.SlidingWindow(left, right)
    expr = cost.dense_tiles(True) if left is None else cost.window_tiles(left, right)
    assert float(expr.subs({SK: s, BN: cost.BLOCK})) == pytest.approx(cost.mask_tiles(mask, s, s))


# docs/cost-model.md, dense: SDPA flash (FA2) TFLOP/s, B·S = 16k, H16.
@pytest.mark.parametrize("d,s,causal,tflops", [
    (128, 16384, False, 353), (128, 16384, True, 325), (128, 4096, False, 340), (64, 16384, False, 308),
    (64, 16384, True, 277), (128, 1024, False, 323),
])  # fmt: skip
def test_dense_exact_matches_fa2_anchors(d, s, causal, tflops):
    sh = shape(s, batch=16384 // s, d=d, causal=causal)
    useful = 4 * sh.batch * 16 * s * s * d * (0.5 if causal else 1)
    assert useful / cost.seconds(cost.exact(causal), sh) / 1e12 == pytest.approx(tflops, rel=0.15)


# docs/cost-model.md: causal window 1024 (FlexAttention block mask) vs FA2 causal, B1 H16 D128, ms.
@pytest.mark.parametrize("s,window_ms,dense_ms", [(8192, 0.221, 0.958), (32768, 0.846, 12.8), (131072, 3.43, 235)])
def test_sliding_window_matches_anchors(s, window_ms, dense_ms):
    sh = shape(s, causal=True)
    window = cost.sparse(cost.window_tiles(1023, 0))
    assert ms(window, sh) == pytest.approx(window_ms, rel=0.1)
    assert ms(cost.exact(True), sh) == pytest.approx(dense_ms, rel=0.2)
    predicted = cost.predict_speedup(sh, Sparse(masks.SlidingWindow(1023, 0)))  # vs SDPA flash, causal
    assert predicted == pytest.approx(dense_ms / window_ms, rel=0.3)


# docs/cost-model.md: fla chunk_linear_attn (unnormalized) vs FA2 causal, H16 D128, ms.
@pytest.mark.parametrize("b,s,linear_ms,dense_ms", [
    (16, 4096, 0.972, 3.48), (4, 16384, 1.03, 12.7), (1, 65536, 1.06, 55.4),
])  # fmt: skip
def test_causal_linear_matches_anchors(b, s, linear_ms, dense_ms):
    sh = shape(s, batch=b, causal=True)
    linear = cost.linear(causal=True, normalize=False)
    assert ms(linear, sh) == pytest.approx(linear_ms, rel=0.2)
    assert ms(cost.exact(True), sh) / ms(linear, sh) == pytest.approx(dense_ms / linear_ms, rel=0.3)


def test_sigmoid_is_about_17_percent_faster_than_fa2():  # docs/cost-model.md
    sh = shape(16384)
    assert cost.seconds(cost.exact(), sh) / cost.seconds(cost.sigmoid(), sh) == pytest.approx(1.17, abs=0.05)


def test_crossovers():
    # Causal linear overtakes exact causal in the low thousands (the anchors: 3.6x faster already at 4k;
    # flash-linear-attention quotes "from about 4k tokens").
    (s,) = cost.crossover(cost.linear(causal=True, normalize=False), cost.exact(True), shape(1024, causal=True))
    assert 1000 < s < 4096
    # A causal window of 1024 tokens is causal attention until the sequence outgrows it (9 tiles of 128).
    assert cost.crossover(cost.sparse(cost.window_tiles(1023, 0)), cost.exact(True), shape(1024, causal=True)) == [1152]
    # Eager attention never catches up with the fused kernel; variants work as well as costs.
    assert cost.crossover(Keep(), Exact(), shape(1024, kind="manual")) == []
    with pytest.raises(ValueError, match="no cost model"):
        cost.crossover(object(), Exact(), shape(1024))


def _site(kind="manual", mask="additive", causal="none", seq=(13, 13)):
    return Site("h.0.attn", kind, 0, heads=(4, 4), head_dims=(16, 16), seq=seq, batch=2, mask=mask, causal=causal)


def test_predicted_speedups_of_variants():
    manual, flash = _site(), _site(kind="sdpa", mask="none", causal="top-left")
    assert cost.predict_speedup(manual, Keep()) == 1.0 and cost.predict_speedup(flash, Keep()) == 1.0
    assert cost.predict_speedup(flash, Exact(), 4096) == pytest.approx(1.0)  # both FA2-class
    assert 1 < cost.predict_speedup(manual, Exact()) < cost.predict_speedup(manual, Exact(), 4096)
    window = Sparse(masks.SlidingWindow(255, 0))
    assert cost.predict_speedup(flash, window, 32768) > 30  # 3 key tiles of 128 per query tile instead of 128.5
    assert cost.predict_speedup(flash, Linear(), 32768) > cost.predict_speedup(flash, Sigmoid(), 32768) > 1
    # Exact-sparse runs the site's own mask when it is structured, else the exact kernel.
    own = shape(32768, causal=True, own_mask=masks.SlidingWindow(4095, 0))
    assert cost.predict_speedup(own, Sparse("auto")) == pytest.approx(16384 / 4096, rel=0.1)  # causal: 16k keys
    assert cost.predict_speedup(shape(32768, causal=True), Sparse("auto")) == pytest.approx(1.0)
    assert cost.predict_speedup(_site(seq=("s0", "s0")), Exact()) is None
    assert cost.predict_speedup(_site(seq=("s0", "s0")), Exact(), 1024) is not None
    assert cost.predict_speedup(manual, object()) is None
