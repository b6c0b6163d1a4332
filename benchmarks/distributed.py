"""Context parallelism on CPU/gloo: bytes each rank sends per attention layer and time per step.

    python benchmarks/distributed.py --out distributed.json                # 2 and 4 ranks, S = 512 and 2048
    python benchmarks/distributed.py --worlds 2 --seqs 256 --repeat 2      # quick

One site per family at B1, 8 query heads, 2 key/value heads, D = Dv = 64, fp32, under
``attnopt.distributed.context_parallel`` (head-tail sharding): exact causal (``attnopt::attention``: one
all-gather of K/V, one reduce-scatter of their gradients), a causal sliding window of ``--window`` keys
(``attnopt::sparse_attention``: neighbour halos only) and causal linear attention (``attnopt::linear_attention``
with the elu+1 features: the ``[D, Dv]`` states). Bytes are measured: what each rank passed to the collectives
(:data:`attnopt.distributed.TRAFFIC`), forward and forward+backward, the largest over ranks. Time: the median
forward+backward step over ``--repeat`` runs after a warm-up, the slowest rank.

Beside them, PyTorch's own ``context_parallel`` on SDPA (causal) with the same shapes, where it runs: its ring
dispatches SDPA's CUDA kernels (flash, efficient, cuDNN) through DTensor; on CPU the call is reported with
the error or the deviation from the one-process result (a local-only answer is not context parallelism).
JSON to stdout and ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

HQ, HKV, D = 8, 2, 64


def _inputs(seq: int):
    gen = torch.Generator().manual_seed(0)
    return (torch.randn(1, HQ, seq, D, generator=gen), torch.randn(1, HKV, seq, D, generator=gen),
            torch.randn(1, HKV, seq, D, generator=gen))  # fmt: skip


def _sites(window: int):
    from attnopt.codegen.spec import CAUSAL_TOP_LEFT
    from attnopt.masks import SlidingWindow

    key = SlidingWindow(window - 1, 0).key()
    return {
        "exact": lambda q, k, v: torch.ops.attnopt.attention(q, k, v, None, 0.0, CAUSAL_TOP_LEFT, D**-0.5, None)[0],
        "window": lambda q, k, v: torch.ops.attnopt.sparse_attention(q, k, v, None, None, key, D**-0.5)[0],
        "linear": lambda q, k, v: torch.ops.attnopt.linear_attention(F.elu(q) + 1, F.elu(k) + 1, v, None, True, True,
                                                                     D**-0.5, 1e-6, None, None)[0],  # fmt: skip
    }


def _measure(fn, q, k, v, repeat: int) -> dict:
    import attnopt.distributed as ad

    local = [ad.shard(t, 2).requires_grad_(True) for t in (q, k, v)]
    fn(*local).sum().backward()  # warm-up
    ad.TRAFFIC.reset()
    out = fn(*local)
    forward = ad.TRAFFIC.sent_bytes
    out.sum().backward()
    step = ad.TRAFFIC.sent_bytes
    times = []
    for _ in range(repeat):
        dist.barrier()
        start = time.perf_counter()
        fn(*local).sum().backward()
        times.append(time.perf_counter() - start)
    return {"forward_bytes": forward, "step_bytes": step, "step_ms": 1e3 * statistics.median(times)}


def _pytorch_cp(q, k, v, repeat: int) -> dict:
    """PyTorch's context_parallel on SDPA (causal), checked against one process."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.experimental import context_parallel

    want = F.scaled_dot_product_attention(q, k.repeat_interleave(HQ // HKV, 1), v.repeat_interleave(HQ // HKV, 1),
                                          is_causal=True)  # fmt: skip
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    bufs = [t.repeat_interleave(HQ // HKV, 1) if i else t.clone() for i, t in enumerate((q, k, v))]
    try:
        with context_parallel(mesh, buffers=bufs, buffer_seq_dims=[2, 2, 2]):
            start = time.perf_counter()
            for _ in range(repeat):
                out = F.scaled_dot_product_attention(*bufs, is_causal=True)
            ms = 1e3 * (time.perf_counter() - start) / repeat
            import attnopt.distributed as ad

            got = ad.unshard(out, 2)
    except Exception as exc:  # reported: where PyTorch's CP cannot run this call
        return {"runs": False, "error": f"{type(exc).__name__}: {str(exc)[:300]}"}
    deviation = float((got - want).abs().max())
    return {"runs": deviation < 1e-4, "forward_ms": ms, "max_abs_deviation_from_one_process": deviation}


def _worker(rank: int, world: int, store: str, args, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    import attnopt.distributed as ad

    results = {}
    for seq in args.seqs:
        q, k, v = _inputs(seq)
        with ad.context_parallel(buffers=[], buffer_seq_dims=[]):
            row = {name: _measure(fn, q, k, v, args.repeat) for name, fn in _sites(args.window).items()}
        row["pytorch_context_parallel_sdpa"] = _pytorch_cp(q, k, v, args.repeat)
        results[seq] = row
    torch.save(results, os.path.join(out_dir, f"bench{world}_{rank}.pt"))
    dist.destroy_process_group()


def _combine(per_rank: list[dict]) -> dict:
    """The largest bytes and the slowest time over ranks."""
    out = {}
    for seq, row in per_rank[0].items():
        out[seq] = {}
        for site, values in row.items():
            if site.startswith("pytorch"):
                out[seq][site] = values
                continue
            out[seq][site] = {key: max(r[seq][site][key] for r in per_rank) for key in values}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worlds", default="2,4")
    parser.add_argument("--seqs", default="512,2048")
    parser.add_argument("--window", type=int, default=128)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--out")
    args = parser.parse_args()
    args.seqs = [int(s) for s in args.seqs.split(",")]
    report = {"device": "cpu", "backend": "gloo", "shape": {"B": 1, "Hq": HQ, "Hkv": HKV, "D": D, "Dv": D,
                                                             "dtype": "float32", "window": args.window},
              "worlds": {}}  # fmt: skip
    for world in (int(w) for w in args.worlds.split(",")):
        tmp = tempfile.mkdtemp()
        mp.spawn(_worker, args=(world, os.path.join(tmp, "store"), args, tmp), nprocs=world, join=True)
        report["worlds"][world] = _combine([torch.load(os.path.join(tmp, f"bench{world}_{r}.pt")) for r in range(world)])
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
