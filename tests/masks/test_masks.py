"""Mask descriptors: semantics (as each mask module's docstring states), block maps against dense masks, closed forms, drawing, errors."""

import pytest
import sympy as sp
import torch

from attnopt import masks as M
from attnopt.masks.blockmap import KIND_BITS, KIND_FULL


def _dense_tiles(dense, bm, bn):
    """[H, nQ, nK] (any visible, all visible within bounds) of a dense [H, Sq, Sk] mask."""
    h, sq, sk = dense.shape
    nq, nk = -(-sq // bm), -(-sk // bn)
    pad = torch.zeros(h, nq * bm, nk * bn, dtype=torch.bool)
    inside = torch.zeros_like(pad)
    pad[:, :sq, :sk] = dense
    inside[:, :sq, :sk] = True
    t = pad.reshape(h, nq, bm, nk, bn)
    ins = inside.reshape(h, nq, bm, nk, bn)
    return t.any((2, 4)), (t | ~ins).all((2, 4)) & ins[:, :, :, :, :].any((2, 4))


def check_block_map(mask, sq, sk, bm, bn, heads=1):
    """Every visible element is in a visited tile, FULL tiles are entirely visible, runs are well formed."""
    dense = mask.dense(sq, sk, heads)
    any_vis, all_vis = _dense_tiles(dense, bm, bn)
    bmap = mask.block_map(sq, sk, bm, bn, heads)
    hm = bmap.heads
    assert hm == dense.shape[0]
    visited = torch.zeros(hm, *any_vis.shape[1:], dtype=torch.bool)
    h, row, col, kind = bmap.pairs()
    assert not visited[h, row, col].any()
    visited[h, row, col] = True
    assert (visited[h, row, col]).all()
    assert len(set(zip(h.tolist(), row.tolist(), col.tolist()))) == h.numel(), "a tile is visited twice"
    assert not (any_vis & ~visited).any(), "a visible element lies in a skipped tile"
    full = kind == KIND_FULL
    assert all_vis[h[full], row[full], col[full]].all(), "a FULL tile has a hidden element"
    assert ((col[full] + 1) * bn <= sk).all(), "a FULL tile crosses Sk"
    if bmap.tile_bits is not None:
        b = kind >= KIND_BITS
        for hh, r, c, k in zip(h[b].tolist(), row[b].tolist(), col[b].tolist(), kind[b].tolist()):
            want = torch.zeros(bm, bn, dtype=torch.bool)
            tile = dense[hh, r * bm:(r + 1) * bm, c * bn:(c + 1) * bn]
            want[:tile.shape[0], :tile.shape[1]] = tile
            assert torch.equal(bmap.tile_bits[k - KIND_BITS], want)
    # The transposed map lists the same tiles.
    th, trow, tcol, tkind = bmap.transpose().pairs()
    assert sorted(zip(th.tolist(), tcol.tolist(), trow.tolist(), tkind.tolist())) == sorted(
        zip(h.tolist(), row.tolist(), col.tolist(), kind.tolist()))
    return bmap, any_vis


def _layout(h, nq, nk, seed=0, p=0.4):
    g = torch.Generator().manual_seed(seed)
    lay = torch.rand(h, nq, nk, generator=g) < p
    lay[:, :, 0] = True
    return lay


def _doc_mask_mod(b, h, q, k):
    return (q // 5 == k // 5) | (k == 0)


MASKS = {
    "causal": M.causal(),
    "window": M.SlidingWindow(5, 2),
    "window_left": M.SlidingWindow(4, 0),
    "window_right_only": M.SlidingWindow(None, 3),
    "window_dilated": M.SlidingWindow(3, 1, dilation=3),
    "full": M.SlidingWindow(None, None),
    "nbhd_1d": M.Neighborhood(5),
    "nbhd_1d_even": M.Neighborhood(4),
    "nbhd_1d_dil": M.Neighborhood(3, dilation=3),
    "nbhd_1d_stride": M.Neighborhood(5, stride=3),
    "nbhd_1d_causal": M.Neighborhood(4, causal=True),
    "nbhd_1d_causal_stride": M.Neighborhood(4, stride=2, causal=True, dilation=2),
    "nbhd_2d": M.Neighborhood(3, grid=(5, 7)),
    "nbhd_2d_cls": M.Neighborhood((3, 5), grid=(5, 7), global_tokens=2),
    "nbhd_2d_mixed": M.Neighborhood((3, 2), dilation=(1, 2), stride=(2, 1), causal=(True, False), grid=(6, 7)),
    "nbhd_3d": M.Neighborhood(3, grid=(3, 4, 3)),
    "nbhd_2d_tiled": M.Neighborhood((3, 3), dilation=(1, 2), grid=(6, 8), tile=(2, 4), global_tokens=1).tiled(),
    "nbhd_3d_tiled": M.Neighborhood(3, causal=(True, False, False), grid=(4, 3, 3), tile=(2, 1, 3)).tiled(),
    "blocked": M.Blocked(6),
    "blocked_2d": M.Blocked((2, 3), grid=(5, 7)),
    "global_local": M.GlobalLocal(3, 2),
    "global_local_causal": M.GlobalLocal(2, M.SlidingWindow(3, 0)) & M.causal(),
    "strided": M.Strided(3, 1),
    "strided_causal": M.Strided(4, M.SlidingWindow(2, 0)) & M.causal(),
    "strided_residue": M.residue_order(M.Strided(3, 1)),
    "strided_residue_causal": M.residue_order(M.Strided(4, M.SlidingWindow(2, 0)) & M.causal()),
    "strided_residue_or": M.residue_order(M.Strided(5, M.SlidingWindow(1, 3, dilation=2)) | M.Blocked(6)),
    "or": M.SlidingWindow(1, 1) | M.Blocked(8),
    "block_sparse": M.BlockSparse(_layout(1, 5, 6), block=(8, 6)),
    "block_sparse_heads": M.BlockSparse(_layout(3, 5, 6, seed=1), block=(8, 6)),
    "mask_mod": M.from_mask_mod(_doc_mask_mod),
    "mask_mod_and_causal": M.from_mask_mod(_doc_mask_mod) & M.causal(),
}
SQ = {"nbhd_2d": 35, "nbhd_2d_cls": 37, "nbhd_2d_mixed": 42, "nbhd_3d": 36, "blocked_2d": 35, "nbhd_2d_tiled": 49,
      "nbhd_3d_tiled": 36}


@pytest.mark.parametrize("name", sorted(MASKS))
@pytest.mark.parametrize("bm, bn", [(4, 4), (8, 4), (4, 16)])
def test_block_map_matches_dense(name, bm, bn):
    mask = MASKS[name]
    s = SQ.get(name, 37)
    sk = 36 if name.startswith("block_sparse") else s
    sq = 37 if name.startswith("block_sparse") else s
    heads = 3
    check_block_map(mask, sq, sk, bm, bn, heads)


@pytest.mark.parametrize("sq, sk", [(9, 21), (21, 9), (1, 13)])
@pytest.mark.parametrize("mask", [M.causal(), M.SlidingWindow(3, 1), M.SlidingWindow(2, 0, dilation=2),
                                  M.GlobalLocal(2, 3), M.Strided(2, 0) & M.causal(),
                                  M.residue_order(M.Strided(4, M.SlidingWindow(3, 1)) & M.causal())])  # fmt: skip
def test_block_maps_with_different_lengths(mask, sq, sk):
    check_block_map(mask, sq, sk, 4, 4, heads=2)


def test_sliding_window_semantics_bottom_right():
    m = M.SlidingWindow(2, 1)
    d = m.dense(4, 7)[0]
    # Sk - Sq = 3: query 0 sits at key position 3 and sees keys 1..4.
    assert d[0].nonzero().squeeze(1).tolist() == [1, 2, 3, 4]
    assert M.causal().dense(3, 5)[0].sum(1).tolist() == [3, 4, 5]
    dil = M.SlidingWindow(2, 0, dilation=3).dense(10, 10)[0]
    assert dil[9].nonzero().squeeze(1).tolist() == [3, 6, 9]


@pytest.mark.parametrize("n, ks, d, s", [(11, 3, 1, 1), (11, 4, 1, 1), (13, 3, 2, 1), (13, 5, 1, 2), (14, 3, 2, 3),
                                         (12, 4, 3, 4)])  # fmt: skip
def test_neighborhood_sees_exactly_kernel_size_shifted_at_borders(n, ks, d, s):
    """NATTEN: every query sees kernel_size keys of its dilation group; the window is shifted, not clipped."""
    dense = M.Neighborhood(ks, dilation=d, stride=s).dense(n, n)[0]
    assert (dense.sum(1) == ks).all()
    for i in range(n):
        keys = dense[i].nonzero().squeeze(1)
        assert ((keys % d) == i % d).all()
        steps = keys.diff()
        assert (steps == d).all(), "a window is contiguous within its dilation group"
    if s == 1 and d == 1:
        assert dense[0].nonzero().squeeze(1).tolist() == list(range(ks))  # shifted right at the start
        assert dense[n - 1].nonzero().squeeze(1).tolist() == list(range(n - ks, n))


def test_neighborhood_stride_shares_the_leaders_window_and_blocked_equivalence():
    dense = M.Neighborhood(5, stride=3).dense(12, 12)[0]
    for group in range(4):
        rows = dense[group * 3:group * 3 + 3]
        assert (rows == rows[0]).all()
    assert torch.equal(M.Neighborhood(4, stride=4).dense(12, 12), M.Blocked(4).dense(12, 12))
    assert torch.equal(M.Neighborhood((2, 3), stride=(2, 3), grid=(4, 6)).dense(24, 24),
                       M.Blocked((2, 3), grid=(4, 6)).dense(24, 24))


def test_neighborhood_causal_and_2d_product():
    c = M.Neighborhood(3, causal=True).dense(6, 6)[0]
    assert c[0].nonzero().squeeze(1).tolist() == [0]
    assert c[4].nonzero().squeeze(1).tolist() == [2, 3, 4]
    two = M.Neighborhood((3, 3), grid=(4, 5)).dense(20, 20)[0].reshape(4, 5, 4, 5)
    rows = M.Neighborhood(3).dense(4, 4)[0]
    cols = M.Neighborhood(3).dense(5, 5)[0]
    assert torch.equal(two, rows[:, None, :, None] & cols[None, :, None, :])


def test_global_tokens_see_and_are_seen_by_all():
    d = M.Neighborhood(3, grid=(3, 3), global_tokens=2).dense(11, 11)[0]
    assert d[:2].all() and d[:, :2].all()
    assert torch.equal(d[2:, 2:], M.Neighborhood(3, grid=(3, 3)).dense(9, 9)[0])


def test_strided_heads_cover_the_context():
    d = M.Strided(4, 0).dense(16, 16, heads=4)
    assert d.any(0).all()
    assert d[1, 5].nonzero().squeeze(1).tolist() == [1, 5, 9, 13]


@pytest.mark.parametrize("sq, sk", [(37, 37), (9, 21), (21, 9), (5, 3)])
def test_residue_order_is_the_same_mask_on_keys_sorted_by_residue(sq, sk):
    base = M.Strided(4, M.SlidingWindow(3, 1)) & M.causal()
    ordered = M.residue_order(base)
    assert ordered == M.ResidueOrder(base, 4) and M.residue_order(M.causal()) is None
    assert M.residue_order(M.Strided(2) | M.Strided(3)) is None, "two strides: no single key order"
    perm = ordered.permutation(sk)
    assert perm.tolist() == sorted(range(sk), key=lambda j: (j % 4, j // 4))
    assert torch.equal(ordered.dense(sq, sk, heads=5), base.dense(sq, sk, heads=5)[:, :, perm])


def test_strided_heads_visit_their_residue_range_as_full_tiles():
    """Residue order, S = 4096, 64x64 tiles: head h's strided keys are one run of FULL tiles (no element test),
    and every query tile visits that run plus a tile or two per other residue class."""
    s, r, bn = 4096, 8, 64
    bmap = M.residue_order(M.Strided(r, 0)).block_map(s, s, 64, bn, r)
    seg = s // r
    for h in range(r):
        full_cols = {(row, col) for hh, row, col, kind in zip(*(x.tolist() for x in bmap.pairs())) if hh == h
                     and kind == KIND_FULL}  # fmt: skip
        own = range(h * seg // bn, (h + 1) * seg // bn)
        assert all((row, col) in full_cols for row in range(s // 64) for col in own)
    assert int(bmap.visited().max()) <= seg // bn + 2 * (r - 1)


@pytest.mark.parametrize("mask, s, bm, bn", [(M.Strided(8, M.SlidingWindow(20, 5)), 4096, 64, 64),
                                             (M.Strided(5, M.SlidingWindow(7, 0)), 1000, 32, 16),
                                             (M.Strided(4, 0), 777, 16, 64)])  # fmt: skip
def test_strided_tile_count_closed_form_is_what_the_residue_order_visits(mask, s, bm, bn):
    """The closed form (per query tile t and head h) equals the tiles the kernels visit, well below dense."""
    t, h, sq, sk = sp.symbols("t h Sq Sk", integer=True, nonnegative=True)
    count = sp.lambdify((t, h, sq, sk), mask.tile_count(bm, bn), "math")
    heads = mask.stride
    visited = M.residue_order(mask).block_map(s, s, bm, bn, heads).visited()
    want = torch.tensor([[count(tile, head, s, s) for tile in range(visited.shape[1])] for head in range(heads)])
    assert torch.equal(visited, want)
    dense = -(-s // bn)
    assert M.Strided(mask.stride, mask.window).block_map(s, s, bm, bn, heads).visited().min() == dense
    if s >= 4096:
        assert visited.float().mean() * 3 < dense


def test_and_or():
    a, b = M.SlidingWindow(2, 2), M.causal()
    assert torch.equal((a & b).dense(9, 9), a.dense(9, 9) & b.dense(9, 9))
    assert torch.equal((a | M.Blocked(4)).dense(9, 9), a.dense(9, 9) | M.Blocked(4).dense(9, 9))
    assert isinstance(a & b & a, M.And) and len((a & b & a).parts) == 3
    assert str(a & (b | a)) == "SlidingWindow(2, 2) & (causal | SlidingWindow(2, 2))"


@pytest.mark.parametrize("mask, bm, bn", [(M.SlidingWindow(37, 0), 16, 16), (M.SlidingWindow(5, 9), 16, 32),
                                          (M.causal(), 32, 16), (M.Neighborhood(7), 16, 16),
                                          (M.Neighborhood(6, causal=True), 16, 8), (M.Blocked(24), 16, 16)])  # fmt: skip
def test_tile_count_closed_form_counts_the_visited_tiles(mask, bm, bn):
    s = 203
    expr = mask.tile_count(bm, bn)
    visited = mask.block_map(s, s, bm, bn).visited()[0]
    t, sq, sk = sp.symbols("t Sq Sk", integer=True, nonnegative=True)
    for tile in range(visited.numel()):
        assert int(expr.subs({t: tile, sq: s, sk: s})) == visited[tile]


def test_density_and_row_counts():
    assert M.causal().density(10, 10) == pytest.approx(55 / 100)
    m = M.SlidingWindow(3, 0)
    assert m.density(50, 50) == pytest.approx(float(m.dense(50, 50).float().mean()))
    bs = MASKS["block_sparse"]
    assert bs.density(37, 36) == pytest.approx(float(bs.dense(37, 36).float().mean()))


def test_block_map_memory_is_linear_in_sequence_length():
    """A causal window's map at S = 1M: a few runs per query tile, no S x S anything."""
    s = 1 << 20
    bmap = M.SlidingWindow(1023, 0).block_map(s, s, 128, 128)
    assert bmap.max_runs <= 3
    assert bmap.nbytes() < 200 * (s // 128)
    assert int(bmap.visited().max()) == 9


def test_serialization_roundtrip_and_registry():
    for name in ("window", "nbhd_2d_cls", "global_local_causal", "strided", "or", "nbhd_2d_mixed",
                 "strided_residue_causal"):
        m = MASKS[name]
        assert M.lookup(m.key()) == m
        assert M.from_dict(m.to_dict()) == m
    bs = MASKS["block_sparse"]
    assert bs.key().startswith("ref:") and M.lookup(bs.key()) is bs
    mm = MASKS["mask_mod_and_causal"]
    assert M.lookup(mm.key()) is mm
    with pytest.raises(KeyError, match="not registered"):
        M.lookup("ref:0000")


def test_text_and_png_drawing(tmp_path):
    assert M.SlidingWindow(1, 0).draw(3, 3) == "#..\n##.\n.##"
    assert M.causal().draw(8, 8, block=(4, 4)) == "p.\nFp"
    pytest.importorskip("matplotlib")
    path = tmp_path / "mask.png"
    M.Neighborhood(3, grid=(6, 6), global_tokens=1).png(path, 37, 37, block=(8, 8))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("make, match", [
    (lambda: M.SlidingWindow(-1, 0), "left must be an int >= 0"),
    (lambda: M.SlidingWindow(1, 0, dilation=0), "dilation must be an int >= 1"),
    (lambda: M.Neighborhood(3, stride=4), "stride must not exceed kernel_size"),
    (lambda: M.Neighborhood((3, 3)), "one per grid axis"),
    (lambda: M.Neighborhood(5, grid=(4, 8)), "exceeds the grid"),
    (lambda: M.Neighborhood(3, grid=(4, 0)), "positive ints"),
    (lambda: M.Blocked(0), "block must be an int >= 1"),
    (lambda: M.GlobalLocal(2, "wide"), "window must be"),
    (lambda: M.BlockSparse(torch.ones(2, 2)), "bool tensor"),
    (lambda: M.from_mask_mod(3), "callable"),
    (lambda: M.SlidingWindow(1, 1) & 3, "unsupported operand"),
])  # fmt: skip
def test_invalid_descriptors_raise_clear_errors(make, match):
    with pytest.raises((ValueError, TypeError), match=match):
        make()


def test_size_checks_at_use():
    with pytest.raises(ValueError, match="global_tokens \\+ grid"):
        M.Neighborhood(3, grid=(4, 4)).dense(17, 17)
    with pytest.raises(ValueError, match="Sq must equal Sk"):
        M.Neighborhood(3).dense(8, 9)
    with pytest.raises(ValueError, match="exceeds the grid"):
        M.Neighborhood(5).dense(4, 4)
    with pytest.raises(ValueError, match="layout has"):
        MASKS["block_sparse"].dense(64, 64)
    with pytest.raises(ValueError, match="heads"):
        MASKS["block_sparse_heads"].dense(37, 36, heads=2)
    with pytest.raises(ValueError, match="small sizes"):
        M.causal().dense(1 << 14, 1 << 14)


@pytest.mark.parametrize("mask, s", [(M.Neighborhood(3, grid=(4, 6), tile=(2, 3), global_tokens=1), 25),
                                     (M.Blocked((2, 3), grid=(4, 6), tile=(2, 3)), 24),
                                     (M.Neighborhood((3, 3, 1), grid=(4, 4, 6), tile=(2, 2, 2), causal=(True, False, False)), 96)])  # fmt: skip
def test_tiled_order_is_the_same_mask_on_permuted_tokens(mask, s):
    perm = mask.permutation(s)
    assert sorted(perm.tolist()) == list(range(s)) and perm[:mask.global_tokens].tolist() == list(range(mask.global_tokens))
    assert torch.equal(mask.tiled().dense(s, s)[0], mask.dense(s, s)[0][perm][:, perm])


def test_spatial_tiles_make_2d_neighborhoods_block_dense():
    """128x128 grid, kernel 13, 64-token tiles: 8x8 spatial tiles visit a third of the row-major tiles."""
    row_major = M.Neighborhood(13, grid=(128, 128))
    tiled = M.Neighborhood(13, grid=(128, 128), tile=(8, 8)).tiled()
    s = 128 * 128
    assert tiled.block_map(s, s, 64, 64).density() * 3 < row_major.block_map(s, s, 64, 64).density()


def test_tile_must_divide_the_grid():
    with pytest.raises(ValueError, match="each dividing the grid"):
        M.Neighborhood(3, grid=(6, 6), tile=(4, 4))
    with pytest.raises(ValueError, match="needs a tile shape"):
        M.Neighborhood(3, grid=(6, 6), order="tiled")


# --- mask_mods evaluated per element, as FlexAttention does -------------------------
# Per-document [start, end) intervals, looked up through the query's document and unpacked as one row: a
# FlexAttention idiom that only works on 0-d indices (on broadcast index tensors the unpacking fails).
_INTERVALS = torch.tensor([[0, 5], [5, 12], [12, 20], [20, 24]])
_DOC = torch.repeat_interleave(torch.arange(4), _INTERVALS[:, 1] - _INTERVALS[:, 0])  # [24] document of a token
_ROW_INTERVALS = torch.stack([_INTERVALS, torch.tensor([[0, 8], [8, 12], [12, 16], [16, 24]])])  # [B=2, 4, 2]
_HEAD_WINDOW = torch.tensor([3, 100, 6, 100])  # per head


def _same_doc_causal(b, h, q_idx, kv_idx):
    start, end = _INTERVALS[_DOC[q_idx]]
    return (start <= kv_idx) & (kv_idx < end) & (kv_idx <= q_idx)


def _row_doc_head_window(b, h, q_idx, kv_idx):
    start, _ = _ROW_INTERVALS[b, _DOC[q_idx]]
    return (start <= kv_idx) & (kv_idx <= q_idx) & (q_idx - kv_idx < _HEAD_WINDOW[h])


def test_mask_mod_indexing_by_query_is_evaluated_per_element():
    from torch.nn.attention.flex_attention import create_mask

    mask = M.from_mask_mod(_same_doc_causal)
    want = create_mask(_same_doc_causal, 1, 1, 24, 24, device="cpu")[0]
    assert torch.equal(mask.dense(24, 24), want)
    assert (mask.heads_of(4), mask.batch_dependent(2)) == (1, False)
    check_block_map(mask, 24, 24, 4, 8)


def test_mask_mod_per_element_keeps_batch_and_head_dependence():
    from torch.nn.attention.flex_attention import create_mask

    mask = M.from_mask_mod(_row_doc_head_window)
    assert (mask.heads_of(4), mask.batch_dependent(2)) == (4, True)
    want = create_mask(_row_doc_head_window, 2, 4, 24, 24, device="cpu")  # [B, H, Sq, Sk]
    for b in range(2):
        assert torch.equal(mask.at_batch(b).dense(24, 24, heads=4), want[b])
        check_block_map(mask.at_batch(b), 24, 24, 8, 4, heads=4)


def test_mask_mod_that_vmap_cannot_run_is_called_on_broadcast_indices():
    """``.numpy()`` has no vmap rule: the callable runs once on the broadcast index tensors (the former way)."""

    def through_numpy(b, h, q_idx, kv_idx):
        return torch.from_numpy((kv_idx <= q_idx).numpy()) & (h == 1)

    mask = M.from_mask_mod(through_numpy)
    assert (mask.heads_of(4), mask.batch_dependent(2)) == (4, False)
    assert torch.equal(mask.dense(6, 6, heads=4)[1], torch.ones(6, 6, dtype=torch.bool).tril())
    assert not mask.dense(6, 6, heads=4)[0].any()


def test_mask_mod_failing_both_ways_names_the_fix():
    mask = M.from_mask_mod(lambda b, h, q_idx, kv_idx: int(q_idx) <= kv_idx)
    with pytest.raises(TypeError, match="per element through torch.vmap.*broadcast index tensors.*0-d"):
        mask.dense(4, 4)
