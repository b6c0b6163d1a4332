"""Ahead-of-time build: attnopt's kernels compiled for real GPU targets on a machine without a GPU.

Triton's frontend and NVIDIA backend run anywhere; only a launch needs the GPU. :func:`build` compiles
every kernel the launchers would run for the scenarios of :mod:`attnopt.kernels.aot_scenarios`, for each
target architecture, with the tiles attnopt picks on that GPU, and writes per kernel ``OUT/ARCH/NAME.ptx``
and ``OUT/ARCH/NAME.cubin`` and, for all of them, ``OUT/report.json``: what the hardware would run
(registers, spills, shared memory, ptxas's performance advisories, the tensor-core instructions and the
interior loop of the SASS, :mod:`attnopt.kernels.sass`) and what of it breaks a resource gate
(:func:`problems`): a compile error, a spill, a serialized wgmma pipeline, or shared memory above the arch's
per-block limit. The ptx and cubin files are for inspection and shipping; attnopt itself compiles through
Triton's JIT at the first launch (and Triton keeps its own cache).

Needs a process without ``TRITON_INTERPRET=1`` (the interpreter replaces ``@triton.jit`` functions).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from attnopt.codegen import tuning
from attnopt.kernels import sass
from attnopt.kernels.aot_scenarios import Launch, arch_spec, capture, load, scenarios

# Targets by name: Triton's GPUTarget arch number (sm_90a and sm_100a are what Triton compiles for 90 and 100).
ARCHS = {"sm_80": 80, "sm_90a": 90, "sm_100a": 100}


def shared_limit(arch: str) -> int:
    """The per-block shared-memory limit of ``arch`` in bytes (opt-in maximum), from attnopt's tuning model."""
    return tuning.generation(divmod(ARCHS[arch], 10)).smem_per_block


def check_archs(archs: list[str]) -> None:
    """ValueError naming the supported targets when an arch is unknown or the bundled ptxas cannot build it."""
    for arch in archs:
        if arch not in ARCHS:
            raise ValueError(f"unknown arch {arch!r}; attnopt kernels build knows {', '.join(ARCHS)}")
        ptxas = sass.tool("ptxas", ARCHS[arch])
        supported = sass.supported_archs(ptxas)
        if arch not in supported:
            raise ValueError(f"the ptxas in Triton's wheel ({ptxas}) cannot build {arch}; it supports "
                             f"{', '.join(a for a in supported if a in ARCHS) or 'none of ' + ', '.join(ARCHS)} "
                             f"(all its targets: {', '.join(supported)})")  # fmt: skip


def specialization(kernel, args: dict, capability: int, num_warps: int, num_stages: int):
    """``(signature, constexprs, attrs)`` of a launch of ``kernel`` with ``args`` on ``capability``, computed
    with Triton's own argument binder (integers equal to 1 become constants, 16-divisible ones and
    pointers carry ``tt.divisibility``)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    backend = make_backend(GPUTarget("cuda", capability, 32))
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specs, _ = binder(**args, num_warps=num_warps, num_stages=num_stages)
    signature, constexprs, attrs = {}, {}, {}
    for i, (param, (kind, attr)) in enumerate(zip(kernel.params, specs)):
        signature[param.name] = kind
        if kind == "constexpr":
            constexprs[(i,)] = bound[param.name]
        elif isinstance(attr, str):
            attrs[(i,)] = backend.parse_attr(attr)
    return signature, constexprs, attrs


def compile_kernel(kernel, args: dict, capability: int, num_warps: int, num_stages: int):
    """The ``triton.compile`` result of ``kernel`` for ``capability`` (e.g. 90 -> sm_90a)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature, constexprs, attrs = specialization(kernel, args, capability, num_warps, num_stages)
    source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(source, target=GPUTarget("cuda", capability, 32),
                          options=dict(num_warps=num_warps, num_stages=num_stages))


def _tiles(spec) -> dict:
    names = dict(block_m="BLOCK_M", block_n="BLOCK_N", chunk="CHUNK", block_dv="BLOCK_DV", num_warps="num_warps",
                 num_stages="num_stages")  # fmt: skip
    return {label: getattr(spec, field) for field, label in names.items() if hasattr(spec, field)
            and (field != "block_dv" or not hasattr(spec, "block_m"))}  # fmt: skip


def _measure(compiled, arch: str, capability: int) -> dict:
    """The resource and SASS fields of a record from a compiled kernel."""
    info = sass.run_ptxas(compiled.asm["ptx"], arch, capability)
    instructions = sass.parse_sass(sass.disassemble(compiled.asm["cubin"]))
    total = sass.mix(instructions)
    return dict(registers=info.registers, spill_bytes=info.spill_bytes, stack_bytes=info.stack_bytes,
                shared_bytes=compiled.metadata.shared, advisories=list(info.advisories),
                serialized_wgmma=info.serialized_wgmma, hgmma=total["hgmma"], hmma=total["hmma"],
                utcmma=total["utcmma"], instructions=total["instructions"],
                interior_loop=sass.interior_loop(instructions))  # fmt: skip


def record(launch: Launch, arch: str, out: Path | None = None, memo: dict | None = None) -> dict:
    """Compiles ``launch``'s kernel for ``arch`` and returns its report record (with ``error`` on failure);
    writes ``out/arch/NAME.ptx`` and ``.cubin`` when ``out`` is given. ``memo`` keeps the compiled kernels by
    arch and kernel name, so a kernel several scenarios launch (the backward's preprocessing) compiles once."""
    capability = ARCHS[arch]
    memo = {} if memo is None else memo
    family = launch.scenario.family
    spec = arch_spec(family, launch.spec, capability)
    rec = dict(arch=arch, name=launch.name, family=family, kernel=launch.kernel, kernel_name=spec.name,
               head_dim=launch.scenario.head_dim, causal=launch.scenario.causal,
               dtype=getattr(spec, "dtype", launch.scenario.dtype), tiles=_tiles(spec),
               shared_limit=shared_limit(arch))  # fmt: skip
    start = time.perf_counter()
    if (arch, spec.name) not in memo:
        try:
            compiled = compile_kernel(load(family, spec), launch.args, capability, spec.num_warps, spec.num_stages)
            memo[arch, spec.name] = compiled, _measure(compiled, arch, capability)
        except Exception as exc:  # noqa: BLE001  (a failed kernel is a record with its error; the build goes on)
            memo[arch, spec.name] = None, dict(error=f"{type(exc).__name__}: {exc}"[:4000])
    compiled, measured = memo[arch, spec.name]
    rec.update(measured, compile_seconds=round(time.perf_counter() - start, 2))
    if out is not None and compiled is not None:
        folder = out / arch
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{launch.name}.ptx").write_text(compiled.asm["ptx"])
        (folder / f"{launch.name}.cubin").write_bytes(compiled.asm["cubin"])
    rec["problems"] = problems(rec)
    return rec


def problems(rec: dict) -> list[str]:
    """What in a record breaks the CI gate: a compile error, any spill, a serialized-wgmma advisory,
    shared memory above the arch's limit."""
    if rec.get("error"):
        return ["compile error"]
    found = []
    if rec["spill_bytes"]:
        found.append(f"spills {rec['spill_bytes']} B")
    if rec["serialized_wgmma"]:
        codes = [a.split(")")[0] + ")" for a in rec["advisories"] if sass.SERIALIZED_WGMMA.search(a)]
        found.append(f"serialized wgmma {' '.join(codes)}")
    if rec["shared_bytes"] > rec["shared_limit"]:
        found.append(f"shared {rec['shared_bytes']} B > {rec['shared_limit']} B")
    return found


@dataclass(frozen=True)
class Build:
    records: list[dict]
    seconds: float

    @property
    def failed(self) -> list[dict]:
        """The records whose kernel did not compile."""
        return [r for r in self.records if r.get("error")]


def build(archs: list[str], out: Path | None, select: Callable[[str], bool] = lambda name: True,
          progress: Callable[[dict], None] | None = None) -> Build:
    """Compiles every captured launch whose name ``select`` keeps, for every arch; writes ``out/report.json``
    (and the ptx/cubin files) when ``out`` is given. ``progress`` is called with each record."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise ValueError("attnopt kernels build needs Triton's compiler, not its interpreter: unset TRITON_INTERPRET")
    check_archs(archs)
    start = time.perf_counter()
    captured = capture(scenarios())
    launches = [launch for launch in captured if select(launch.name)]
    if not launches:
        raise ValueError(f"no kernel matches the selection; the kernels are {', '.join(x.name for x in captured)}")
    records, memo = [], {}
    for arch in archs:
        for launch in launches:
            records.append(record(launch, arch, out, memo))
            if progress is not None:
                progress(records[-1])
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "report.json").write_text(json.dumps(records, indent=1) + "\n")
    return Build(records, round(time.perf_counter() - start, 1))


def table(records: list[dict], title: str):
    """A rich table of the records: tiles, registers, spills, shared memory, tensor-core ops, interior loop."""
    from rich.table import Table

    t = Table(title=title, title_justify="left")
    width = max((len(r["name"]) for r in records), default=4)
    for col in ("arch", "name", "tiles", "regs", "spill", "shared", "tensor ops", "loop instr", "loop mma",
                "loop wg ops", "problems"):  # fmt: skip
        t.add_column(col, justify="left" if col in ("arch", "name", "tiles", "problems") else "right",
                     min_width=width if col == "name" else None)
    for r in records:
        if r.get("error"):
            t.add_row(r["arch"], r["name"], "", "", "", "", "", "", "", "", f"[red]{r['error'][:120]}")
            continue
        tiles = "x".join(str(v) for k, v in r["tiles"].items() if k.isupper())
        tiles += f" w{r['tiles']['num_warps']} s{r['tiles']['num_stages']}"
        loop = r["interior_loop"] or {}
        shared = f"{r['shared_bytes']:,}"
        t.add_row(r["arch"], r["name"], tiles, str(r["registers"]), str(r["spill_bytes"]),
                  shared if r["shared_bytes"] <= r["shared_limit"] else f"[red]{shared}",
                  _tensor_ops(r), str(loop.get("instructions", "-")), str(sass.tensor_ops(loop)) if loop else "-",
                  str(loop.get("warpgroup_ops", "-")), "[red]" + "; ".join(r["problems"]) if r["problems"] else "")  # fmt: skip
    return t


def _tensor_ops(rec: dict) -> str:
    """``32 HGMMA``, ``256 HMMA``, ``80 UTCMMA`` or ``0``: the tensor-core instructions of a record."""
    found = [f"{rec[k]} {k.upper()}" for k in ("hgmma", "hmma", "utcmma") if rec.get(k)]
    return " ".join(found) or "0"
