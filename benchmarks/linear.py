"""Linear and sigmoid attention against their references, in one run, with JSON out.

GPU (default): the causal linear-attention cases of ``shared/DESIGN.md`` §3 (H16 D128 bf16: B16 S4k,
B4 S16k, B1 S64k), forward, and forward+backward at B4 S16k: attnopt's generated kernels (plain and
with Lightning's decay) beside fla's ``chunk_linear_attn`` and ``chunk_lightning_attn`` when fla is
installed (for the benchmark only; it is no attnopt dependency) and FlashAttention-2 causal (SDPA's
flash backend) on the same shape; plus fused sigmoid attention against FA2 at D128 S16k.

CPU (``--cpu``): causal linear attention (the chunked CPU path of ``torch.ops.attnopt.linear_attention``)
against dense causal SDPA at S16k H8 D64 fp32, the issue's bar being a 10x speedup.

    python benchmarks/linear.py --out linear.json
    python benchmarks/linear.py --cpu --out linear_cpu.json
"""

from __future__ import annotations

import argparse
import json
import math
import platform
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


def _cpu_time(fn, repeat: int) -> float:
    """Best of ``repeat`` timed calls after one warm-up, in milliseconds."""
    fn()
    best = math.inf
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best * 1e3


def cpu(seq: int, heads: int, dim: int, repeat: int) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, heads, seq, dim, generator=g) for _ in range(3))
    fq, fk = feature_map(q, "elu"), feature_map(k, "elu")
    decay = lightning_log_decay(heads, 0, 12)
    shape = f"B1 H{heads} S{seq} D{dim} fp32"
    rows = []
    with torch.no_grad():
        sdpa = _cpu_time(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True), max(1, repeat // 2))
        rows.append(dict(name="sdpa_causal_dense", shape=shape, ms=round(sdpa, 2)))
        for name, fn in (
            ("attnopt_linear_causal", lambda: _linear(fq, fk, v, normalize=True)),
            ("attnopt_linear_causal_lightning_decay", lambda: _linear(fq, fk, v, decay, normalize=True)),
        ):
            ms = _cpu_time(fn, repeat)
            rows.append(dict(name=name, shape=shape, ms=round(ms, 2), speedup_vs_sdpa=round(sdpa / ms, 2)))
    return rows


def gpu(repeat: int) -> list[dict]:
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from triton.testing import do_bench

    try:
        from fla.ops.lightning_attn import chunk_lightning_attn
        from fla.ops.linear_attn import chunk_linear_attn
    except ImportError:
        chunk_linear_attn = chunk_lightning_attn = None
        print("fla is not installed: its columns are skipped (pip install flash-linear-attention)", file=sys.stderr)

    def bench(fn) -> float:
        fn()
        torch.cuda.synchronize()
        return do_bench(fn, warmup=25, rep=repeat)

    rows = []
    dev, dt = "cuda", torch.bfloat16
    decay = lightning_log_decay(GPU_HEADS, 0, 12).to(dev)
    for b, s in GPU_CASES:
        torch.cuda.empty_cache()
        q, k, v = (torch.randn(b, GPU_HEADS, s, GPU_DIM, device=dev, dtype=dt) for _ in range(3))
        shape = f"B{b} H{GPU_HEADS} S{s} D{GPU_DIM} bf16 causal"
        cases = [("attnopt_linear", lambda: _linear(q, k, v)),
                 ("attnopt_lightning", lambda: _linear(q, k, v, decay))]  # fmt: skip
        if chunk_linear_attn is not None:
            qt, kt, vt = (x.transpose(1, 2).contiguous() for x in (q, k, v))  # fla's [B, T, H, D]
            cases += [("fla_chunk_linear_attn", lambda: chunk_linear_attn(qt, kt, vt, normalize=False)),
                      ("fla_chunk_lightning_attn", lambda: chunk_lightning_attn(qt, kt, vt, layer_idx=0,
                                                                                num_layers=12))]  # fmt: skip
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            cases.append(("sdpa_flash_causal", lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)))
            for name, fn in cases:
                rows.append(dict(name=name, shape=shape, direction="fwd", ms=round(bench(fn), 4)))
        del q, k, v
    b, s = 4, 16384
    q, k, v = (torch.randn(b, GPU_HEADS, s, GPU_DIM, device=dev, dtype=dt, requires_grad=True) for _ in range(3))
    do = torch.randn_like(q)
    shape = f"B{b} H{GPU_HEADS} S{s} D{GPU_DIM} bf16 causal"
    cases = [("attnopt_linear", lambda: _linear(q, k, v))]
    if chunk_linear_attn is not None:
        qt, kt, vt = (x.detach().transpose(1, 2).contiguous().requires_grad_() for x in (q, k, v))
        cases.append(("fla_chunk_linear_attn", lambda: chunk_linear_attn(qt, kt, vt, normalize=False)[0]
                      .transpose(1, 2)))  # fmt: skip
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        cases.append(("sdpa_flash_causal", lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)))
        for name, fn in cases:
            rows.append(dict(name=name, shape=shape, direction="fwd+bwd",
                             ms=round(bench(lambda f=fn: f().backward(do)), 4)))  # fmt: skip
    del q, k, v, do
    q, k, v = (torch.randn(1, GPU_HEADS, 16384, GPU_DIM, device=dev, dtype=dt) for _ in range(3))
    shape = f"B1 H{GPU_HEADS} S16384 D{GPU_DIM} bf16 full"
    flops = 4 * GPU_HEADS * 16384**2 * GPU_DIM
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        for name, fn in (("attnopt_sigmoid", lambda: torch.ops.attnopt.sigmoid_attention(q, k, v, None, 0, None, None)),
                         ("sdpa_flash", lambda: F.scaled_dot_product_attention(q, k, v))):  # fmt: skip
            ms = bench(fn)
            rows.append(dict(name=name, shape=shape, direction="fwd", ms=round(ms, 4),
                             tflops=round(flops / ms / 1e9, 1)))  # fmt: skip
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu", action="store_true", help="the CPU comparison (chunked linear vs dense SDPA)")
    parser.add_argument("--seq", type=int, default=16384, help="CPU: sequence length")
    parser.add_argument("--heads", type=int, default=8, help="CPU: heads")
    parser.add_argument("--dim", type=int, default=64, help="CPU: head dim")
    parser.add_argument("--repeat", type=int, default=None, help="CPU: timed calls (best taken); GPU: do_bench ms")
    parser.add_argument("--out", help="write the rows as JSON here")
    args = parser.parse_args(argv)
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
