"""Sparse attention kernels against the dense-mask reference: the generated Triton kernels (in Triton's CPU
interpreter), the blockwise CPU path and the custom ops, forward and backward, on small odd shapes."""

import functools
from types import SimpleNamespace

import pytest
import torch

import attnopt  # noqa: F401  (registers the ops)
from attnopt import masks
from attnopt.kernels.exact import reference as exact_reference
from attnopt.kernels.sparse import blockwise, ops, reference, triton_impl
from attnopt.kernels.sparse.render import SparseKernelSpec, load_kernel, render

FP32 = dict(atol=2e-5, rtol=2e-5)
FP16 = dict(atol=3e-3, rtol=3e-3)


@pytest.fixture(autouse=True, scope="module")
def _kernel_cache(tmp_path_factory):
    """Generated kernels go to a temporary cache, not the user's."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ATTNOPT_CACHE_DIR", str(tmp_path_factory.mktemp("attnopt_cache")))
        yield


def qkv(b=2, hq=4, hkv=2, sq=37, sk=37, d=16, dv=None, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    dv = d if dv is None else dv
    q = torch.randn(b, hq, sq, d, generator=g).to(dtype)
    k = torch.randn(b, hkv, sk, d, generator=g).to(dtype)
    v = torch.randn(b, hkv, sk, dv, generator=g).to(dtype)
    return q, k, v


def _padding(b, sk):
    kv = torch.ones(b, sk, dtype=torch.bool)
    kv[-1, sk - 4:] = False
    return kv


def _doc(b, h, q, k):
    return (q // 6 == k // 6) | (k == 0)


def _layout(h, nq, nk, seed=0):
    lay = torch.rand(h, nq, nk, generator=torch.Generator().manual_seed(seed)) < 0.45
    lay[:, :, 0] = True
    return lay


MASKS = {
    "causal": masks.causal(),
    "window": masks.SlidingWindow(5, 2),
    "window_dilated": masks.SlidingWindow(3, 1, dilation=2) & masks.causal(),
    "nbhd_1d": masks.Neighborhood(5, dilation=2, stride=2),
    "nbhd_2d_cls": masks.Neighborhood((3, 5), grid=(6, 6), global_tokens=1),
    "nbhd_3d_causal": masks.Neighborhood(3, causal=(True, False, False), grid=(3, 4, 3), global_tokens=1),
    "nbhd_2d_tiled": masks.Neighborhood((3, 5), grid=(4, 9), tile=(2, 3), global_tokens=1).tiled(),
    "blocked": masks.Blocked(6) | masks.SlidingWindow(1, 1),
    "global_local": masks.GlobalLocal(3, masks.SlidingWindow(4, 0)) & masks.causal(),
    "strided": masks.Strided(3, 1) & masks.causal(),
    "block_sparse": masks.BlockSparse(_layout(4, 3, 3), block=16),
    "mask_mod": masks.from_mask_mod(_doc),
}


def _check(got, want, tol):
    torch.testing.assert_close(got[0], want[0], **tol)
    torch.testing.assert_close(got[1], want[1].to(got[1].dtype), **tol)


@pytest.mark.parametrize("name", sorted(MASKS))
def test_triton_forward_and_backward_match_the_reference(name):
    """Every mask, GQA (4 query heads on 2 key/value heads), key padding, 16x16 tiles over 37 tokens."""
    mask = MASKS[name]
    q, k, v = qkv(b=1)
    kv = _padding(1, 37)
    out, lse = triton_impl.forward(q, k, v, mask, kv, None, 0.3, 0.0, 16, 16)
    ref_out, ref_lse = reference.attention_forward(q, k, v, mask, kv, None, 0.3)
    _check((out, lse), (ref_out, ref_lse), FP32)
    dout = torch.randn_like(out)
    grads = triton_impl.backward(dout, q, k, v, out, lse, mask, kv, None, 0.3, 0.0, 16, 16)
    want = reference.attention_backward(dout, q, k, v, ref_out, ref_lse, mask, kv, None, 0.3)
    for got, ref in zip(grads, want):
        torch.testing.assert_close(got, ref, **FP32)


@pytest.mark.parametrize("sq, sk, d, dv, extra", [(19, 45, 24, 16, "bool"), (45, 19, 16, 40, "additive"),
                                                   (1, 33, 16, 16, None)])  # fmt: skip
def test_triton_odd_shapes_extra_masks_and_softcap(sq, sk, d, dv, extra):
    mask = masks.SlidingWindow(7, 3)
    q, k, v = qkv(b=1, hq=3, hkv=1, sq=sq, sk=sk, d=d, dv=dv)
    g = torch.Generator().manual_seed(1)
    attn_mask = None
    if extra == "bool":
        attn_mask = torch.rand(1, 3, sq, sk, generator=g) > 0.2
    elif extra == "additive":
        attn_mask = torch.randn(1, 1, sq, sk, generator=g)
    out, lse = triton_impl.forward(q, k, v, mask, None, attn_mask, 0.25, 5.0, 16, 16)
    ref = reference.attention_forward(q, k, v, mask, None, attn_mask, 0.25, 5.0)
    _check((out, lse), ref, FP32)
    dout = torch.randn_like(out)
    grads = triton_impl.backward(dout, q, k, v, out, lse, mask, None, attn_mask, 0.25, 5.0, 16, 16)
    want = reference.attention_backward(dout, q, k, v, ref[0], ref[1], mask, None, attn_mask, 0.25, 5.0)
    for got, r in zip(grads, want):
        torch.testing.assert_close(got, r, **FP32)


def test_triton_half_precision_and_default_tiles():
    q, k, v = qkv(b=1, hq=2, hkv=2, sq=70, sk=70, d=32, dtype=torch.float16)
    mask = masks.SlidingWindow(20, 0)
    out, lse = triton_impl.forward(q, k, v, mask)
    ref = reference.attention_forward(q.float(), k.float(), v.float(), mask)
    torch.testing.assert_close(out.float(), ref[0], **FP16)
    torch.testing.assert_close(lse, ref[1], **FP16)


def test_generated_source_is_specialized_and_readable():
    src = render(SparseKernelSpec(direction="fwd", head_dim=64, head_dim_v=64, dtype="float16", block_m=64,
                                  block_n=64, predicate=triton_impl.predicate_source(MASKS["window"])[0],
                                  mask="SlidingWindow(5, 2)"))  # fmt: skip
    assert "if kind == 1:" in src and "(cols2 >= ((rows2 + (seq_k - seq_q)) - 5))" in src
    assert "KvValid" not in src and "Extra" not in src and "Bits" not in src and "th = " not in src
    src_bits = render(SparseKernelSpec(direction="dkdv", head_dim=16, head_dim_v=16, dtype="float32", block_m=16,
                                       block_n=16, predicate="", mask="mask_mod", bits=True, padding=True))  # fmt: skip
    assert "tl.load(Bits + (kind - 2)" in src_bits and "KvValid" in src_bits
    with pytest.raises(ValueError, match="direction"):
        SparseKernelSpec(direction="sideways", head_dim=16, head_dim_v=16, dtype="float32", block_m=16, block_n=16,
                         predicate="", mask="")  # fmt: skip
    assert callable(load_kernel(SparseKernelSpec(direction="fwd", head_dim=16, head_dim_v=16, dtype="float32",
                                                 block_m=16, block_n=16, predicate="(cols2 >= 0)", mask="x")))  # fmt: skip


@pytest.mark.parametrize("name", sorted(MASKS))
@pytest.mark.parametrize("softcap", [0.0, 3.0])
def test_blockwise_matches_the_reference_in_float64(name, softcap):
    mask = MASKS[name]
    q, k, v = qkv(dtype=torch.float64)
    kv = _padding(2, 37)
    extra = torch.rand(2, 1, 37, 37, generator=torch.Generator().manual_seed(2)) > 0.1
    out, lse = blockwise.forward(q, k, v, mask, kv, extra, 0.3, softcap, block_m=8, block_n=4)
    ref = reference.attention_forward(q, k, v, mask, kv, extra, 0.3, softcap)
    _check((out, lse), ref, dict(atol=1e-10, rtol=1e-10))
    assert torch.equal(lse.isinf(), ref[1].isinf())
    dout = torch.randn_like(out)
    grads = blockwise.backward(dout, q, k, v, out, lse, mask, kv, extra, 0.3, softcap, block_m=8, block_n=4)
    want = reference.attention_backward(dout, q, k, v, ref[0], ref[1], mask, kv, extra, 0.3, softcap)
    for got, r in zip(grads, want):
        torch.testing.assert_close(got, r, atol=1e-10, rtol=1e-10)


def test_blockwise_float32_fused_path_with_additive_mask():
    q, k, v = qkv(sq=45, sk=45)
    mask = masks.SlidingWindow(9, 0)
    extra = torch.randn(2, 4, 45, 45)
    out, lse = blockwise.forward(q, k, v, mask, None, extra, 0.3, block_m=16, block_n=8)
    ref = reference.attention_forward(q, k, v, mask, None, extra, 0.3)
    _check((out, lse), ref, FP32)


def test_sparse_op_autograd_and_fake():
    q, k, v = (t.double().requires_grad_() for t in qkv(b=1, hq=2, hkv=1, sq=7, sk=7, d=4))
    key = masks.SlidingWindow(3, 0).key()

    def f(q, k, v):
        return torch.ops.attnopt.sparse_attention(q, k, v, None, None, key, 0.35, 0.0)[0]

    assert torch.autograd.gradcheck(f, (q, k, v))
    torch.library.opcheck(torch.ops.attnopt.sparse_attention.default, (q, k, v, None, None, key, 0.35, 0.0))

    @torch.compile(backend="aot_eager", fullgraph=True)
    def g(q, k, v):
        return f(q, k, v).sum()

    g(q, k, v).backward()
    assert q.grad is not None


def test_sparse_op_rejects_bad_inputs():
    q, k, v = qkv()
    key = masks.causal().key()
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        torch.ops.attnopt.sparse_attention(q[:, :3], k, v, None, None, key, 0.3, 0.0)
    with pytest.raises(ValueError, match="kv_valid"):
        torch.ops.attnopt.sparse_attention(q, k, v, None, torch.ones(2, 5, dtype=torch.bool), key, 0.3, 0.0)
    with pytest.raises(ValueError, match="Sq must equal Sk"):
        torch.ops.attnopt.sparse_attention(q, k[:, :, :30], v[:, :, :30], None, None,
                                           masks.Neighborhood(3).key(), 0.3, 0.0)  # fmt: skip


@pytest.mark.parametrize("mask", [masks.Neighborhood(3, grid=(4, 6), tile=(2, 3), global_tokens=1),
                                  masks.Neighborhood((3, 3), dilation=(1, 2), grid=(4, 8), tile=(2, 4), global_tokens=1)])  # fmt: skip
def test_op_reorders_tokens_into_spatial_tiles_and_back(mask):
    """A mask with a tile shape runs on tile-major tokens; outputs and gradients come back in the model's order."""
    s = 1 + mask.grid[0] * mask.grid[1]
    q, k, v = (t.double().requires_grad_() for t in qkv(b=2, hq=2, hkv=1, sq=s, sk=s, d=8))
    kv = _padding(2, s)
    out = torch.ops.attnopt.sparse_attention(q, k, v, None, kv, mask.key(), 0.3, 0.0)[0]
    ref_out, ref_lse = reference.attention_forward(q.detach(), k.detach(), v.detach(), mask, kv, None, 0.3)
    torch.testing.assert_close(out, ref_out)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    want = reference.attention_backward(dout, q.detach(), k.detach(), v.detach(), ref_out, ref_lse, mask, kv, None, 0.3)
    for got, r in zip(grads, want):
        torch.testing.assert_close(got, r)


_WIDTH = torch.tensor([2, 9])  # per batch row: how far back a query sees


def _by_batch(b, h, q, k):
    return (k <= q) & (k >= q - _WIDTH[b])


def _by_head(b, h, q, k):
    return ((q + k + h) % 3 == 0) | (q == k)


def _by_both(b, h, q, k):
    return _by_batch(b, h, q, k) | (k % 4 == h)


@pytest.mark.parametrize("fn, batch_dep, head_dep", [(_by_batch, True, False), (_by_head, False, True),
                                                     (_by_both, True, True), (_doc, False, False)])  # fmt: skip
@pytest.mark.parametrize("impl", [triton_impl, blockwise], ids=["triton", "blockwise"])
def test_mask_mod_depending_on_batch_row_and_head(fn, batch_dep, head_dep, impl):
    """Dependence on b and h is found from one call; each (b, h) gets its own tiles, forward and backward."""
    mask = masks.from_mask_mod(fn)
    assert (mask.batch_dependent(2), mask.heads_of(4) > 1) == (batch_dep, head_dep)
    q, k, v = qkv(sq=37, sk=37)
    idx = torch.arange(37)
    dense = fn(torch.arange(2).view(2, 1, 1, 1), torch.arange(4).view(1, 4, 1, 1), idx.view(37, 1), idx)  # the oracle
    out, lse = ops.forward(impl, q, k, v, mask, None, None, 0.3, 0.0)
    dense = dense.expand(2, 4, 37, 37)
    want = exact_reference.attention_forward(q, k, v, dense, 0.0, exact_reference.CAUSAL_NONE, 0.3)
    _check((out, lse), want, FP32)
    dout = torch.randn_like(out)
    grads = ops.backward(impl, dout, q, k, v, out, lse, mask, None, None, 0.3, 0.0)
    ref = exact_reference.attention_backward(dout, q, k, v, want[0], want[1], dense, 0.0, exact_reference.CAUSAL_NONE,
                                             0.3, None, False)  # fmt: skip
    for got, r in zip(grads, ref[:3]):
        torch.testing.assert_close(got, r, **FP32)


def _tiles(impl, bm, bn):
    """``impl`` (triton_impl or blockwise) with a fixed tile shape, as :mod:`attnopt.kernels.sparse.ops` calls it."""
    return SimpleNamespace(forward=functools.partial(impl.forward, block_m=bm, block_n=bn),
                           backward=functools.partial(impl.backward, block_m=bm, block_n=bn))  # fmt: skip


STRIDED = {  # mask, (B, Hq, Hkv, Sq, Sk), key padding, extra bool mask
    "r2_window": (masks.Strided(2, masks.SlidingWindow(3, 1)), (1, 4, 2, 37, 37), False, False),
    "r3_causal_gqa3": (masks.Strided(3, 1) & masks.causal(), (1, 6, 2, 45, 45), True, False),
    "r4_causal_sq_lt_sk": (masks.Strided(4, masks.SlidingWindow(5, 0)) & masks.causal(), (1, 4, 1, 29, 41), False, True),
    "r5_or_blocked": (masks.Strided(5, 0) | masks.Blocked(8), (1, 5, 5, 43, 43), True, False),
}


@pytest.mark.parametrize("name", sorted(STRIDED))
@pytest.mark.parametrize("impl", [_tiles(triton_impl, 16, 16), _tiles(blockwise, 8, 8)], ids=["triton", "blockwise"])
def test_strided_runs_on_keys_in_residue_order(name, impl):
    """The ops sort keys by residue (each head visits its own tiles) and match the dense reference of the mask in
    the model's order, forward and backward (GQA, odd sizes, causal and not, padding, an extra mask)."""
    mask, (b, hq, hkv, sq, sk), padded, extra = STRIDED[name]
    assert masks.residue_order(mask) is not None
    q, k, v = qkv(b=b, hq=hq, hkv=hkv, sq=sq, sk=sk)
    kv = _padding(b, sk) if padded else None
    attn_mask = torch.rand(b, 1, sq, sk, generator=torch.Generator().manual_seed(3)) > 0.2 if extra else None
    out, lse = ops.forward(impl, q, k, v, mask, kv, attn_mask, 0.3, 0.0)
    ref = reference.attention_forward(q, k, v, mask, kv, attn_mask, 0.3)
    _check((out, lse), ref, FP32)
    dout = torch.randn_like(out)
    grads = ops.backward(impl, dout, q, k, v, out, lse, mask, kv, attn_mask, 0.3, 0.0)
    want = reference.attention_backward(dout, q, k, v, ref[0], ref[1], mask, kv, attn_mask, 0.3)
    for got, r in zip(grads, want):
        torch.testing.assert_close(got, r, **FP32)


def test_strided_op_with_autograd():
    """Through the custom op (CPU: the blockwise path, one plan per head on its own tiles), in float64."""
    mask = masks.Strided(4, masks.SlidingWindow(9, 0)) & masks.causal()
    q, k, v = (t.double().requires_grad_() for t in qkv(b=1, hq=4, hkv=2, sq=150, sk=150, d=8))
    out = torch.ops.attnopt.sparse_attention(q, k, v, None, None, mask.key(), 0.3, 0.0)[0]
    ref_out, ref_lse = reference.attention_forward(q.detach(), k.detach(), v.detach(), mask, None, None, 0.3)
    torch.testing.assert_close(out, ref_out)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    want = reference.attention_backward(dout, q.detach(), k.detach(), v.detach(), ref_out, ref_lse, mask, None, None, 0.3)
    for got, r in zip(grads, want):
        torch.testing.assert_close(got, r)


def test_blockwise_plans_each_head_on_its_own_tiles():
    """A head-dependent mask on CPU: one plan per query head, over that head's tiles only (not their union)."""
    mask = masks.residue_order(masks.Strided(8, 0))
    s, hq = 4096, 8
    q, k = torch.zeros(1, hq, s, 4), torch.zeros(1, 2, s, 4)
    groups = list(blockwise._head_groups(mask, hq, 2))
    assert [head for _, _, head in groups] == list(range(hq))
    visited = mask.block_map(s, s, 64, 64, hq).visited()
    for heads, kv_heads, head in groups:
        plan = blockwise._setup(mask, q[:, heads], k[:, kv_heads], k[:, kv_heads], 64, 64, True, hq, head)
        keys = [sum(c1 - c0 for c0, c1 in segs) for segs in plan.segs]
        assert keys == (visited[head] * 64).tolist()
        assert max(keys) * 3 < s


SPLIT = {  # mask, (B, Hq, Hkv, S), tile shape, how the chunks' full keys are read (see plan.Plan.split)
    "strided_causal_gather": (masks.Strided(2, masks.SlidingWindow(20, 0)) & masks.causal(), (1, 2, 1, 77), (8, 4),
                              {"gather", "view 0"}),
    "strided_gqa3": (masks.Strided(3, masks.SlidingWindow(30, 4)), (2, 3, 1, 101), (16, 8), {"gather", "view 0"}),
    "global_local_stepped_view": (masks.GlobalLocal(5, 16), (2, 4, 2, 99), (16, 8), {"view 0", "view 16"}),
}


@pytest.mark.parametrize("name", sorted(SPLIT))
def test_blockwise_runs_full_and_boundary_keys_as_two_parts(name):
    """Chunks holding both full and boundary tiles run as two fused calls (boundary keys with the element test,
    full keys without, as a strided view of k or gathered) merged by their lse; the backward reuses the merged
    out and lse. Forward and backward match the dense reference (float32: the fused CPU kernels)."""
    mask, (b, hq, hkv, s), (bm, bn), reads = SPLIT[name]
    run = masks.residue_order(mask) or mask
    q, k, v = qkv(b=b, hq=hq, hkv=hkv, sq=s, sk=s, d=8)
    seen = set()
    for heads, kv_heads, head in blockwise._head_groups(run, hq, hkv):
        plan = blockwise._setup(run, q[:, heads], k[:, kv_heads], v[:, kv_heads], bm, bn, True, hq, head)
        for t0, t1, _ in plan.chunks:
            split = plan.split(t0, t1)
            if split is not None:
                seen.add("gather" if split[2] is None else f"view {split[3]}")
    assert seen == reads
    impl = _tiles(blockwise, bm, bn)
    out, lse = ops.forward(impl, q, k, v, mask, None, None, 0.3, 0.0)
    ref = reference.attention_forward(q, k, v, mask, None, None, 0.3)
    _check((out, lse), ref, FP32)
    dout = torch.randn_like(out)
    grads = ops.backward(impl, dout, q, k, v, out, lse, mask, None, None, 0.3, 0.0)
    want = reference.attention_backward(dout, q, k, v, ref[0], ref[1], mask, None, None, 0.3)
    for got, r in zip(grads, want):
        torch.testing.assert_close(got, r, **FP32)


def test_addresses_take_int64_tile_starts():
    """A tile's first row or key enters every address as int64 (``row0 * stride`` passes 2**31 on long or
    strided inputs); only the offsets within a tile are int32 products."""
    for direction in ("fwd", "dq", "dkdv"):
        src = render(SparseKernelSpec(direction=direction, head_dim=64, head_dim_v=64, dtype="float16", block_m=64,
                                      block_n=64, predicate="(cols2 >= 0)", mask="x", extra="bool"))  # fmt: skip
        assert "row0 = tl.cast(" in src and "col0 = tl.cast(" in src, direction
        assert "offs_m[:, None] * stride" not in src and "cols[None, :] * stride" not in src, direction
        assert "cols[:, None] * stride" not in src and "rows2 * stride" not in src, direction


def test_tile_table_per_generation():
    from attnopt.kernels.sparse.tiles import configs

    hopper, ampere = configs("dq", "bfloat16", 64, 64, (9, 0)), configs("dq", "bfloat16", 64, 64, (8, 0))
    assert hopper[0] != ampere[0] and len(hopper) > 1 and hopper[-1] == (16, 16, 4, 1)
    assert configs("fwd", "float32", 64, 64, (9, 0))[0] == (64, 32, 4, 2)
