"""Dynamic-sparse attention against the dense reference of its own selection: the block-list CPU path, the
custom ops (forward and backward, GQA, odd sizes, causal and key padding), the estimators and the selection
rules; planted needles; allocations linear in S."""

import dataclasses

import pytest
import torch

import attnopt  # noqa: F401  (registers the ops)
from attnopt import masks
from attnopt.codegen.spec import CAUSAL_BOTTOM_RIGHT, CAUSAL_NONE, CAUSAL_TOP_LEFT
from attnopt.kernels.dynamic import blocks, cpu, estimate, near, ops, reference, select
from attnopt.masks.dynamic import ESTIMATORS

F64 = dict(atol=1e-10, rtol=1e-10)


def qkv(b=2, hq=4, hkv=2, sq=37, sk=53, d=8, dtype=torch.float64, seed=0, grad=False):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(b, h, s, d, generator=g, dtype=dtype).requires_grad_(grad)
                 for h, s in ((hq, sq), (hkv, sk), (hkv, sk)))  # fmt: skip


def random_selection(b, h, sq, sk, bm, bn, density=0.5, seed=0):
    g = torch.Generator().manual_seed(seed)
    chosen = torch.rand(b, h, blocks.num_blocks(sq, bm), blocks.num_blocks(sk, bn), generator=g) < density
    return blocks.from_dense(chosen)


def _padding(b, sk):
    kv = torch.ones(b, sk, dtype=torch.bool)
    kv[-1, sk - 5:] = False
    return kv


CASES = [  # b, hq, hkv, sq, sk, bm, bn, causal, heads of the selection, padding
    (2, 4, 2, 37, 53, 8, 16, CAUSAL_BOTTOM_RIGHT, 4, True),
    (1, 3, 1, 45, 45, 16, 8, CAUSAL_TOP_LEFT, 3, False),
    (2, 2, 2, 20, 33, 8, 8, CAUSAL_NONE, 1, True),
    (1, 4, 4, 64, 64, 16, 16, CAUSAL_BOTTOM_RIGHT, 4, False),
]


@pytest.mark.parametrize("b,hq,hkv,sq,sk,bm,bn,causal,hs,pad", CASES)
def test_cpu_path_matches_dense_reference_forward_and_backward(b, hq, hkv, sq, sk, bm, bn, causal, hs, pad):
    q, k, v = qkv(b, hq, hkv, sq, sk)
    num, idx = random_selection(b, hs, sq, sk, bm, bn)
    kv_valid = _padding(b, sk) if pad else None
    out, lse = cpu.forward(q, k, v, num, idx, bm, bn, causal, kv_valid, 0.3)
    r_out, r_lse = reference.attention_forward(q, k, v, num, idx, bm, bn, causal, kv_valid, 0.3)
    torch.testing.assert_close(out, r_out, **F64)
    assert torch.equal(lse.isinf(), r_lse.isinf())  # rows that see nothing: -inf in both
    torch.testing.assert_close(lse.nan_to_num(neginf=0), r_lse.nan_to_num(neginf=0), **F64)
    dout = torch.randn_like(out)
    got = cpu.backward(dout, q, k, v, out, lse, num, idx, bm, bn, causal, kv_valid, 0.3)
    want = reference.attention_backward(dout, q, k, v, r_out, r_lse, num, idx, bm, bn, causal, kv_valid, 0.3)
    for a, w in zip(got, want):
        torch.testing.assert_close(a, w, **F64)


def test_op_autograd_matches_reference_fp32_gqa():
    q, k, v = qkv(1, 6, 2, 70, 70, 16, torch.float32, grad=True)
    num, idx = random_selection(1, 6, 70, 70, 16, 16, 0.4)
    out, _ = torch.ops.attnopt.block_sparse_attention(q, k, v, num, idx, None, 16, 16, CAUSAL_BOTTOM_RIGHT, 0.25)
    ref, _ = reference.attention_forward(q, k, v, num, idx, 16, 16, CAUSAL_BOTTOM_RIGHT, None, 0.25)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)
    dout = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), dout)
    want = torch.autograd.grad(ref, (q, k, v), dout)
    for a, w in zip(got, want):
        torch.testing.assert_close(a, w, atol=5e-5, rtol=5e-5)


def test_op_opcheck():
    q, k, v = qkv(1, 4, 2, 40, 40, 8, torch.float32)
    num, idx = random_selection(1, 4, 40, 40, 16, 16)
    torch.library.opcheck(torch.ops.attnopt.block_sparse_attention, (q, k, v, num, idx, None, 16, 16, 2, 0.3))


def test_bad_selection_is_refused_by_name():
    q, k, v = qkv(1, 2, 2, 32, 32, 8, torch.float32)
    num, idx = random_selection(1, 2, 32, 32, 16, 16)
    with pytest.raises(ValueError, match="int32"):
        torch.ops.attnopt.block_sparse_attention(q, k, v, num.long(), idx, None, 16, 16, 0, 0.3)
    with pytest.raises(ValueError, match="kv_num must be"):
        torch.ops.attnopt.block_sparse_attention(q, k, v, num[:, :, :1], idx[:, :, :1], None, 16, 16, 0, 0.3)


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_estimators_are_distributions_over_allowed_blocks(estimator):
    assert set(ESTIMATORS) == set(estimate.ESTIMATORS)
    q, k, _ = qkv(1, 4, 2, 150, 150, 16, torch.float32)
    p = estimate.estimate(estimator, q, k, 32, 32, 0)
    allowed = blocks.allowed_blocks(150, 150, 32, 32, 0)
    assert p.shape == (1, 4, 5, 5)
    torch.testing.assert_close(p.sum(-1), torch.ones(1, 4, 5), atol=1e-5, rtol=0)
    assert not (p[..., ~allowed] > 0).any()


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_dynamic_op_matches_reference_of_its_own_selection(estimator):
    """The op's output and gradients equal dense attention on the block mask it chose (GQA, odd sizes, causal)."""
    q, k, v = qkv(2, 4, 2, 77, 77, 16, torch.float32, grad=True)
    options = (("stride", 8),) if estimator == "antidiagonal" else ()
    mask = masks.Dynamic(estimator, block=16, threshold=0.7, options=options)
    out, lse, num, idx = torch.ops.attnopt.dynamic_attention(q, k, v, None, CAUSAL_BOTTOM_RIGHT, 0.25, mask.key())
    ref, _ = reference.attention_forward(q, k, v, num, idx, 16, 16, CAUSAL_BOTTOM_RIGHT, None, 0.25)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)
    dout = torch.randn_like(out)
    for a, w in zip(torch.autograd.grad(out, (q, k, v), dout), torch.autograd.grad(ref, (q, k, v), dout)):
        torch.testing.assert_close(a, w, atol=5e-5, rtol=5e-5)
    stats = ops.last_stats(mask.key())
    assert 0.0 < stats["density_min"] <= stats["density_mean"] <= stats["density_max"] <= 1.0


def test_selection_keeps_sinks_and_local_blocks_and_respects_causal():
    probs = torch.zeros(1, 1, 8, 8)
    probs[..., 3] = 1.0  # all mass on key block 3
    num, idx = select.select(probs, 128, 128, 16, 16, 0, top_k=1, sink=1, local=2)  # 32 keys before each query
    chosen = blocks.dense_blocks(num, idx, 8)[0, 0]
    allowed = blocks.allowed_blocks(128, 128, 16, 16, 0)
    assert not (chosen & ~allowed).any()
    for i in range(8):
        want = {0, i, max(i - 1, 0), max(i - 2, 0)} | ({3} if i >= 3 else set())
        assert set(torch.nonzero(chosen[i]).flatten().tolist()) == want


def test_threshold_reaches_the_mass_with_the_fewest_blocks():
    probs = torch.tensor([0.1, 0.5, 0.35, 0.05]).view(1, 1, 1, 4)
    num, idx = select.select(probs, 16, 64, 16, 16, None, threshold=0.75, sink=0, local=0)
    assert sorted(idx[0, 0, 0, :num[0, 0, 0]].tolist()) == [1, 2]
    # Kept blocks 0, 1 hold 0.6 >= threshold 0.5, yet block 2 holds 0.35 / 0.4 >= (1 - 0.5) / 2 of the rest.
    num, idx = select.select(probs, 16, 64, 16, 16, None, threshold=0.5, sink=2, local=0)
    assert sorted(idx[0, 0, 0, :num[0, 0, 0]].tolist()) == [0, 1, 2]


def _needles(s, d=32, heads=2, block=64, seed=0):
    """Queries of block i = 3·j + 1 point at key block j (far back), over attention sinks (the first keys align
    with every query) and local smoothness (q and k share a slow random walk): the planted block is each query
    block's only strong far key block, next to a strong diagonal and sink."""
    g = torch.Generator().manual_seed(seed)
    omega = torch.rand(d // 2, generator=g) * (2 * torch.pi / 128)  # periods of 128 tokens and more
    angle = torch.arange(s)[:, None] * omega
    smooth = 2.5 * torch.cat([angle.cos(), angle.sin()], -1) / (d // 2) ** 0.25  # q_i · k_j falls with |i - j|
    q = torch.randn(1, heads, s, d, generator=g) * 0.3 + smooth
    k = torch.randn(1, heads, s, d, generator=g) * 0.3 + smooth
    sink = torch.randn(d, generator=g)
    q += 2.0 * sink / sink.norm()
    k[:, :, :4] += 2.0 * sink / sink.norm()
    planted = {}
    nb = s // block
    for j in range(1, nb // 3):
        i = 3 * j + 1
        direction = torch.randn(d, generator=g)
        direction = 4.0 * direction / direction.norm()
        q[:, :, i * block:(i + 1) * block] += direction
        k[:, :, j * block:(j + 1) * block] += direction
        planted[i] = j
    return q, k, planted


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_planted_needles_are_recalled(estimator):
    """Every estimator finds every planted far block at threshold 0.9 (S = 2048, sinks and local structure)."""
    q, k, planted = _needles(2048)
    options = (("stride", 16),) if estimator == "antidiagonal" else ()
    mask = masks.Dynamic(estimator, block=64, threshold=0.9, options=options)
    num, idx = ops.select_blocks(q, k, mask, CAUSAL_BOTTOM_RIGHT)
    chosen = blocks.dense_blocks(num, idx, 32)
    assert all(bool(chosen[0, :, i, j].all()) for i, j in planted.items())


@pytest.mark.parametrize("sq,sk,bm,bn,causal,sink,local", [
    (77, 77, 16, 16, CAUSAL_BOTTOM_RIGHT, 1, 1),  # square blocks: the shifted-view path
    (45, 70, 8, 16, CAUSAL_BOTTOM_RIGHT, 2, 1),  # non-square blocks, Sq < Sk: the gather path
    (40, 40, 16, 16, CAUSAL_NONE, 1, 2),
])  # fmt: skip
def test_near_blocks_hold_their_exact_mass_on_sampled_rows(sq, sk, bm, bn, causal, sink, local):
    """near_logmass against the dense scores of the same rows and blocks (GQA, odd sizes)."""
    q, k, _ = qkv(2, 4, 2, sq, sk, 8, torch.float32)
    offset = blocks.causal_offset(causal, sq, sk)
    got = near.near_logmass(q, k, bm, bn, offset, 0.3, rows=3, sink=sink, local=local)
    nq, nk = blocks.num_blocks(sq, bm), blocks.num_blocks(sk, bn)
    scores = torch.matmul(q, k.repeat_interleave(2, 1).transpose(-2, -1)) * 0.3  # [B, Hq, Sq, Sk]
    keys = torch.arange(sk)
    for i in range(nq):
        rows = [min(i * bm + (t + 1) * bm // 3 - 1, sq - 1) for t in range(3)]
        last = min(i * bm + bm - 1, sq - 1) + sk - sq
        near_cols = set(range(min(sink, nk))) | {last // bn - t for t in range(local + 1) if last // bn - t >= 0}
        for j in range(nk):
            if j not in near_cols:
                assert got[:, :, i, j].isnan().all()
                continue
            inside = (keys >= j * bn) & (keys < (j + 1) * bn)
            s = scores[:, :, rows].masked_fill(~inside, float("-inf"))
            if offset is not None:
                s = s.masked_fill(keys[None, :] > torch.tensor(rows)[:, None] + offset, float("-inf"))
            want = torch.logsumexp(torch.logsumexp(s, -1), -1) - torch.log(torch.tensor(3.0))
            torch.testing.assert_close(got[:, :, i, j], want, atol=1e-5, rtol=1e-5)


def test_pooled_far_logit_is_the_gaussian_log_mass_of_the_pair():
    """pooled: a far block's logit is ``log n + E[s] + Var[s]/2`` over the pair's scores (channels independent),
    a near block's its exact log-mass; one query block, key blocks 0 (sink), 1 (far), 2 and 3 (diagonal band)."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 1, 16, 4, generator=g)
    k = torch.randn(1, 1, 64, 4, generator=g) * torch.tensor([1.0, 0.5, 2.0, 0.1])
    p = estimate.pooled(q, k, 16, 16, None, 0.5, rows=2)
    exact = near.near_logmass(q, k, 16, 16, None, 0.5, rows=2)
    assert exact[0, 0, 0, 1].isnan() and not exact[0, 0, 0, [0, 2, 3]].isnan().any()
    qs, ks = q[0, 0], k[0, 0, 16:32]
    var = (qs.square().mean(0) * ks.square().mean(0) - qs.mean(0).square() * ks.mean(0).square()).sum() * 0.25
    far = 0.5 * qs.mean(0) @ ks.mean(0) + var / 2 + torch.log(torch.tensor(16.0))
    torch.testing.assert_close(p[0, 0, 0, 1].log() - p[0, 0, 0, 0].log(), far - exact[0, 0, 0, 0])


def test_pooled_sub_blocks_keep_the_mass_a_few_rows_give():
    """pooled(sub=...): a query block's distribution is the mean of its sub-blocks'. Rows 0..7 of the only query
    block attend to key block 1 and rows 8..31 to key block 2 (true mean masses 0.25 and 0.75): one pooled mean
    over all rows misjudges the split, sub-blocks of 8 rows find it; sub = block_m is the plain estimator; a sub
    that does not divide block_m is refused."""
    g = torch.Generator().manual_seed(0)
    d, u, w = 16, torch.eye(16)[0] * 6, torch.eye(16)[1] * 6
    q = torch.randn(1, 1, 32, d, generator=g) * 0.1
    k = torch.randn(1, 1, 64, d, generator=g) * 0.1
    q[0, 0, :8] += u
    q[0, 0, 8:] += w
    k[0, 0, 16:32] += u
    k[0, 0, 32:48] += w
    truth = torch.softmax(q[0, 0] @ k[0, 0].T * 0.25, -1).view(32, 4, 16).sum(-1).mean(0)
    plain = estimate.pooled(q, k, 32, 16, None, 0.25, rows=2)
    fine = estimate.pooled(q, k, 32, 16, None, 0.25, rows=2, sub=8)
    torch.testing.assert_close(estimate.pooled(q, k, 32, 16, None, 0.25, rows=2, sub=32), plain)
    torch.testing.assert_close(fine[0, 0, 0], truth, atol=0.01, rtol=0)
    assert float((plain[0, 0, 0] - truth).abs().max()) > 0.2
    with pytest.raises(ValueError, match="sub=12 must divide block_m=32"):
        estimate.pooled(q, k, 32, 16, None, 0.25, sub=12)


def test_lsh_agreement_estimates_the_angle():
    """lsh: a query block and a key block of one repeated vector each, at angle θ: the estimated logit ratio of
    two such key blocks follows ``|q| |k| cos θ · scale`` within the SimHash error (P = 512 hyperplanes)."""
    d = 16
    u, w = torch.eye(d)[0], torch.eye(d)[1]
    key_a = torch.cos(torch.tensor(0.5)) * u + torch.sin(torch.tensor(0.5)) * w  # 0.5 rad from u
    key_b = torch.cos(torch.tensor(1.5)) * u + torch.sin(torch.tensor(1.5)) * w  # 1.5 rad
    q = (3.0 * u).expand(1, 1, 16, d)
    k = torch.cat([torch.zeros(16, d), 3.0 * key_a.expand(16, d), 3.0 * key_b.expand(16, d), torch.zeros(48, d)])
    p = estimate.lsh(q, k[None, None], 16, 16, None, 1.0, rows=1)  # key blocks 1 and 2 are far
    want = 9.0 * (torch.cos(torch.tensor(0.5)) - torch.cos(torch.tensor(1.5)))
    assert abs(float(p[0, 0, 0, 1].log() - p[0, 0, 0, 2].log()) - float(want)) < 0.1 * float(want)


def test_dynamic_policy_strings_round_trip():
    from attnopt.policy import parse_variant

    v = parse_variant("dynamic:antidiagonal,block=32x64,top_k=4,stride=8")
    assert v.mask == masks.Dynamic("antidiagonal", block=(32, 64), top_k=4, options=(("stride", 8),))
    assert parse_variant(v.to_string()) == v
    assert parse_variant("dynamic").mask == masks.Dynamic()
    with pytest.raises(ValueError, match="unknown estimator"):
        parse_variant("dynamic:nope")
    with pytest.raises(ValueError, match="top_k or threshold"):
        masks.Dynamic(top_k=2, threshold=0.5)


# --- the generated Triton kernels, in Triton's CPU interpreter ---------------------------------------------
@pytest.fixture
def _kernel_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTNOPT_CACHE_DIR", str(tmp_path))


TRITON_CASES = [  # b, hq, hkv, sq, sk, bm, bn, causal, heads of the selection, padding, key columns per step
    (2, 4, 2, 37, 53, 16, 16, CAUSAL_BOTTOM_RIGHT, 4, True, None),
    (1, 3, 1, 45, 45, 32, 16, CAUSAL_TOP_LEFT, 1, False, None),
    (1, 2, 2, 50, 70, 16, 32, CAUSAL_NONE, 2, True, 16),  # half key blocks per step (the sm_80 backward)
]


@pytest.mark.usefixtures("_kernel_cache")
@pytest.mark.parametrize("b,hq,hkv,sq,sk,bm,bn,causal,hs,pad,cols", TRITON_CASES)
def test_triton_kernels_match_dense_reference(monkeypatch, b, hq, hkv, sq, sk, bm, bn, causal, hs, pad, cols):
    from attnopt.kernels.dynamic import render, triton_impl

    if cols is not None:  # the first spec steps through half key blocks
        real = render.specs
        monkeypatch.setattr(triton_impl, "specs", lambda *a: [dataclasses.replace(s, block_c=cols) for s in real(*a)])
    q, k, v = qkv(b, hq, hkv, sq, sk, 16, torch.float32)
    num, idx = random_selection(b, hs, sq, sk, bm, bn)
    kv_valid = _padding(b, sk) if pad else None
    out, lse = triton_impl.forward(q, k, v, num, idx, bm, bn, causal, kv_valid, 0.3)
    r_out, r_lse = reference.attention_forward(q, k, v, num, idx, bm, bn, causal, kv_valid, 0.3)
    torch.testing.assert_close(out, r_out, atol=2e-5, rtol=2e-5)
    assert torch.equal(lse.isinf(), r_lse.isinf())
    dout = torch.randn_like(out)
    got = triton_impl.backward(dout, q, k, v, out, lse, num, idx, bm, bn, causal, kv_valid, 0.3)
    want = reference.attention_backward(dout, q, k, v, r_out, r_lse, num, idx, bm, bn, causal, kv_valid, 0.3)
    for a, w in zip(got, want):
        torch.testing.assert_close(a, w, atol=5e-5, rtol=5e-5)


def test_triton_refuses_blocks_it_cannot_tile():
    from attnopt.kernels.dynamic import triton_impl

    q, k, v = qkv(1, 2, 2, 40, 40, 16, torch.float32)
    num, idx = random_selection(1, 2, 40, 40, 24, 24)
    with pytest.raises(ValueError, match="powers of two in 16..128"):
        triton_impl.forward(q, k, v, num, idx, 24, 24)


def test_aot_scenarios_cover_the_dynamic_kernels():
    from attnopt.kernels import aot_scenarios

    launches = aot_scenarios.capture([s for s in aot_scenarios.scenarios() if s.family == "dynamic"])
    assert {launch.name for launch in launches} == {"dynamic_d64_b64.fwd", "dynamic_d64_b64.bwd",
                                                    "dynamic_d128_b64_padding.fwd", "dynamic_d128_b64_padding.bwd"}
    spec = launches[-1].spec
    assert aot_scenarios.arch_spec("dynamic", spec, 80).block_c == spec.block_n // 2  # sm_80: half key blocks
    assert aot_scenarios.arch_spec("dynamic", spec, 90).block_c == spec.block_n


# --- decode-time page selection ---------------------------------------------------------------------------
def test_page_summaries_follow_appends():
    from attnopt.kernels.dynamic import decode

    g = torch.Generator().manual_seed(0)
    k, v = torch.randn(2, 2, 75, 8, generator=g), torch.randn(2, 2, 75, 8, generator=g)
    cache = decode.PageCache(2, 2, 8, 8, 80, page=16)
    for a, b in ((0, 5), (5, 40), (40, 41), (41, 75)):
        cache.append(k[:, :, a:b], v[:, :, a:b])
    assert cache.pages == 5
    for p in range(5):
        part = k[:, :, p * 16:min(p * 16 + 16, 75)]
        assert torch.equal(cache.k_min[:, :, p], part.amin(2)) and torch.equal(cache.k_max[:, :, p], part.amax(2))


def test_page_attention_matches_dense_reference_of_its_pages_gqa():
    from attnopt.kernels.dynamic import decode
    from attnopt.kernels.exact import reference as exact

    g = torch.Generator().manual_seed(1)
    k, v = torch.randn(1, 2, 90, 16, generator=g), torch.randn(1, 2, 90, 16, generator=g)
    cache = decode.PageCache(1, 2, 16, 16, 100, page=8)
    cache.append(k, v)
    q = torch.randn(1, 6, 1, 16, generator=g)
    pages = decode.select_pages(q, cache, top_k=3)
    assert pages.shape == (1, 2, 5) and bool((pages[..., 0] == 0).all()) and bool((pages[..., -1] == 11).all())
    keep = torch.zeros(1, 2, 1, 90, dtype=torch.bool)
    for h in range(2):
        for p in pages[0, h].tolist():
            keep[0, h, 0, p * 8:p * 8 + 8] = True
    want, _ = exact.attention_forward(q, k.repeat_interleave(3, 1), v.repeat_interleave(3, 1),
                                      keep.repeat_interleave(3, 1), scale=0.25)  # fmt: skip
    torch.testing.assert_close(decode.page_attention(q, cache, pages, 0.25), want, atol=1e-5, rtol=1e-5)
    # Quest's bound: a page's score is at least the best q · k inside it (summed over the group's heads).
    lo, hi = cache.k_min[0, :, :12], cache.k_max[0, :, :12]
    qg = q[0, :, 0].view(2, 3, 16)
    bound = (torch.maximum(qg[:, :, None] * lo[:, None], qg[:, :, None] * hi[:, None])).sum(-1)  # [Hkv, G, N]
    best = (qg @ k[0].transpose(-2, -1)).view(2, 3, -1)
    best = torch.nn.functional.pad(best, (0, 6), value=float("-inf")).view(2, 3, 12, 8).amax(-1)
    assert bool((bound >= best - 1e-5).all())


def test_planted_retrieval_decodes_the_same_tokens_with_10_percent_of_pages():
    from attnopt.kernels.dynamic import decode

    g = torch.Generator().manual_seed(0)
    vocab, d, s = 4096, 64, 4096
    # Keys on a few channels each, as LLM keys concentrate on few channels (Quest's bound relies on it: with
    # isotropic random keys, pages of 16 random keys all bound high and the planted page can rank low).
    keys = torch.randn(vocab, d, generator=g) * (torch.rand(vocab, d, generator=g) < 0.125)
    keys = torch.nn.functional.normalize(keys, dim=-1) * 4
    values = torch.nn.functional.normalize(torch.randn(vocab, d, generator=g), dim=-1)
    chain = torch.arange(12)  # tokens 0..11 planted in order; the prompt ends with token 0
    prompt = torch.randint(100, vocab, (s,), generator=g)
    prompt[1000:1012] = chain
    prompt[-1] = 0
    exact_tokens, _ = decode.retrieval_decode(prompt, keys, values, 10, (4, 2))
    paged_tokens, _ = decode.retrieval_decode(prompt, keys, values, 10, (4, 2), top_k=s // 16 // 10)
    assert exact_tokens == list(range(1, 11))
    assert paged_tokens == exact_tokens


# --- memory ---------------------------------------------------------------------------------------------
class _Peak(torch.utils._python_dispatch.TorchDispatchMode):
    """Peak bytes of live tensors made while active (weak references: freed tensors stop counting)."""

    def __init__(self):
        super().__init__()
        import weakref

        self.live, self.peak, self._ref = {}, 0, weakref.ref

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {a.untyped_storage().data_ptr() for a in torch.utils._pytree.tree_leaves((args, kwargs))
                  if isinstance(a, torch.Tensor)}  # fmt: skip
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                key = t.untyped_storage().data_ptr()
                if key not in self.live:
                    self.live[key] = (self._ref(t), t.untyped_storage().nbytes())
        self.live = {k: (r, n) for k, (r, n) in self.live.items() if r() is not None}
        self.peak = max(self.peak, sum(n for _, n in self.live.values()))
        return out


def _dynamic_peak(s: int) -> int:
    q, k, v = qkv(1, 2, 2, s, s, 32, torch.float32, grad=True)
    key = masks.Dynamic("pooled", block=64, top_k=4).key()
    with _Peak() as mode:
        out = torch.ops.attnopt.dynamic_attention(q, k, v, None, CAUSAL_BOTTOM_RIGHT, 0.2, key)[0]
        out.sum().backward()
    return mode.peak


def test_peak_memory_grows_linearly_in_s():
    """S = 8k and 16k, estimation, forward and backward: the live tensors at their peak at most double (an
    [S, S] buffer would quadruple them; at 16k one fp32 [S, S] head alone is 1 GiB)."""
    small, large = _dynamic_peak(8192), _dynamic_peak(16384)
    assert large <= 2.2 * small, (small, large)
    assert large < 16384 * 16384 * 4 / 4
