"""Sparse attention benchmark: attnopt's sparse op beside dense SDPA (and compiled FlexAttention on GPU), one run.

    python benchmarks/sparse.py --cpu                 # causal window 256 and strided heads, S=8192, H8, D64, fp32
    python benchmarks/sparse.py                       # the GPU cases of shared/DESIGN.md §3 (needs CUDA)
    python benchmarks/sparse.py --cpu --json out.json

CPU case: ``torch.ops.attnopt.sparse_attention`` with ``SlidingWindow(W - 1, 0)`` against
``F.scaled_dot_product_attention`` with the equivalent dense boolean mask and with ``is_causal=True``
(which computes more, but skips the upper triangle), forward only, median of ``--repeat`` runs after a
warm-up, all in this process; then head-sharded strided attention (``Strided(H, SlidingWindow(W - 1, 0)) &
causal()``, head h sees keys j ≡ h mod H and its window) against SDPA ``is_causal`` and unmasked SDPA (a
per-head dense mask would be H·S² bools), its deviation checked per head against SDPA with that head's mask. GPU cases (bf16, ``triton.testing.do_bench``): causal sliding windows,
2-D neighborhoods and a random 90%-sparse block layout, each beside FlexAttention (compiled, block mask
from the same descriptor's ``mask_mod``) and dense SDPA. JSON goes to stdout (and ``--json``).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from _common import write_json

import attnopt  # noqa: F401  (registers torch.ops.attnopt.*)
from attnopt import masks
from attnopt.kernels.sparse import blockwise


def _median_seconds(fn, repeat: int) -> float:
    fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def cpu_case(seq: int, heads: int, dim: int, window: int, repeat: int) -> dict:
    """Causal sliding window of ``window`` tokens on CPU, fp32: sparse op vs dense SDPA (bool mask, is_causal)."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, heads, seq, dim, generator=gen) for _ in range(3))
    mask = masks.SlidingWindow(window - 1, 0)
    key, scale = mask.key(), dim ** -0.5
    dense = mask.dense(seq, seq)[0]  # [S, S] bool: the dense alternative's mask

    def sparse():
        return torch.ops.attnopt.sparse_attention(q, k, v, None, None, key, scale, 0.0)[0]

    def sdpa_mask():
        return F.scaled_dot_product_attention(q, k, v, attn_mask=dense)

    def sdpa_causal():
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    with torch.no_grad():
        deviation = float((sparse() - sdpa_mask()).abs().max())
        t_sparse = _median_seconds(sparse, repeat)
        t_mask = _median_seconds(sdpa_mask, repeat)
        t_causal = _median_seconds(sdpa_causal, repeat)
    return {
        "case": f"causal sliding window {window}, B1 H{heads} S{seq} D{dim} fp32, CPU forward",
        "mask": str(mask),
        "threads": torch.get_num_threads(),
        "attnopt_sparse_s": t_sparse,
        "sdpa_dense_bool_mask_s": t_mask,
        "sdpa_is_causal_s": t_causal,
        "speedup_vs_dense_mask": t_mask / t_sparse,
        "speedup_vs_is_causal": t_causal / t_sparse,
        "max_abs_deviation_vs_dense_mask": deviation,
        "block_map": {"runs_per_query_tile": int(mask.block_map(seq, seq, 64, 64).max_runs)},
    }


def strided_cpu_case(seq: int, heads: int, dim: int, window: int, repeat: int) -> dict:
    """Strided heads (stride = heads) with a causal window on CPU, fp32: sparse op vs dense SDPA (is_causal, unmasked)."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, heads, seq, dim, generator=gen) for _ in range(3))
    mask = masks.Strided(heads, masks.SlidingWindow(window - 1, 0)) & masks.causal()
    key, scale = mask.key(), dim ** -0.5

    def sparse():
        return torch.ops.attnopt.sparse_attention(q, k, v, None, None, key, scale, 0.0)[0]

    def sdpa_causal():
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    def sdpa_dense():
        return F.scaled_dot_product_attention(q, k, v)

    with torch.no_grad():
        out = sparse()
        idx = torch.arange(seq)
        deviations = []
        for h in range(heads):  # one [S, S] mask at a time
            keep = mask.allows(idx[:, None], idx[None, :], seq, seq, h)
            want = F.scaled_dot_product_attention(q[:, h:h + 1], k[:, h:h + 1], v[:, h:h + 1], attn_mask=keep)
            deviations.append((out[:, h:h + 1] - want).abs().max())
        deviation = float(torch.stack(deviations).max())  # NaN, if any, shows
        t_sparse = _median_seconds(sparse, repeat)
        t_causal = _median_seconds(sdpa_causal, repeat)
        t_dense = _median_seconds(sdpa_dense, repeat)
    bm, bn = blockwise.RESIDUE_BLOCK_M, blockwise.RESIDUE_BLOCK_N  # the CPU path's tiles for keys in residue order
    visited = masks.residue_order(mask).block_map(seq, seq, bm, bn, heads).visited()
    return {
        "case": f"strided heads (stride {heads}) + causal window {window}, B1 H{heads} S{seq} D{dim} fp32, CPU forward",
        "mask": str(mask),
        "threads": torch.get_num_threads(),
        "attnopt_sparse_s": t_sparse,
        "sdpa_is_causal_s": t_causal,
        "sdpa_dense_s": t_dense,
        "speedup_vs_is_causal": t_causal / t_sparse,
        "speedup_vs_dense": t_dense / t_sparse,
        "max_abs_deviation_vs_dense_mask": deviation,
        "key_tiles_per_query_tile": {"tile": [bm, bn], "visited_mean": float(visited.float().mean()),
                                     "dense": -(-seq // bn)},
    }


def _do_bench(fn) -> float:
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=25, rep=100))


def _flex(q, k, v, mask: masks.Mask, block: int = 128):
    """Compiled FlexAttention with a block mask built (compiled) from the descriptor's predicate."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    sq, sk = q.shape[-2], k.shape[-2]

    def mask_mod(b, h, q_idx, kv_idx):
        return mask.allows(q_idx, kv_idx, sq, sk, h)

    block_mask = create_block_mask(mask_mod, None, q.shape[1] if mask.head_dependent else None, sq, sk,
                                   device=q.device, BLOCK_SIZE=block, _compile=True)  # fmt: skip
    compiled = torch.compile(flex_attention)
    return lambda: compiled(q, k, v, block_mask=block_mask)


def gpu_cases(quick: bool) -> list[dict]:
    dev, dtype = "cuda", torch.bfloat16
    gen = torch.Generator(device=dev).manual_seed(0)

    def qkv(b, h, s, d):
        return [torch.randn(b, h, s, d, device=dev, dtype=dtype, generator=gen) for _ in range(3)]

    cases = []
    seqs = (8192,) if quick else (8192, 32768)
    for s in seqs:
        cases.append((f"causal sliding window 1024, B1 H16 D128 S{s}", masks.SlidingWindow(1023, 0), qkv(1, 16, s, 128),
                      "causal"))  # fmt: skip
    for side, ks in ((64, 13), (128, 13), (128, 31)):
        m = masks.Neighborhood(ks, grid=(side, side))
        cases.append((f"2-D neighborhood {side}x{side} k{ks}, D64 H16", m, qkv(1, 16, side * side, 64), "dense"))
    nb = 16384 // 128
    layout = torch.rand(16, nb, nb, generator=torch.Generator().manual_seed(0)) < 0.1
    layout[:, :, 0] = True
    cases.append(("random block-sparse 90% (128x128 blocks), S16k D128 H16", masks.BlockSparse(layout, 128),
                  qkv(1, 16, 16384, 128), None))  # fmt: skip
    out = []
    for name, mask, (q, k, v), dense in cases:
        sq, sk, d = q.shape[-2], k.shape[-2], q.shape[-1]
        key, scale = mask.key(), d ** -0.5
        row = {"case": name, "mask": str(mask)}
        with torch.no_grad():
            row["attnopt_ms"] = _do_bench(lambda: torch.ops.attnopt.sparse_attention(q, k, v, None, None, key, scale))
            try:
                row["flex_attention_ms"] = _do_bench(_flex(q, k, v, mask))
            except Exception as exc:  # FlexAttention may not take every shape; say so and go on
                row["flex_attention_error"] = f"{type(exc).__name__}: {exc}"[:300]
            if dense == "causal":
                row["sdpa_causal_ms"] = _do_bench(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True))
            elif dense == "dense":
                row["sdpa_dense_ms"] = _do_bench(lambda: F.scaled_dot_product_attention(q, k, v))
        density = mask.block_map(sq, sk, 128, 128, q.shape[1]).density()
        row["useful_tflops"] = 4 * q.shape[0] * q.shape[1] * sq * sk * d * density / (row["attnopt_ms"] * 1e-3) / 1e12
        out.append(row)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cpu", action="store_true", help="the CPU cases (fp32 causal sliding window, strided heads)")
    p.add_argument("--seq", type=int, default=8192)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--window", type=int, default=256)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--quick", action="store_true", help="GPU: the smallest case of each kind")
    p.add_argument("--json", help="also write the results to this file")
    args = p.parse_args(argv)
    result = {"torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine()}
    if args.cpu:
        result["cases"] = [cpu_case(args.seq, args.heads, args.dim, args.window, args.repeat),
                           strided_cpu_case(args.seq, args.heads, args.dim, args.window, args.repeat)]
    elif not torch.cuda.is_available():
        result["error"] = "no CUDA: the GPU cases need a CUDA device (run with --cpu for the CPU case)"
    else:
        result["device"] = torch.cuda.get_device_name()
        result["cases"] = gpu_cases(args.quick)
    write_json(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
