"""Attention sites attnopt rewrites beside the sites Inductor's own attention pass rewrites, per model.

For each zoo model (eager attention, small config, random weights), in one run:

* attnopt: ``attnopt.optimize(model, "exact", ...)``: sites found, sites rewritten exactly, misses;
* Inductor: ``torch.compile(model)`` (default backend) run once, then
  ``torch._dynamo.utils.counters["inductor"]["fuse_attention"]``: the attention patterns its
  ``fuse_attention`` pass replaced by ``scaled_dot_product_attention``.

Prints a table and, with ``--out PATH``, writes the rows as JSON.

    python benchmarks/detection.py [--models gpt2 bert ...] [--impl eager] [--extra] [--out detection.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time
import warnings

import torch
import torch._inductor.config

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import attnopt  # noqa: E402
from attnopt import zoo  # noqa: E402


def _attnopt_counts(z) -> dict:
    torch._dynamo.reset()
    t0 = time.perf_counter()
    opt = attnopt.optimize(z.model, "exact", z.args, z.kwargs)
    rep = attnopt.report(opt)
    return {
        "attnopt_sites": len(rep.sites),
        "attnopt_rewritten": sum(s.decision == "exact" for s in rep.sites),
        "attnopt_misses": len(rep.misses),
        "attnopt_output_deviation": rep.output_deviation,
        "attnopt_seconds": round(time.perf_counter() - t0, 2),
        "attnopt_reasons": sorted({s.reason for s in rep.sites if s.decision != "exact"}
                                  | {m.reason for m in rep.misses}),  # fmt: skip
    }


def _inductor_counts(z) -> dict:
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    t0 = time.perf_counter()
    try:
        # A cached compiled graph skips Inductor's pattern passes (and their counters): compile afresh.
        with torch.no_grad(), torch._inductor.config.patch(fx_graph_cache=False, fx_graph_remote_cache=False):
            torch.compile(z.model)(*z.args, **z.kwargs)
    except Exception as exc:  # report, do not stop the table
        return {"inductor_fused": None, "inductor_error": f"{type(exc).__name__}: {str(exc)[:200]}"}
    return {
        "inductor_fused": int(counters["inductor"]["fuse_attention"]),
        "inductor_seconds": round(time.perf_counter() - t0, 2),
    }


def run(models: list[str], impl: str) -> list[dict]:
    rows = []
    for name in models:
        if impl not in zoo.implementations(name):
            continue
        z = zoo.build(name, impl)
        row = {"model": name, "impl": impl}
        row.update(_attnopt_counts(z))
        z = zoo.build(name, impl)  # a fresh model for Inductor
        row.update(_inductor_counts(z))
        rows.append(row)
        print(_line(row), flush=True)
    return rows


_HEAD = f"{'model':20s} {'impl':6s} {'sites':>5s} {'attnopt':>8s} {'inductor':>8s} {'misses':>6s}"


def _line(r: dict) -> str:
    ind = "error" if r.get("inductor_fused") is None else str(r["inductor_fused"])
    return (f"{r['model']:20s} {r['impl']:6s} {r['attnopt_sites']:5d} {r['attnopt_rewritten']:8d} {ind:>8s} "
            f"{r['attnopt_misses']:6d}")  # fmt: skip


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="*", default=None, help="zoo models (default: the named zoo)")
    p.add_argument("--extra", action="store_true", help="also the architectures beyond the named zoo")
    p.add_argument("--impl", default="eager", choices=["eager", "sdpa"])
    p.add_argument("--out", default=None, help="write the rows as JSON to this path")
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    models = args.models or (list(zoo.NAMES) + (list(zoo.EXTRA_NAMES) if args.extra else []))
    print(f"torch {torch.__version__}, {platform.machine()}, {torch.get_num_threads()} threads; "
          f"attnopt sites rewritten (policy exact) vs Inductor's fuse_attention count, in one run")  # fmt: skip
    print(_HEAD)
    print("-" * len(_HEAD))
    rows = run(models, args.impl)
    total = {k: sum(r[k] or 0 for r in rows) for k in ("attnopt_sites", "attnopt_rewritten", "inductor_fused")}
    print("-" * len(_HEAD))
    print(f"{'total':20s} {'':6s} {total['attnopt_sites']:5d} {total['attnopt_rewritten']:8d} "
          f"{total['inductor_fused']:8d}")  # fmt: skip
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"torch": torch.__version__, "rows": rows, "total": total}, f, indent=2, default=str)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
