r"""Tile shapes: a resource model, candidate pruning, deterministic defaults, autotuning and its cache.

A kernel's tile configuration is ``(block_m, block_n, num_warps, num_stages)``; the rest of its spec
(the *features*) is fixed by the call. This module chooses the configuration.

Resource model (sympy, per GPU generation). With ``E`` bytes per element, padded head dims ``D``
and ``DV``, ``S`` pipeline stages and ``W`` warps, Triton keeps the resident operand tile of a kernel
in shared memory once and multi-buffers the streamed tiles ``S`` times::

    smem_fwd  = E (BM D + S BN (D + DV)) + S BM BN MB + 1024 T    Q resident, K and V streamed
    smem_dq   = E (BM (D + DV) + S BN (D + DV)) + S BM BN MB      Q and dO resident, K and V streamed
    smem_dkdv = E (BN (D + DV) + S BM (D + DV)) + 8 S BM + S BM BN MB
                                                  K and V resident, Q and dO streamed (with lse2, delta)

Every tile also loads its per-score tensors: ``MB`` bytes per score (:func:`score_bytes`: 1 for a boolean
mask, ``E`` for an additive mask and for a bias tensor), pipelined like the streamed tiles (``S - 1``
tiles in flight) plus one tile of scratch where Triton converts the loaded tile to the score layout
(dropout counts one byte: its keep-mask goes through the same conversion)
(measured: the feature-heavy forward on sm_90a at 64x64/8 warps/2 stages allocates 90,144 B for a model
of 91,136 B; at 64x128/8/3, 237,624 B for 238,592 B). ``T = 1`` when the forward reads K and V through
tensor descriptors (TMA, sm90+; :func:`for_generation`): Triton adds its barriers, at most 1 KiB (56 B for
the default D128 forward).

Registers per thread: a fixed part (addresses, indices, softmax statistics) plus the fp32
accumulator and the score-sized tiles live in the inner loop (scores, probabilities, and in the
backward dP and dS), spread over the ``32 W`` threads, plus, where the tensor-core instruction reads
its A operand from registers (``AR = 1``: mma.sync on sm80-sm89; ``AR = 0``: wgmma on sm90+ reads it
from shared memory), the resident operand::

    regs_fwd  = 56 + (1.15 BM DV        + 1.6 BM BN  + AR E/4 BM D) / (32 W)          + F BM BN / (32 W)
    regs_dq   = 64 + (0.9 BM D          + 2.35 BM BN + AR E/4 BM (D + DV)) / (32 W)   + 2 F BM BN / (32 W)
    regs_dkdv = 72 + (0.9 BN (D + DV)   + 2.75 BN BM + AR E/4 BN (D + DV)) / (32 W)   + 2.5 F BM BN / (32 W)

``F`` (:data:`FEATURE_REGISTERS`, summed by :func:`feature_registers`) is what the score features keep
per score element and thread: mask and bias tiles with their per-stage addresses, the relative-position
gather (bucket and table loads), ALiBi distances, the softcap's tanh, dropout's Philox counters and
keep-mask (the largest); the backward keeps them for both P and dS (2x in dQ, 2.5x in dK/dV, whose
transposed tiles convert layouts). Fit: the smallest values that move every single-feature spec and the
feature-heavy one (bool mask, ALiBi, softcap, dropout, key lengths) at D128 bf16 off the tiles where
ptxas spilled, on sm_80 and sm_90a (``scripts/exact_sass.py``). E.g. the heavy forward spilled 4 B at
128x64/8 warps and none at 64x64/8; the dropout dQ 8 B at 64x64/8 and none at 64x32/8; the heavy dK/dV
44 B at 32x64/8; the causal relative-position forward 464 B at 128x64/8 and none at 64x128/8, its dQ
4 B at 64x64/8 on sm_80.

The shared-memory formulas are Triton's own allocation on sm90 (within 256 bytes) (checked against Triton 3.9 compiling
for sm_90a; on sm80 Triton needs less, so they are conservative there). The register coefficients are
a least-squares fit to ``ptxas -v`` over the bf16 tile grid at head dims 64 and 128 on sm_90a, rounded
up; every configuration that spilled there more than a few bytes is predicted above the limit. A
candidate fits when its shared memory is within the generation's per-block limit and its registers
within 255 per thread (above that the compiler spills). The autotuner measures among the candidates
the model keeps.

Choice, in :func:`select`: the on-disk tuning cache (keyed by the features, the shape bucket, the GPU
name and the Triton version) if it has the call's key; else, when autotuning is on
(``ATTNOPT_AUTOTUNE=1`` or :func:`autotuning`), every pruned candidate is timed once and the winner
persisted; else the deterministic default: the first entry of the direction's preference list
that fits the generation. Should the compiler still reject a configuration, the launcher falls back
to the next preference that fits (:func:`fallback`) and remembers the failure for the process. Shape
buckets are the next powers of two of Sq and Sk, so sequence lengths within a bucket never re-tune.
Without a GPU (the interpreter) the spec's own default tiles are kept.

Autotuning runs inside the first call of a new key (do not capture that call in a CUDA graph); the
candidates are launched on the call's own tensors, whose outputs the final launch rewrites.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from attnopt.codegen.cache import cache_root, key_digest, read_keyed, write_keyed
from attnopt.codegen.spec import TILE_FIELDS, KernelSpec, next_pow2



@functools.lru_cache(maxsize=None)
def model() -> dict[str, tuple]:
    """``{direction: (shared memory bytes, registers per thread)}`` as sympy expressions of
    ``BM, BN, D, DV, S, W, E, AR`` (see the module docstring). sympy is imported here, on first use:
    a call whose tiles come from the tuning cache never needs it."""
    import sympy

    BM, BN, D, DV, S, W, E, AR, MB, F, T = sympy.symbols("BM BN D DV S W E AR MB F T", positive=True)  # noqa: N806
    scores = S * BM * BN * MB  # per-tile mask and bias loads: S - 1 in flight, one converted to the score layout
    features = F * BM * BN / (32 * W)  # registers the features add per score element (more in the backward)
    return {
        "fwd": (E * (BM * D + S * BN * (D + DV)) + scores + 1024 * T,
                56 + (sympy.Rational(115, 100) * BM * DV + sympy.Rational(16, 10) * BM * BN
                      + AR * E / 4 * BM * D) / (32 * W) + features),
        "bwd_dq": (E * (BM * (D + DV) + S * BN * (D + DV)) + scores,
                   64 + (sympy.Rational(9, 10) * BM * D + sympy.Rational(235, 100) * BM * BN
                         + AR * E / 4 * BM * (D + DV)) / (32 * W) + 2 * features),
        "bwd_dkdv": (E * (BN * (D + DV) + S * BM * (D + DV)) + 8 * S * BM + scores,
                     72 + (sympy.Rational(9, 10) * BN * (D + DV) + sympy.Rational(275, 100) * BN * BM
                           + AR * E / 4 * BN * (D + DV)) / (32 * W) + 5 * features / 2),
        "bwd_pre": (sympy.Integer(0), 20 + 2 * BM * DV / (32 * W)),
    }


MAX_REGS_PER_THREAD = 255


@dataclass(frozen=True)
class Generation:
    """Per-block limits of a GPU generation."""

    name: str
    smem_per_block: int  # bytes, the opt-in maximum
    operand_a_in_registers: bool  # mma.sync (sm80-sm89) vs wgmma (sm90+)
    tma: bool = False  # tensor descriptors copy tiles by TMA (sm90+)


GENERATIONS = {
    "sm80": Generation("sm80", 163 * 1024, True),  # A100, A30
    "sm86": Generation("sm86", 99 * 1024, True),  # A10, A40, RTX 30xx
    "sm89": Generation("sm89", 99 * 1024, True),  # L4, L40, RTX 40xx
    "sm90": Generation("sm90", 227 * 1024, False, tma=True),  # H100, H200
    "sm100": Generation("sm100", 227 * 1024, False, tma=True),  # B200
}


def for_generation(spec: KernelSpec, gen: Generation) -> KernelSpec:
    """``spec`` as ``gen`` runs it: before sm90 (no TMA) the forward reads K and V through pointers."""
    if spec.direction == "fwd" and not gen.tma and not spec.strided_kv:
        return spec.replace(strided_kv=True)
    return spec


def generation(capability: tuple[int, int]) -> Generation:
    """The generation of a CUDA compute capability: the newest known one not newer than it."""
    known = sorted(GENERATIONS.values(), key=lambda g: _capability(g.name))
    fitting = [g for g in known if _capability(g.name) <= tuple(capability)]
    if not fitting:
        raise ValueError(f"attnopt kernels need compute capability >= 8.0; got {capability}")
    return fitting[-1]


def _capability(name: str) -> tuple[int, int]:
    digits = name[2:]
    return int(digits[:-1]), int(digits[-1])


@functools.lru_cache(maxsize=None)
def _model(direction: str) -> tuple[Callable, Callable]:
    """The direction's model compiled to plain Python functions of ``(BM, BN, D, DV, S, W, E, AR)``."""
    import sympy

    smem, regs = model()[direction]
    args = sympy.symbols("BM BN D DV S W E AR MB F T", positive=True)
    return sympy.lambdify(args, smem), sympy.lambdify(args, regs)


def resources(spec: KernelSpec, gen: Generation) -> tuple[int, float]:
    """``(shared memory bytes, registers per thread)`` of ``spec`` on ``gen`` under the model."""
    smem, regs = _model(spec.direction)
    values = (spec.block_m, spec.block_n, spec.block_d, spec.block_dv, spec.num_stages, spec.num_warps,
              spec.itemsize, int(gen.operand_a_in_registers), score_bytes(spec), feature_registers(spec),
              int(spec.direction == "fwd" and not spec.strided_kv))
    return int(smem(*values)), float(regs(*values))


def score_bytes(spec: KernelSpec) -> int:
    """``MB``: bytes per score element of the tensors a kernel loads tile by tile (mask, bias tensor), and
    one for dropout, whose keep-mask Triton converts between layouts through shared memory (measured: the
    dropout forward on sm_90a at 64x64/8 warps/2 stages allocates 4 KiB more than without it)."""
    mask = {"none": 0, "bool": 1, "additive": spec.itemsize}[spec.mask]
    return mask + (spec.itemsize if spec.bias == "tensor" else 0) + int(spec.dropout)


# ``F``: registers per score element and thread group that a feature adds (see the module docstring's fit).
FEATURE_REGISTERS = {"mask": 1.5, "bias": 1.5, "relpos": 3.0, "alibi": 0.25, "key_padding": 0.0, "softcap": 0.5,
                     "dropout": 4.0}


def feature_registers(spec: KernelSpec) -> float:
    """``F`` of ``spec``: the sum of :data:`FEATURE_REGISTERS` over its features."""
    used = dict(mask=spec.mask != "none", bias=spec.bias == "tensor", relpos=spec.bias == "relpos",
                alibi=spec.bias == "alibi",
                key_padding=spec.key_padding, softcap=spec.softcap, dropout=spec.dropout)
    return sum(FEATURE_REGISTERS[name] for name, on in used.items() if on)


def fits(spec: KernelSpec, gen: Generation) -> bool:
    smem, regs = resources(spec, gen)
    return smem <= gen.smem_per_block and regs <= MAX_REGS_PER_THREAD


# (block_m, block_n, num_warps, num_stages), most preferred first. For bwd_dkdv block_n is the resident key tile.
PREFERENCES = {
    "fwd": [(128, 128, 8, 3), (128, 64, 8, 3), (64, 128, 8, 3), (64, 64, 8, 2), (64, 64, 4, 2), (64, 32, 4, 2),
            (32, 32, 4, 2), (32, 32, 4, 1), (16, 16, 4, 1)],
    "bwd_dq": [(128, 64, 8, 3), (64, 64, 8, 3), (64, 64, 4, 2), (64, 32, 8, 2), (64, 32, 4, 2), (32, 32, 4, 2),
               (32, 32, 4, 1), (16, 16, 4, 1)],
    "bwd_dkdv": [(32, 128, 8, 3), (16, 128, 8, 3), (32, 64, 8, 3), (16, 64, 8, 3), (32, 64, 4, 2), (16, 64, 4, 2),
                 (16, 32, 4, 2), (16, 32, 4, 1), (16, 16, 4, 1)],
    "bwd_pre": [(128, 16, 4, 1), (64, 16, 4, 1), (32, 16, 4, 1), (16, 16, 4, 1)],
}
# Head dims above 128: ptxas spills the backward's 64x64 dQ tiles (1 KB on sm_90a) and 32-row dK/dV query tiles
# (108 B) although the register model keeps them; these lists start below them (measured: no spill at D256).
WIDE_PREFERENCES = {
    "bwd_dq": [(64, 32, 8, 2), (32, 32, 4, 2), (32, 32, 4, 1), (16, 16, 4, 1)],
    "bwd_dkdv": [(16, 64, 8, 3), (16, 64, 4, 2), (16, 32, 4, 2), (16, 32, 4, 1), (16, 16, 4, 1)],
}


def preferences(spec: KernelSpec) -> list[tuple[int, int, int, int]]:
    """The direction's tile preferences for ``spec``'s head dims, most preferred first."""
    if max(spec.block_d, spec.block_dv) > 128 and spec.direction in WIDE_PREFERENCES:
        return WIDE_PREFERENCES[spec.direction]
    return PREFERENCES[spec.direction]


def _with(spec: KernelSpec, tiles: tuple[int, int, int, int]) -> KernelSpec:
    return spec.replace(**dict(zip(TILE_FIELDS, tiles)))


def candidates(spec: KernelSpec, gen: Generation) -> list[KernelSpec]:
    """Every tile configuration of ``spec``'s features that fits ``gen``, in a fixed order."""
    spec = for_generation(spec, gen)
    if spec.direction == "bwd_pre":
        grid = [(bm, 16, 4, 1) for bm in (32, 64, 128)]
    else:
        streamed = (16, 32, 64) if spec.direction == "bwd_dkdv" else (32, 64, 128)
        resident = (32, 64, 128)
        pairs = [(m, n) for m in streamed for n in resident] if spec.direction == "bwd_dkdv" else \
            [(m, n) for m in resident for n in streamed]
        # 8 warps only pay off on tiles of at least 64x64.
        grid = [(m, n, w, s) for m, n in pairs for w in (4, 8) for s in (2, 3, 4) if w == 4 or m * n >= 64 * 64]
    fitting = [c for c in (_with(spec, t) for t in grid) if fits(c, gen)]
    return fitting or [default(spec, gen)]


def default(spec: KernelSpec, gen: Generation) -> KernelSpec:
    """The deterministic choice without tuning: the first preference that fits, else the smallest candidate."""
    spec = for_generation(spec, gen)
    for tiles in preferences(spec):
        chosen = _with(spec, tiles)
        if fits(chosen, gen):
            return chosen
    return _with(spec, preferences(spec)[-1])


# ----------------------------------------------------------------------------------------------------------------
# Tuning cache


def bucket(n: int) -> int:
    """The shape bucket of a sequence length: its next power of two, at least 16."""
    return max(16, next_pow2(n))


@dataclass(frozen=True)
class Device:
    """What a tuning result depends on besides the spec and the shape."""

    name: str  # e.g. "NVIDIA H100 80GB HBM3"
    generation: Generation
    triton: str  # Triton's version


def tuning_key(spec: KernelSpec, seq_q: int, seq_k: int, device: Device) -> dict:
    features = {k: v for k, v in spec.to_dict().items() if k not in TILE_FIELDS}
    return dict(features=features, seq_q_bucket=bucket(seq_q), seq_k_bucket=bucket(seq_k), gpu=device.name,
                triton=device.triton)


def tuning_path(key: dict) -> Path:
    return cache_root() / "tuning" / f"{key['features']['direction']}_{key_digest(key)}.json"


_MEMO: dict[str, dict] = {}
_LOCK = threading.Lock()
_AUTOTUNE = threading.local()


def load_entry(key: dict) -> dict | None:
    """The cached tuning result for ``key`` (memoized in the process), or None."""
    path = tuning_path(key)
    memo_key = str(path)
    with _LOCK:
        if memo_key in _MEMO:
            return _MEMO[memo_key]
    entry = read_keyed(path, key)
    if entry is None:
        return None
    with _LOCK:
        _MEMO[memo_key] = entry
    return entry


def store_entry(key: dict, entry: dict) -> Path:
    path = write_keyed(tuning_path(key), entry)
    with _LOCK:
        _MEMO[str(path)] = entry
    return path


def clear_memo() -> None:
    """Forgets the tuning results read and the configuration failures seen in this process (the files stay)."""
    with _LOCK:
        _MEMO.clear()
        _FAILED.clear()


def autotune_enabled() -> bool:
    override = getattr(_AUTOTUNE, "value", None)
    return override if override is not None else os.environ.get("ATTNOPT_AUTOTUNE") == "1"


@contextlib.contextmanager
def autotuning(enabled: bool = True) -> Iterator[None]:
    """Turns autotuning on (or off) for the calls made inside the block, in this thread."""
    previous = getattr(_AUTOTUNE, "value", None)
    _AUTOTUNE.value = enabled
    try:
        yield
    finally:
        _AUTOTUNE.value = previous


def autotune(spec: KernelSpec, key: dict, gen: Generation, run: Callable[[KernelSpec], None],
             timer: Callable[[Callable[[], None]], float], progress: bool = True) -> dict:
    """Times ``run(candidate)`` for every pruned candidate with ``timer`` (ms), persists and returns the entry.

    A candidate that fails to compile or launch (the model is approximate) is recorded and skipped.
    """
    pool = candidates(spec, gen)
    results = []
    with _progress(f"tuning {spec.direction} ({len(pool)} configs)", len(pool), progress) as advance:
        for cand in pool:
            tiles = [getattr(cand, f) for f in TILE_FIELDS]
            try:
                ms = float(timer(lambda cand=cand: run(cand)))
            except Exception as exc:  # noqa: BLE001  (a config the compiler rejects is skipped, not fatal)
                results.append(dict(tiles=tiles, error=f"{type(exc).__name__}: {exc}"[:200]))
            else:
                results.append(dict(tiles=tiles, ms=ms))
            advance()
    timed = [r for r in results if "ms" in r]
    if not timed:
        raise RuntimeError(f"no tile configuration of {spec.name} ran: {results[:3]}")
    best = min(timed, key=lambda r: r["ms"])
    entry = dict(key=key, tiles=dict(zip(TILE_FIELDS, best["tiles"])), ms=best["ms"], results=results,
                 created=time.strftime("%Y-%m-%dT%H:%M:%S"))
    store_entry(key, entry)
    return entry


@contextlib.contextmanager
def _progress(description: str, total: int, enabled: bool):
    """A rich progress bar on stderr (when ``enabled``); yields the function that advances it."""
    if not enabled:
        yield lambda: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (TextColumn("[bold]attnopt[/] {task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn())
    with Progress(*columns, console=Console(file=sys.stderr), transient=True) as bar:
        task = bar.add_task(description, total=total)
        yield lambda: bar.advance(task)


def select(spec: KernelSpec, seq_q: int, seq_k: int, device: Device | None,
           run: Callable[[KernelSpec], None] | None = None,
           timer: Callable[[Callable[[], None]], float] | None = None) -> KernelSpec:
    """The spec to launch: ``spec``'s features with the tiles chosen as the module docstring says.

    ``device`` None (no GPU: the interpreter) keeps ``spec``. ``run`` launches a candidate on the
    call's tensors, needed only when tuning; ``timer`` defaults to ``triton.testing.do_bench``.
    """
    if device is None:
        return spec
    spec = for_generation(spec, device.generation)
    key = tuning_key(spec, seq_q, seq_k, device)
    entry = load_entry(key)
    if entry is None and run is not None and autotune_enabled():
        if timer is None:
            from triton.testing import do_bench

            timer = functools.partial(do_bench, warmup=5, rep=20)
        entry = autotune(spec, key, device.generation, run, timer)
    chosen = spec.replace(**entry["tiles"]) if entry is not None else default(spec, device.generation)
    if (device.name, chosen) in _FAILED:
        return fallback(chosen, device) or chosen
    return chosen


_FAILED: set[tuple[str, KernelSpec]] = set()  # (GPU name, spec) that failed to compile or launch in this process


def fallback(failed: KernelSpec, device: Device) -> KernelSpec | None:
    """Records that ``failed`` did not compile or launch on ``device`` and returns the first preference
    that fits and has not failed (None when none is left); a forward with tensor descriptors first retries
    the same tiles with pointers. The resource model is approximate: this is
    the safety net for a configuration the compiler rejects (out of shared memory, say)."""
    with _LOCK:
        _FAILED.add((device.name, failed))
    pointers = failed.replace(strided_kv=True) if failed.direction == "fwd" else failed
    if (device.name, pointers) not in _FAILED and fits(pointers, device.generation):
        return pointers  # a forward that failed with tensor descriptors retries its tiles with pointers first
    for tiles in preferences(failed):
        candidate = _with(failed, tiles)
        if fits(candidate, device.generation) and (device.name, candidate) not in _FAILED:
            return candidate
    return None


def is_config_error(exc: BaseException) -> bool:
    """Whether ``exc`` is Triton rejecting a tile configuration (out of resources, failed compilation)."""
    from triton.compiler.errors import CompilationError
    from triton.runtime.errors import OutOfResources

    return isinstance(exc, (OutOfResources, CompilationError))


@functools.lru_cache(maxsize=None)
def cuda_device(index: int) -> Device:
    """The :class:`Device` of CUDA device ``index`` (imports triton for its version)."""
    import torch
    import triton

    return Device(name=torch.cuda.get_device_name(index),
                  generation=generation(torch.cuda.get_device_capability(index)), triton=triton.__version__)
