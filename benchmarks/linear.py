"""Linear and sigmoid attention against their references, in one run, with JSON out.

GPU (default): the causal linear-attention cases of ``shared/DESIGN.md`` §3 (H16 D128 bf16: B16 S4k,
B4 S16k, B1 S64k), forward, and forward+backward at B4 S16k: attnopt's generated kernels (plain and
with Lightning's decay) beside fla's ``chunk_linear_attn`` and ``chunk_lightning_attn`` when fla is
installed (for the benchmark only; it is no attnopt dependency) and FlashAttention-2 causal (SDPA's
flash backend) on the same shape; plus fused sigmoid attention against FA2 at D128 S16k.

CPU (``--cpu``): causal linear attention (the chunked CPU path of ``torch.ops.attnopt.linear_attention``)
against dense causal SDPA at S16k H8 D64 fp32, the issue's bar being a 10x speedup; rounds interleave
the cases, and ``--threads`` fixes torch's thread count (on a shared machine, one thread is steadier).

    python benchmarks/linear.py --out linear.json
    python benchmarks/linear.py --cpu --threads 1 --out linear_cpu.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F

import attnopt.kernels.linear  # noqa: F401  (registers torch.ops.attnopt.linear_attention)
import attnopt.kernels.sigmoid  # noqa: F401  (registers torch.ops.attnopt.sigmoid_attention)
from attnopt.kernels.linear.reference import feature_map, lightning_log_decay

GPU_CASES = [(16, 4096), (4, 16384), (1, 65536)]  # (batch, seq) at H16 D128, as the anchors
GPU_HEADS, GPU_DIM = 16, 128


def _linear(q, k, v, log_decay=None, normalize=False):
    """attnopt's causal linear attention on [B, H, S, D] operands (scale 1/sqrt(D), as fla's default)."""
    return torch.ops.attnopt.linear_attention(q, k, v, log_decay, True, normalize, q.shape[-1] ** -0.5, 1e-6, None,
                                              None)[0]  # fmt: skip


def cpu(seq: int, heads: int, dim: int, repeat: int) -> list[dict]:
    """Best and median of ``repeat`` rounds; each round times every case once (interleaved, so that a
    change in the machine's load during the run hits all cases alike)."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, heads, seq, dim, generator=g) for _ in range(3))
    fq, fk = feature_map(q, "elu"), feature_map(k, "elu")
    decay = lightning_log_decay(heads, 0, 12)
    cases = {
        "sdpa_causal_dense": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True),
        "attnopt_linear_causal": lambda: _linear(fq, fk, v, normalize=True),
        "attnopt_linear_causal_lightning_decay": lambda: _linear(fq, fk, v, decay, normalize=True),
    }
    times: dict[str, list[float]] = {name: [] for name in cases}
    with torch.no_grad():
        for fn in cases.values():
            fn()  # warm-up
        for _ in range(repeat):
            for name, fn in cases.items():
                start = time.perf_counter()
                fn()
                times[name].append((time.perf_counter() - start) * 1e3)
    shape = f"B1 H{heads} S{seq} D{dim} fp32"
    base = min(times["sdpa_causal_dense"])
    rows = []
    for name, ts in times.items():
        row = dict(name=name, shape=shape, ms=round(min(ts), 2), median_ms=round(statistics.median(ts), 2))
        if name != "sdpa_causal_dense":
            row["speedup_vs_sdpa"] = round(base / min(ts), 2)
        rows.append(row)
    return rows


def _fla():
    """fla's (chunk_linear_attn, chunk_lightning_attn), or (None, None) when fla is not installed."""
    try:
        from fla.ops.lightning_attn import chunk_lightning_attn
        from fla.ops.linear_attn import chunk_linear_attn
    except ImportError:
        print("fla is not installed: its columns are skipped (pip install flash-linear-attention)", file=sys.stderr)
        return None, None
    return chunk_linear_attn, chunk_lightning_attn


def _bench(fn, repeat: int) -> float:
    from triton.testing import do_bench

    fn()
    torch.cuda.synchronize()
    return do_bench(fn, warmup=25, rep=repeat)


def _gpu_forward(b: int, s: int, repeat: int) -> list[dict]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    chunk_linear_attn, chunk_lightning_attn = _fla()
    q, k, v = (torch.randn(b, GPU_HEADS, s, GPU_DIM, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    decay = lightning_log_decay(GPU_HEADS, 0, 12).cuda()
    cases = [("attnopt_linear", lambda: _linear(q, k, v)), ("attnopt_lightning", lambda: _linear(q, k, v, decay))]
    if chunk_linear_attn is not None:
        qt, kt, vt = (x.transpose(1, 2).contiguous() for x in (q, k, v))  # fla's [B, T, H, D]
        cases += [("fla_chunk_linear_attn", lambda: chunk_linear_attn(qt, kt, vt, normalize=False)),
                  ("fla_chunk_lightning_attn", lambda: chunk_lightning_attn(qt, kt, vt, layer_idx=0, num_layers=12))]
    cases.append(("sdpa_flash_causal", lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)))
    shape = f"B{b} H{GPU_HEADS} S{s} D{GPU_DIM} bf16 causal"
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        return [dict(name=name, shape=shape, direction="fwd", ms=round(_bench(fn, repeat), 4)) for name, fn in cases]


def _gpu_backward(b: int, s: int, repeat: int) -> list[dict]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    chunk_linear_attn, _ = _fla()
    q, k, v = (torch.randn(b, GPU_HEADS, s, GPU_DIM, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))  # fmt: skip
    do = torch.randn_like(q)
    cases = [("attnopt_linear", lambda: _linear(q, k, v))]
    if chunk_linear_attn is not None:
        qt, kt, vt = (x.detach().transpose(1, 2).contiguous().requires_grad_() for x in (q, k, v))
        cases.append(("fla_chunk_linear_attn",
                      lambda: chunk_linear_attn(qt, kt, vt, normalize=False)[0].transpose(1, 2)))  # fmt: skip
    cases.append(("sdpa_flash_causal", lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)))
    shape = f"B{b} H{GPU_HEADS} S{s} D{GPU_DIM} bf16 causal"
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        return [dict(name=name, shape=shape, direction="fwd+bwd",
                     ms=round(_bench(lambda f=fn: f().backward(do), repeat), 4)) for name, fn in cases]  # fmt: skip


def _gpu_sigmoid(s: int, repeat: int) -> list[dict]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v = (torch.randn(1, GPU_HEADS, s, GPU_DIM, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    scale = GPU_DIM**-0.5
    cases = [("attnopt_sigmoid", lambda: torch.ops.attnopt.sigmoid_attention(q, k, v, None, 0, scale, None)),
             ("sdpa_flash", lambda: F.scaled_dot_product_attention(q, k, v))]  # fmt: skip
    flops = 4 * GPU_HEADS * s * s * GPU_DIM
    rows = []
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        for name, fn in cases:
            ms = _bench(fn, repeat)
            rows.append(dict(name=name, shape=f"B1 H{GPU_HEADS} S{s} D{GPU_DIM} bf16 full", direction="fwd",
                             ms=round(ms, 4), tflops=round(flops / ms / 1e9, 1)))  # fmt: skip
    return rows


def gpu(repeat: int) -> list[dict]:
    rows = []
    for b, s in GPU_CASES:
        rows += _gpu_forward(b, s, repeat)
        torch.cuda.empty_cache()
    rows += _gpu_backward(4, 16384, repeat)
    torch.cuda.empty_cache()
    return rows + _gpu_sigmoid(16384, repeat)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu", action="store_true", help="the CPU comparison (chunked linear vs dense SDPA)")
    parser.add_argument("--seq", type=int, default=16384, help="CPU: sequence length")
    parser.add_argument("--heads", type=int, default=8, help="CPU: heads")
    parser.add_argument("--dim", type=int, default=64, help="CPU: head dim")
    parser.add_argument("--threads", type=int, default=None, help="CPU: torch threads (default: torch's choice)")
    parser.add_argument("--repeat", type=int, default=None, help="CPU: timed calls (best taken); GPU: do_bench ms")
    parser.add_argument("--out", help="write the rows as JSON here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.cpu:
        rows = cpu(args.seq, args.heads, args.dim, args.repeat or 5)
    elif not torch.cuda.is_available():
        print("no CUDA device: the GPU benchmark needs one (run with --cpu for the CPU comparison)", file=sys.stderr)
        return 0
    else:
        rows = gpu(args.repeat or 100)
    env = dict(torch=torch.__version__, python=platform.python_version(), threads=torch.get_num_threads(),
               device=torch.cuda.get_device_name() if torch.cuda.is_available() and not args.cpu else platform.processor())
    for row in rows:
        print(json.dumps(row))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(env=env, rows=rows), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
