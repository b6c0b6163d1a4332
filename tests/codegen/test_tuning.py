"""Tile choice (resource model, pruning, defaults, autotuning cache) and SDPA dispatch, on CPU with fake timers."""

import json

import pytest
import sympy
import torch

from attnopt.codegen import tuning
from attnopt.codegen.spec import TILE_FIELDS, KernelSpec
from attnopt.kernels.exact import dispatch

SM80, SM86, SM90 = (tuning.GENERATIONS[n] for n in ("sm80", "sm86", "sm90"))
H100 = tuning.Device(name="NVIDIA H100 80GB HBM3", generation=SM90, triton="3.6.0")


def spec(direction="fwd", d=128, dv=None, dtype="bfloat16", **features) -> KernelSpec:
    features = {"causal": 0, "mask": "none", **features}
    return KernelSpec(direction=direction, head_dim=d, head_dim_v=dv or d, dtype=dtype, block_m=64, block_n=64,
                      num_warps=4, num_stages=2, **features)


def tiles(s: KernelSpec) -> tuple:
    return tuple(getattr(s, f) for f in TILE_FIELDS)


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTNOPT_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("ATTNOPT_AUTOTUNE", raising=False)
    tuning.clear_memo()
    dispatch.clear_memo()
    yield
    tuning.clear_memo()
    dispatch.clear_memo()


# ---------------------------------------------------------------------------------------------------------------
# Resource model and pruning


def test_model_is_sympy_and_matches_the_documented_formulas():
    BM, BN, D, DV, S, W, E, AR = sympy.symbols("BM BN D DV S W E AR", positive=True)  # noqa: N806
    MB, F, T = sympy.symbols("MB F T", positive=True)  # noqa: N806
    smem, regs = tuning.model()["fwd"]
    scores = S * BM * BN * MB
    assert sympy.simplify(smem - (E * (BM * D + S * BN * (D + DV)) + scores + 1024 * T)) == 0
    fit = 56 + (sympy.Rational(115, 100) * BM * DV + sympy.Rational(16, 10) * BM * BN + AR * E / 4 * BM * D) / (32 * W)
    assert sympy.simplify(regs - fit - F * BM * BN / (32 * W)) == 0
    assert set(tuning.model()) == {"fwd", "bwd_pre", "bwd_dq", "bwd_dkdv"}
    # bf16 128x128 tiles, D 128, 3 stages: 2 * (128 * 128 + 3 * 128 * 256) bytes (Triton's allocation on sm_90a)
    # and 1 KiB bounding the tensor descriptors' barriers; registers 56 + (1.15 * 128 * 128 + 1.6 * 128 * 128) / 256
    assert tuning.resources(spec().replace(block_m=128, block_n=128, num_warps=8, num_stages=3), SM90) == (
        230400, 232.0)


def test_model_counts_per_tile_mask_and_bias_loads_and_feature_registers():
    """A boolean mask takes one byte per score and stage (and one more tile to convert it), an additive one
    (or a bias tensor) E bytes;
    every feature adds registers per score element."""
    tile = dict(block_m=128, block_n=64, num_warps=8, num_stages=3)
    plain = spec().replace(**tile)
    smem, regs = tuning.resources(plain, SM90)
    assert tuning.resources(plain.replace(mask="bool"), SM90)[0] == smem + 3 * 128 * 64
    assert tuning.resources(plain.replace(dropout=True), SM90)[0] == smem + 3 * 128 * 64  # keep-mask conversion
    assert tuning.resources(plain.replace(mask="additive", bias="tensor"), SM90)[0] == smem + 3 * 128 * 64 * 4
    singles = (dict(mask="bool"), dict(bias="alibi"), dict(bias="relpos"), dict(softcap=True), dict(dropout=True))
    for features in singles:
        assert tuning.resources(plain.replace(**features), SM90)[1] > regs, features
    # the relative-position gather costs more than a streamed bias tile (measured: it spilled at 128x64, 8 warps)
    relpos, tensor = (tuning.resources(plain.replace(bias=kind), SM90)[1] for kind in ("relpos", "tensor"))
    assert relpos > tensor


def test_forward_reads_key_values_by_descriptor_from_sm90_on():
    for gen in tuning.GENERATIONS.values():
        assert tuning.default(spec(), gen).strided_kv == (not gen.tma)
        assert not tuning.default(spec("bwd_dq"), gen).strided_kv
    assert tuning.default(spec().replace(strided_kv=True), SM90).strided_kv  # inputs a descriptor cannot read


def test_register_model_depends_on_the_generation():
    s = spec().replace(block_m=128, block_n=64, num_warps=4, num_stages=2)
    assert tuning.resources(s, SM80)[1] > tuning.resources(s, SM90)[1]  # mma.sync keeps Q in registers


@pytest.mark.parametrize("capability, name", [((8, 0), "sm80"), ((8, 6), "sm86"), ((8, 7), "sm86"),
                                              ((8, 9), "sm89"), ((9, 0), "sm90"), ((10, 0), "sm100"),
                                              ((12, 0), "sm100")])
def test_generation(capability, name):
    assert tuning.generation(capability).name == name


def test_generation_rejects_old_gpus():
    with pytest.raises(ValueError, match="compute capability >= 8.0"):
        tuning.generation((7, 5))


@pytest.mark.parametrize("direction", ["fwd", "bwd_dq", "bwd_dkdv", "bwd_pre"])
@pytest.mark.parametrize("d, dtype", [(64, "bfloat16"), (128, "float16"), (256, "bfloat16"), (128, "float32")])
def test_candidates_fit_and_keep_the_features(direction, d, dtype):
    base = spec(direction, d=d, dtype=dtype, causal=2, softcap=True) if direction != "bwd_pre" else spec(direction, d)
    for gen in (SM80, SM86, SM90):
        cands = tuning.candidates(base, gen)
        assert cands and len(set(cands)) == len(cands)
        for c in cands:
            smem, regs = tuning.resources(c, gen)
            assert smem <= gen.smem_per_block and regs <= tuning.MAX_REGS_PER_THREAD
            kept = TILE_FIELDS + ("strided_kv",)  # strided_kv: see test_forward_reads_key_values_by_descriptor...
            assert {k: v for k, v in c.to_dict().items() if k not in kept} == \
                {k: v for k, v in base.to_dict().items() if k not in kept}


def test_smaller_gpus_and_wider_heads_keep_fewer_candidates():
    assert {tiles(c) for c in tuning.candidates(spec(), SM86)} < {tiles(c) for c in tuning.candidates(spec(), SM90)}
    assert len(tuning.candidates(spec(d=256), SM90)) < len(tuning.candidates(spec(d=64), SM90))
    assert len(tuning.candidates(spec(dtype="float32"), SM90)) < len(tuning.candidates(spec(), SM90))


def test_defaults_are_deterministic_and_fit():
    assert tiles(tuning.default(spec(), SM90)) == (128, 128, 8, 3)
    assert tiles(tuning.default(spec("bwd_dkdv"), SM90)) == (32, 128, 8, 3)
    assert tiles(tuning.default(spec("bwd_dq"), SM90)) == (128, 64, 8, 3)
    for gen in tuning.GENERATIONS.values():
        for direction in ("fwd", "bwd_dq", "bwd_dkdv", "bwd_pre"):
            for d, dtype in ((64, "bfloat16"), (256, "float32")):
                chosen = tuning.default(spec(direction, d=d, dtype=dtype), gen)
                assert tuning.fits(chosen, gen), (gen.name, direction, d, dtype)
                assert chosen == tuning.default(spec(direction, d=d, dtype=dtype), gen)
    assert tuning.resources(tuning.default(spec(), SM86), SM86)[0] <= SM86.smem_per_block


@pytest.mark.parametrize("n, expected", [(1, 16), (16, 16), (17, 32), (1000, 1024), (1024, 1024), (1025, 2048)])
def test_bucket(n, expected):
    assert tuning.bucket(n) == expected


# ---------------------------------------------------------------------------------------------------------------
# select: cache, autotuning, defaults


class FakeTimer:
    """Times a candidate by running it (which records its tiles) and returning a made-up cost."""

    def __init__(self, cost):
        self.cost, self.calls, self.seen = cost, 0, []

    def run(self, candidate):
        self.seen.append(tiles(candidate))

    def __call__(self, fn):
        self.calls += 1
        fn()
        return self.cost(self.seen[-1])


def prefer(best):
    return lambda t: 1.0 if t == best else 2.0 + t[0] / 1000


def test_select_without_device_keeps_the_spec():
    s = spec()
    assert tuning.select(s, 100, 100, None) is s


def test_select_without_tuning_uses_the_default_and_writes_nothing(tmp_path):
    timer = FakeTimer(prefer((64, 64, 4, 2)))
    chosen = tuning.select(spec(), 1000, 1000, H100, run=timer.run, timer=timer)
    assert chosen == tuning.default(spec(), SM90) and timer.calls == 0
    assert not (tmp_path / "tuning").exists()


def test_autotune_once_per_bucket_and_persist(tmp_path):
    best = (64, 64, 4, 3)
    timer = FakeTimer(prefer(best))
    with tuning.autotuning():
        chosen = tuning.select(spec(), 1000, 3000, H100, run=timer.run, timer=timer)
    n = len(tuning.candidates(spec(), SM90))
    assert tiles(chosen) == best and timer.calls == n
    (path,) = (tmp_path / "tuning").iterdir()
    entry = json.loads(path.read_text())
    assert entry["key"] == tuning.tuning_key(spec(), 1000, 3000, H100)
    assert entry["key"]["gpu"] == H100.name and entry["key"]["triton"] == "3.6.0"
    assert entry["key"]["seq_q_bucket"] == 1024 and entry["key"]["seq_k_bucket"] == 4096
    assert entry["tiles"] == dict(zip(TILE_FIELDS, best)) and len(entry["results"]) == n

    with tuning.autotuning():
        again = tuning.select(spec().replace(block_m=32), 600, 2100, H100, run=timer.run, timer=timer)
    assert tiles(again) == best and timer.calls == n  # same bucket: no re-tuning, whatever the spec's own tiles

    tuning.clear_memo()  # a new process reads the file
    assert tiles(tuning.select(spec(), 1024, 4096, H100)) == best

    with tuning.autotuning():
        tuning.select(spec(), 1025, 4096, H100, run=timer.run, timer=timer)  # next bucket
        other_gpu = tuning.Device(name="NVIDIA H200", generation=SM90, triton="3.6.0")
        tuning.select(spec(), 1000, 3000, other_gpu, run=timer.run, timer=timer)
        tuning.select(spec(causal=2), 1000, 3000, H100, run=timer.run, timer=timer)  # other features
    assert timer.calls == 4 * n
    assert len(list((tmp_path / "tuning").iterdir())) == 4


def test_autotune_from_environment(monkeypatch):
    monkeypatch.setenv("ATTNOPT_AUTOTUNE", "1")
    timer = FakeTimer(prefer((32, 32, 4, 2)))
    assert tiles(tuning.select(spec(d=64), 200, 200, H100, run=timer.run, timer=timer)) == (32, 32, 4, 2)
    with tuning.autotuning(False):
        assert tuning.autotune_enabled() is False
    assert tuning.autotune_enabled() is True


def test_autotune_skips_failing_candidates():
    def cost(t):
        if t[0] == 128:
            raise RuntimeError("out of resources: shared memory")
        return 1.0 / (t[0] * t[1] * t[3])

    timer = FakeTimer(cost)
    with tuning.autotuning():
        chosen = tuning.select(spec(), 512, 512, H100, run=timer.run, timer=timer)
    assert chosen.block_m == 64
    entry = tuning.load_entry(tuning.tuning_key(spec(), 512, 512, H100))
    errors = [r for r in entry["results"] if "error" in r]
    assert errors and all(r["tiles"][0] == 128 and "out of resources" in r["error"] for r in errors)


def test_autotune_fails_when_nothing_runs():
    def cost(t):
        raise RuntimeError("no")

    timer = FakeTimer(cost)
    with tuning.autotuning(), pytest.raises(RuntimeError, match="no tile configuration"):
        tuning.select(spec(), 512, 512, H100, run=timer.run, timer=timer)


def test_autotune_progress_bar_goes_to_stderr(capsys):
    timer = FakeTimer(prefer((64, 64, 4, 2)))
    key = tuning.tuning_key(spec(d=256), 64, 64, H100)
    tuning.autotune(spec(d=256), key, SM90, timer.run, timer, progress=True)
    assert capsys.readouterr().out == ""


def test_stale_or_foreign_cache_entries_are_ignored(tmp_path):
    key = tuning.tuning_key(spec(), 64, 64, H100)
    path = tuning.tuning_path(key)
    path.parent.mkdir(parents=True)
    path.write_text("{not json")
    assert tuning.load_entry(key) is None
    path.write_text(json.dumps(dict(key={**key, "gpu": "other"}, tiles={})))
    assert tuning.load_entry(key) is None


# ---------------------------------------------------------------------------------------------------------------
# SDPA dispatch


ENV = dispatch.Environment(gpu="NVIDIA H100 80GB HBM3", torch="2.11.0", triton="3.6.0")


def site(**changes):
    base = dict(dtype="bfloat16", head_dim=128, head_dim_v=128, group=1, causal=0, mask="none", mask_dims="none",
                same_length=True, dropout=False, backward=False, seq_q_bucket=4096, seq_k_bucket=4096,
                batch_heads_bucket=64)
    return dispatch.Site(**{**base, **changes})


class FakeMeasure:
    def __init__(self, timings):
        self.timings, self.calls = timings, []

    def __call__(self, name):
        self.calls.append(name)
        return self.timings.get(name)


def test_dispatch_picks_the_fastest_once_and_persists(tmp_path):
    measure = FakeMeasure({"attnopt": 1.0, "sdpa-flash": 1.5, "sdpa-cudnn": 0.8, "sdpa-efficient": 3.0})
    decision = dispatch.decide(site(), ENV, measure)
    assert decision.backend == "sdpa-cudnn" and decision.versus == "attnopt"
    assert decision.speedup == pytest.approx(1.25)
    assert decision.timings_ms == measure.timings and decision.describe() == "sdpa-cudnn, 1.25x faster than the attnopt kernel"
    assert sorted(measure.calls) == ["attnopt", "sdpa-cudnn", "sdpa-efficient", "sdpa-flash"]
    assert dispatch.decide(site(), ENV, measure) == decision and len(measure.calls) == 4
    dispatch.clear_memo()
    assert dispatch.decide(site(), ENV, measure) == decision and len(measure.calls) == 4  # read from disk
    (path,) = (tmp_path / "dispatch").iterdir()
    assert json.loads(path.read_text())["key"]["env"]["gpu"] == ENV.gpu


def test_dispatch_attnopt_wins_ties_and_skips_refusing_backends():
    measure = FakeMeasure({"attnopt": 1.0, "sdpa-efficient": 1.0})
    decision = dispatch.decide(site(mask="additive", mask_dims="b__n"), ENV, measure)
    assert decision.backend == "attnopt" and decision.speedup == 1.0 and decision.versus == "sdpa-efficient"
    assert "sdpa-flash" not in measure.calls  # flash takes no mask
    assert set(decision.timings_ms) == {"attnopt", "sdpa-efficient"}


def test_dispatch_keys_separate_buckets_and_devices():
    measure = FakeMeasure({"attnopt": 1.0, "sdpa-flash": 2.0})
    dispatch.decide(site(), ENV, measure)
    dispatch.decide(site(seq_q_bucket=8192, seq_k_bucket=8192), ENV, measure)
    dispatch.decide(site(), dispatch.Environment(gpu="NVIDIA A100", torch="2.11.0", triton="3.6.0"), measure)
    dispatch.decide(site(backward=True), ENV, measure)
    assert measure.calls.count("attnopt") == 4


def test_sdpa_eligibility():
    assert site().sdpa_backends() == dispatch.SDPA_BACKENDS
    assert site(causal=1).sdpa_backends() == dispatch.SDPA_BACKENDS
    assert site(causal=2, same_length=True).sdpa_backends() == dispatch.SDPA_BACKENDS
    assert site(causal=2, same_length=False).sdpa_backends() == ()
    assert "sdpa-flash" not in site(mask="bool", mask_dims="bhmn").sdpa_backends()
    assert site(dropout=True).sdpa_backends() == () and "dropout" in site(dropout=True).sdpa_refusal()
    assert site(group=4).sdpa_backends() == () and "GQA" in site(group=4).sdpa_refusal()


def test_site_of_tensors():
    q, k, v = torch.zeros(2, 8, 1000, 64), torch.zeros(2, 2, 1000, 64), torch.zeros(2, 2, 1000, 32)
    s = dispatch.Site.of(q, k, v, torch.zeros(2, 1, 1, 1000, dtype=torch.bool), 1, 0.0, backward=True)
    assert (s.group, s.mask, s.mask_dims, s.seq_q_bucket, s.batch_heads_bucket) == (4, "bool", "b__n", 1024, 16)
    assert s.head_dim_v == 32 and s.same_length and s.backward


def test_choose_on_cpu_never_runs_the_reference():
    q = torch.zeros(1, 2, 8, 16)
    assert dispatch.choose(q, q, q).backend == dispatch.SDPA_CPU  # SDPA's CPU flash kernel, where it is exact
    assert dispatch.choose(q, q, q, softcap=5.0).backend != "reference"  # the tiled kernel for what it cannot run


def test_fallback_after_a_rejected_configuration():
    first = tuning.select(spec(), 4096, 4096, H100)
    second = tuning.fallback(first, H100)
    assert second == first.replace(strided_kv=True)  # the same tiles without tensor descriptors
    assert tuning.fits(second, SM90)
    assert tuning.select(spec(), 4096, 4096, H100) == second  # remembered for the process
    other = tuning.Device(name="NVIDIA H200", generation=SM90, triton="3.6.0")
    assert tuning.select(spec(), 4096, 4096, other) == first  # per GPU
    last = second
    while (nxt := tuning.fallback(last, H100)) is not None:
        last = nxt
    assert tuning.fallback(last, H100) is None


def test_config_errors():
    from triton.runtime.errors import OutOfResources

    assert tuning.is_config_error(OutOfResources(300000, 232448, "shared memory"))
    assert not tuning.is_config_error(RuntimeError("CUDA error: an illegal memory access"))
