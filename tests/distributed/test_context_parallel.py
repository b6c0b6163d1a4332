"""attnopt.distributed on CPU with gloo: 2 and 4 processes (one spawn per world size runs every case, see
tests/_distributed_helpers.py), and the in-process parts (layout, load balance, mask reading, refusals)."""

import os

import pytest
import torch

import _distributed_helpers as h
import attnopt
import attnopt.distributed as ad
from attnopt.masks import SlidingWindow, causal

TOL = 1e-5
CASES = ["ops", "llama", "mistral", "linear"]


def _ok(results: list[dict], case: str) -> list[dict]:
    per_rank = [r[case] for r in results]
    for r in per_rank:
        assert "error" not in r, r.get("error")
    return per_rank


def _check_models(results: list[dict], world: int) -> None:
    for case, variant, op in (("llama", "Exact", "attention"), ("mistral", "Sparse", "sparse_attention_auto"),
                              ("linear", "Linear", "linear_attention")):  # fmt: skip
        for r in _ok(results, case):
            assert r["variants"] == [variant]
            assert [name for name, _ in r["forward_calls"]] == [op] * r["layers"], "every site ran sharded"
            worst = max(r["errors"].items(), key=lambda kv: kv[1])
            assert worst[1] < TOL, f"{case} at {world} ranks: {worst[0]} differs by {worst[1]:.2e} (relative)"


def _check_bytes(results: list[dict], world: int) -> None:
    hkv, d = _ok(results, "llama")[0]["shape"]
    local_kv = h.SEQ // world * hkv * 2 * d * 4  # one rank's K/V shard, fp32, batch 1
    for r in _ok(results, "llama"):
        assert all(b == local_kv for _, b in r["forward_calls"]), "exact: one all-gather of the local K/V shard"
    window = h.MISTRAL_WINDOW + 1
    bound = window * hkv * 2 * d * 4 * 2  # (window + block) · Hkv · (D + Dv) · 4 bytes · 2 neighbours, block 0
    sent = [b for r in _ok(results, "mistral") for _, b in r["forward_calls"]]
    assert max(sent) <= bound and max(sent) < local_kv * world, f"window halos: {sent} bytes, bound {bound}"
    for r in _ok(results, "ops"):
        short, long = r[f"linear_calls_{h.SEQ}"], r[f"linear_calls_{4 * h.SEQ}"]
        assert short == long and short[0][1] > 0, f"linear bytes grow with S: {short} vs {long}"


def _check_ops(results: list[dict], world: int) -> None:
    for r in _ok(results, "ops"):
        for kind in ("causal", "full", "window", "linear"):
            assert max(r[kind]) < TOL, f"{kind} at {world} ranks: out, dq, dk, dv relative errors {r[kind]}"


def test_two_ranks(tmp_path):
    results = h.run(2, CASES + ["ddp", "fsdp"], tmp_path)
    _check_ops(results, 2)
    _check_models(results, 2)
    _check_bytes(results, 2)
    for case in ("ddp", "fsdp"):
        for r in _ok(results, case):
            for how in ("optimize", "compile"):
                assert max(r[how].values()) < TOL, f"{case} with {how}: {r[how]}"
    _check_dcp_round_trip(tmp_path)


def _check_dcp_round_trip(tmp_path) -> None:
    """The FSDP2 checkpoint (saved by 2 processes) loads into a single-process optimized model."""
    import torch.distributed.checkpoint as dcp

    expected = torch.load(tmp_path / "dcp_expected.pt")
    model, ids = h._model("llama", torch.float64, num_hidden_layers=1)
    optimized = attnopt.optimize(model, "exact")
    state = optimized.state_dict()
    dcp.load(state, checkpoint_id=os.fspath(tmp_path / "dcp"))
    optimized.load_state_dict(state)
    assert state.keys() == expected.keys()
    for name, value in optimized.state_dict().items():
        assert torch.equal(value, expected[name]), name
    assert torch.isfinite(optimized(input_ids=ids).last_hidden_state).all()


def test_four_ranks(tmp_path):
    results = h.run(4, CASES, tmp_path)
    _check_ops(results, 4)
    _check_models(results, 4)
    _check_bytes(results, 4)


@pytest.mark.parametrize("world", [2, 4, 8])
def test_causal_load_balance_within_one_tile(world):
    tile, seq = 16, 16 * 3 * 2 * world
    counts = [ad.visible_key_tiles(ad.Layout(world), r, seq, tile, causal()) for r in range(world)]
    assert max(counts) - min(counts) <= 1, counts
    plain = [ad.visible_key_tiles(ad.Layout(world, load_balance=False), r, seq, tile, causal()) for r in range(world)]
    assert max(plain) - min(plain) > 1, plain  # contiguous shards are unbalanced: the check can fail


def test_layout_round_trip():
    layout = ad.Layout(3)
    full = torch.arange(24).view(1, 24)
    stacked = torch.stack([layout.shard(full, 1, r) for r in range(3)])
    assert stacked[1].tolist() == [[4, 5, 6, 7, 16, 17, 18, 19]]
    assert torch.equal(layout.to_global(stacked, 1), full)
    with pytest.raises(ValueError, match="multiple of 6"):
        layout.shard(torch.zeros(1, 10), 1, 0)


def test_site_mask_reads_the_local_structure():
    q = torch.zeros(1, 2, 8, 4)
    i = torch.arange(8)
    window = (i[None, :] <= i[:, None]) & (i[None, :] >= i[:, None] - 2)
    assert ad.site_mask(window[None, None], 0, q, q) == SlidingWindow(2, 0)
    assert ad.site_mask(None, 1, q, q) == causal()
    assert ad.site_mask(None, 0, q, q) is None
    padded = window[None, None] & (i < 6)[None, None, None, :]
    with pytest.raises(NotImplementedError, match="key padding"):
        ad.site_mask(padded, 0, q, q)
    wide = (i[None, :] <= i[:, None])[None, None]  # causal, or a window of 8 keys or more: the user says which
    with pytest.raises(NotImplementedError, match="causal_masks="):
        ad.site_mask(wide, 0, q, q)
    assert ad.site_mask(wide, 0, q, q, causal_masks="causal") == causal()
    assert ad.site_mask(wide, 0, q, q, causal_masks=4096) == SlidingWindow(4095, 0)


def test_needs_a_process_group():
    with pytest.raises(RuntimeError, match="init_process_group"):
        with ad.context_parallel(buffers=[], buffer_seq_dims=[]):
            pass
