"""SASS report of the exact-attention kernels at the tiles attnopt picks by default, compiled without a GPU.

For every exact record (fwd, bwd_dq, bwd_dkdv at D64/D128/D256, causal and not, GQA, a feature-heavy spec)
on sm_80 and sm_90a: registers, spill bytes and shared memory (Triton's metadata), ptxas performance
advisories (``ptxas -v`` on the PTX), and for each loop of the SASS (a backward branch) its instruction
count, HGMMA/HMMA count and warpgroup ops (WARPGROUP.ARRIVE, WARPGROUP.DEPBAR, WARPSYNC). ``--tutorial``
adds Triton's fused-attention tutorial forward at the same tile for comparison.

    TRITON_INTERPRET= PYTHONPATH=$PWD python scripts/exact_sass.py [--only fwd_d128] [--arch sm_90a] [--json out]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from attnopt.codegen import tuning  # noqa: E402
from attnopt.codegen.spec import KernelSpec, default_tiles  # noqa: E402
from attnopt.kernels.exact.offline import launch_signature  # noqa: E402
from attnopt.kernels.exact.render import load_kernel  # noqa: E402

BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
# Triton 3.9 writes PTX 9.x, which only the wheel's newer ptxas (CUDA 13, named ptxas-blackwell) reads.
PTXAS = BIN / "ptxas-blackwell" if (BIN / "ptxas-blackwell").exists() else BIN / "ptxas"
ARCHS = {"sm_80": (80, tuning.GENERATIONS["sm80"]), "sm_90a": (90, tuning.GENERATIONS["sm90"])}
SINGLES = {"mask": dict(mask="bool"), "bias": dict(bias="alibi"), "softcap": dict(softcap=True),
           "dropout": dict(dropout=True), "additive": dict(mask="additive"), "bias_tensor": dict(bias="tensor"),
           "relpos_c2": dict(bias="relpos", causal=2)}
HEAVY = dict(mask="bool", bias="alibi", softcap=True, dropout=True, key_padding=True)


def specs() -> dict[str, KernelSpec]:
    out = {}
    for direction in ("fwd", "bwd_dq", "bwd_dkdv"):
        for d in (64, 128, 256):
            for causal in (0, 2):
                out[f"{direction}_d{d}_c{causal}"] = _spec(direction, d, causal=causal)
        out[f"{direction}_d128_gqa"] = _spec(direction, 128, causal=0, group=4)
        out[f"{direction}_d128_heavy"] = _spec(direction, 128, causal=0, **HEAVY)
        out[f"{direction}_d128_heavy_c2"] = _spec(direction, 128, causal=2, **HEAVY)
        for name, features in SINGLES.items():
            out[f"{direction}_d128_only_{name}"] = _spec(direction, 128, **{"causal": 0, **features})
    return out


def _spec(direction: str, d: int, **features) -> KernelSpec:
    return KernelSpec(direction=direction, head_dim=d, head_dim_v=d, dtype="bfloat16",
                      **{"mask": "none", **features}, **default_tiles(direction, "bfloat16", d, d))


def compile_spec(spec: KernelSpec, cc: int):
    signature, constexprs, attrs = launch_signature(spec)
    src = ASTSource(fn=load_kernel(spec), signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", cc, 32),
                          options=dict(num_warps=spec.num_warps, num_stages=spec.num_stages))


def ptxas_info(ptx: str, arch: str) -> dict:
    """Registers, spill bytes and performance advisories that ``ptxas -v`` reports for ``ptx``."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "k.ptx"
        path.write_text(ptx)
        res = subprocess.run([str(PTXAS), "-v", f"-arch={arch}", str(path), "-o", str(Path(tmp) / "k.o")],
                             capture_output=True, text=True)
    text = res.stdout + res.stderr
    regs = re.search(r"Used (\d+) registers", text)
    spills = [int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", text)]
    advice = sorted({re.sub(r"^.*?info\s*:\s*", "", line).strip()[:90] for line in text.splitlines()
                     if re.search(r"\(C7\d\d\d\)|[Ww]arning|[Aa]dvisory", line)})
    return dict(regs=int(regs.group(1)) if regs else None, spills=max(spills, default=0), advisories=advice)


def sass_loops(cubin: bytes) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "k.cubin"
        path.write_bytes(cubin)
        text = subprocess.run([str(BIN / "cuobjdump"), "-sass", str(path)], capture_output=True, text=True).stdout
    instrs = []  # (address, text)
    for line in text.splitlines():
        m = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?);", line)
        if m:
            instrs.append((int(m.group(1), 16), m.group(2)))
    index = {addr: i for i, (addr, _) in enumerate(instrs)}
    loops = []
    for i, (addr, ins) in enumerate(instrs):
        m = re.search(r"\bBRA\b\s+(?:`\()?0x([0-9a-f]+)", ins)
        if m is None:
            continue
        t = int(m.group(1), 16)
        if t <= addr and t in index:
            body = [x for _, x in instrs[index[t]:i + 1]]
            loops.append(dict(start=t, end=addr, instructions=len(body), **_mix(body)))
    return loops


def _mix(body: list[str]) -> dict:
    ops = [b.split()[1] if b.startswith("@") else b.split()[0] for b in body]
    return dict(hgmma=sum(o.startswith("HGMMA") for o in ops), hmma=sum(o.startswith("HMMA") for o in ops),
                warpgroup=sum(o.startswith("WARPGROUP") or o.startswith("WARPSYNC") for o in ops))


def record(name: str, spec: KernelSpec, arch: str, tiles: tuple[int, ...] | None = None) -> dict:
    cc, gen = ARCHS[arch]
    chosen = tuning.default(spec, gen)
    if tiles:
        chosen = chosen.replace(**dict(zip(("block_m", "block_n", "num_warps", "num_stages"), tiles)))
    rec = dict(name=name, arch=arch, tiles=[chosen.block_m, chosen.block_n, chosen.num_warps, chosen.num_stages])
    try:
        compiled = compile_spec(chosen, cc)
    except Exception as exc:  # noqa: BLE001  (a report line, not a crash)
        return dict(rec, error=f"{type(exc).__name__}: {str(exc)[:300]}")
    md = compiled.metadata
    loops = sass_loops(compiled.asm["cubin"])
    return dict(rec, shared=md.shared, **ptxas_info(compiled.asm["ptx"], arch), loops=loops,
                model_smem=tuning.resources(chosen, gen)[0], model_regs=round(tuning.resources(chosen, gen)[1]))


def interior(rec: dict) -> dict:
    """The interior loop of a record: its first loop (by address) with tensor-core instructions."""
    return next((lp for lp in rec.get("loops", []) if lp["hgmma"] + lp["hmma"]), {})


def markdown(before: list[dict], after: list[dict]) -> str:
    """A before/after table: per record regs, spill bytes, shared bytes, advisories, and the interior loop's
    instructions, HGMMA/HMMA and warpgroup ops."""
    old = {(r["name"], r["arch"]): r for r in before}

    def cells(rec: dict | None) -> str:
        if not rec or "error" in rec:
            return " | ".join(["-"] * 6)
        lp = interior(rec)
        mma = lp.get("hgmma", 0) + lp.get("hmma", 0)
        adv = ", ".join(a.split(")")[0].strip("(") for a in rec["advisories"]) or "-"
        return (f"{'x'.join(map(str, rec['tiles']))} | {rec['regs']} | {rec['spills']} | {rec['shared']} | {adv} | "
                f"{lp.get('instructions', '-')}i {mma}mma {lp.get('warpgroup', '-')}wg")

    head = ("| record | arch | before: tiles | regs | spill B | shared B | advisories | interior loop "
            "| after: tiles | regs | spill B | shared B | advisories | interior loop |")
    lines = [head, "|" + "---|" * 14]
    for rec in after:
        lines.append(f"| {rec['name']} | {rec['arch']} | {cells(old.get((rec['name'], rec['arch'])))} | {cells(rec)} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--only", default="")
    parser.add_argument("--arch", action="append")
    parser.add_argument("--json")
    parser.add_argument("--markdown", nargs=2, metavar=("BEFORE", "AFTER"), help="print a table of two --json runs")
    parser.add_argument("--tiles", action="append", help="BM,BN,W,S instead of the default (repeatable)")
    args = parser.parse_args()
    if args.markdown:
        print(markdown(*(json.loads(Path(p).read_text()) for p in args.markdown)), end="")
        return
    results = []
    for name, spec in specs().items():
        if args.only and not re.search(args.only, name):
            continue
        for arch, tiles in ((a, t) for a in args.arch or list(ARCHS) for t in args.tiles or [None]):
            rec = record(name, spec, arch, tuple(map(int, tiles.split(","))) if tiles else None)
            results.append(rec)
            loops = " ".join(f"[{lp['instructions']}i {lp['hgmma'] + lp['hmma']}mma {lp['warpgroup']}wg]"
                             for lp in rec.get("loops", []))
            print(f"{name:24s} {arch:6s} {str(rec['tiles']):18s} regs {rec.get('regs')} spill {rec.get('spills')} "
                  f"smem {rec.get('shared')} (model {rec.get('model_smem')}) regs-model {rec.get('model_regs')} "
                  f"adv {rec.get('advisories') or rec.get('error', '')} loops {loops}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    sys.exit(main())
