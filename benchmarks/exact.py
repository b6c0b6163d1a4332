"""Exact attention on one GPU: attnopt beside SDPA (flash, cuDNN, memory-efficient) and compiled FlexAttention.

Runs the shapes of ``shared/DESIGN.md`` §3 in one process, forward and forward+backward, and prints a table
of milliseconds and TFLOP/s (forward: 4·B·H·S²·D, halved when causal; forward+backward: 3.5x that).
It also reports, per head dim and causality, attnopt's error against an fp64 reference next to PyTorch's
own bf16 math attention's error (the target: at most 2x), the cold-start time of a fresh process with
warm caches, and the SDPA-dispatch decision per forward case.

    python benchmarks/exact.py --out results.json [--autotune] [--mode fwd|fwd_bwd|both] [--quick]

Without CUDA it says so and exits 0.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

FWD_CASES = [  # (name, B, H, S, D, causal)
    ("D128 S16k full", 1, 16, 16384, 128, False),
    ("D128 S16k causal", 1, 16, 16384, 128, True),
    ("D128 S4k full", 4, 16, 4096, 128, False),
    ("D64 S16k full", 1, 16, 16384, 64, False),
    ("D64 S16k causal", 1, 16, 16384, 64, True),
    ("D128 S1k full (B16)", 16, 16, 1024, 128, False),
]
FWD_BWD_CASES = [
    ("D128 S16k full", 1, 16, 16384, 128, False),
    ("D128 S16k causal", 1, 16, 16384, 128, True),
    ("D64 S16k full", 1, 16, 16384, 64, False),
    ("D64 S16k causal", 1, 16, 16384, 64, True),
]
PROVIDERS = ("attnopt", "attnopt-dispatch", "sdpa-flash", "sdpa-cudnn", "sdpa-efficient", "flex")

COLD_START = """
import time, torch
t0 = time.perf_counter()
from attnopt.kernels.exact import triton_impl
q = torch.randn(1, 16, 4096, 128, device="cuda", dtype=torch.bfloat16)
t1 = time.perf_counter()
triton_impl.forward(q, q, q, None, 0)
torch.cuda.synchronize()
print(time.perf_counter() - t1, t1 - t0)
"""


def flops(b, h, s, d, causal, backward):
    f = 4 * b * h * s * s * d * (0.5 if causal else 1.0)
    return f * 3.5 if backward else f


def providers(causal, s):
    """name -> fn(q, k, v) -> out, for every provider (each may raise for inputs it does not take)."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    import attnopt  # noqa: F401  (registers torch.ops.attnopt)
    from attnopt.kernels.exact import dispatch, reference

    code = reference.CAUSAL_TOP_LEFT if causal else reference.CAUSAL_NONE
    flex = torch.compile(flex_attention, dynamic=False)
    block_mask = create_block_mask(lambda b, h, i, j: i >= j, None, None, s, s) if causal else None

    def sdpa(backend):
        def run(q, k, v):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        return run

    def op(q, k, v):
        return torch.ops.attnopt.attention(q, k, v, None, 0.0, code, q.shape[-1] ** -0.5, None)[0]

    def kernel(q, k, v):
        with dispatch.disabled():  # attnopt's own kernel, whatever the dispatch would pick
            return op(q, k, v)

    return {
        "attnopt": kernel,
        "attnopt-dispatch": op,  # what an optimized model runs: the faster of the kernel and SDPA's backends
        "sdpa-flash": sdpa(SDPBackend.FLASH_ATTENTION),
        "sdpa-cudnn": sdpa(SDPBackend.CUDNN_ATTENTION),
        "sdpa-efficient": sdpa(SDPBackend.EFFICIENT_ATTENTION),
        "flex": lambda q, k, v: flex(q, k, v, block_mask=block_mask),
    }


def bench_case(name, b, h, s, d, causal, backward, only):
    import torch
    from triton.testing import do_bench

    q, k, v = (torch.randn(b, h, s, d, device="cuda", dtype=torch.bfloat16, requires_grad=backward)
               for _ in range(3))
    dout = torch.randn_like(q)
    rows = []
    for provider, fn in providers(causal, s).items():
        if only and provider not in only:
            continue
        if backward:
            def step(fn=fn):
                q.grad = k.grad = v.grad = None
                fn(q, k, v).backward(dout)
        else:
            def step(fn=fn):
                with torch.no_grad():
                    fn(q, k, v)
        try:
            step()
            torch.cuda.synchronize()
            ms = do_bench(step, warmup=25, rep=100)
        except Exception as exc:  # noqa: BLE001  (a provider that cannot run the case is reported, not fatal)
            rows.append(dict(case=name, mode="fwd_bwd" if backward else "fwd", provider=provider,
                             error=f"{type(exc).__name__}: {str(exc)[:120]}"))
            continue
        rows.append(dict(case=name, mode="fwd_bwd" if backward else "fwd", provider=provider, ms=round(ms, 4),
                         tflops=round(flops(b, h, s, d, causal, backward) / ms / 1e9, 1)))
        print_row(rows[-1])
    return rows


def accuracy(d, causal):
    """attnopt's and PyTorch bf16 math's max error against an fp64 reference on B1 H4 S2k."""
    import torch

    from attnopt.kernels.exact import reference, triton_impl

    code = reference.CAUSAL_TOP_LEFT if causal else reference.CAUSAL_NONE
    q, k, v = (torch.randn(1, 4, 2048, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    exact, _ = reference.attention_forward(q.double(), k.double(), v.double(), causal=code)
    ours, _ = triton_impl.forward(q, k, v, None, code)
    scores = (q @ k.transpose(-1, -2)) * d ** -0.5  # PyTorch's bf16 math attention, as a user writes it
    if causal:
        scores = scores.masked_fill(torch.ones(2048, 2048, device="cuda", dtype=torch.bool).triu(1), float("-inf"))
    math_out = torch.softmax(scores, dim=-1) @ v
    err, math_err = ((x.double() - exact).abs().max().item() for x in (ours, math_out))
    return dict(head_dim=d, causal=causal, attnopt_err=err, math_err=math_err, ratio=err / math_err)


def cold_start():
    """Seconds to the first forward in a fresh process, twice (the second has warm Triton and tuning caches)."""
    times = []
    for _ in range(2):
        out = subprocess.run([sys.executable, "-c", COLD_START], capture_output=True, text=True, check=True,
                             cwd=Path(__file__).resolve().parents[1])
        first_call, imports = (float(x) for x in out.stdout.split())
        times.append(dict(first_call_s=round(first_call, 3), import_s=round(imports, 3)))
    return times


def dispatch_decisions():
    import torch

    from attnopt.kernels.exact import dispatch, reference

    decisions = []
    for name, b, h, s, d, causal in FWD_CASES:
        q, k, v = (torch.randn(b, h, s, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        code = reference.CAUSAL_TOP_LEFT if causal else reference.CAUSAL_NONE
        decision = dispatch.choose(q, k, v, None, code)
        decisions.append(dict(case=name, backend=decision.backend, speedup=round(decision.speedup, 3),
                              versus=decision.versus, timings_ms=decision.timings_ms, note=decision.note,
                              runs=decision.describe()))
        print(f"dispatch {name:22s} {decision.describe()}")
    return decisions


def print_row(row):
    result = f"{row['ms']:9.3f} ms {row['tflops']:7.1f} TFLOP/s" if "ms" in row else row["error"]
    print(f"{row['mode']:8s} {row['case']:22s} {row['provider']:15s} {result}", flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="write the results as JSON to this file")
    parser.add_argument("--mode", choices=("fwd", "fwd_bwd", "both"), default="both")
    parser.add_argument("--providers", default=",".join(PROVIDERS), help=f"comma-separated subset of {PROVIDERS}")
    parser.add_argument("--autotune", action="store_true", help="autotune attnopt's tiles first (persisted)")
    parser.add_argument("--quick", action="store_true", help="skip accuracy, cold start and dispatch")
    args = parser.parse_args(argv)

    import torch

    if not torch.cuda.is_available():
        print("benchmarks/exact.py: no CUDA device; nothing measured.")
        return 0
    if args.autotune:
        os.environ["ATTNOPT_AUTOTUNE"] = "1"
    import triton

    torch._dynamo.config.recompile_limit = 1000
    only = set(args.providers.split(","))
    results = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                   time=time.strftime("%Y-%m-%dT%H:%M:%S"), rows=[])
    print(f"{results['device']}  torch {results['torch']}  triton {results['triton']}  bf16")
    if args.mode in ("fwd", "both"):
        for case in FWD_CASES:
            results["rows"] += bench_case(*case, backward=False, only=only)
    if args.mode in ("fwd_bwd", "both"):
        for case in FWD_BWD_CASES:
            results["rows"] += bench_case(*case, backward=True, only=only)
    if not args.quick:
        results["accuracy"] = [accuracy(d, causal) for d in (64, 128) for causal in (False, True)]
        for row in results["accuracy"]:
            kind = "causal" if row["causal"] else "full"
            print(f"error D{row['head_dim']} {kind:6s} attnopt {row['attnopt_err']:.2e}"
                  f"  bf16 math {row['math_err']:.2e}  ratio {row['ratio']:.2f}")
        results["cold_start"] = cold_start()
        print(f"cold start (fresh process, first forward): {results['cold_start']}")
        results["dispatch"] = dispatch_decisions()
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
