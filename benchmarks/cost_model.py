"""The cost model against measurements: predicted vs measured speedups of exact and sliding-window attention.

Per sequence length (B1 H16 D128 bf16, causal, as DESIGN.md §3's window anchors), on one GPU
(``triton.testing.do_bench``): eager attention as a model writes it (QKᵀ, scale, causal ``masked_fill``,
softmax, PV), SDPA's flash kernel, attnopt's exact kernel, and a causal window of ``--window`` tokens
through attnopt's sparse kernel and compiled FlexAttention. Each speedup is measured and predicted by
:mod:`attnopt.cost` for the same pair:

    exact vs eager        attnopt exact over the eager chain (a manual site's decision "exact")
    exact vs sdpa         attnopt exact over SDPA flash (an SDPA site's decision "exact"; predicted 1)
    window vs sdpa        attnopt sparse window (and FlexAttention's) over SDPA flash causal

    python benchmarks/cost_model.py --out cost_model.json [--seq 4096,8192,16384,32768] [--window 1024]

Without CUDA it prints the predictions and says that the measured columns need a GPU.
"""

from __future__ import annotations

import argparse
import math
import sys

import torch
import torch.nn.functional as F
from _common import write_json

from attnopt import cost, masks
from attnopt.policy import Exact, Keep, Sparse

HEADS, DIM = 16, 128
EAGER_MAX = 16384  # the eager chain holds a few [H, S, S] score tensors: 8.6 GB each at 16k


def predictions(s: int, window: int) -> dict:
    """Predicted ms of each provider, and the predicted speedups."""
    manual = cost.Shape(1, HEADS, HEADS, s, s, DIM, DIM, causal=True, kind="manual")
    sdpa = cost.Shape(1, HEADS, HEADS, s, s, DIM, DIM, causal=True, kind="sdpa")
    win = Sparse(masks.SlidingWindow(window - 1, 0))
    ms = {
        "eager": cost.predict_seconds(Keep(), manual),
        "sdpa_flash": cost.predict_seconds(Keep(), sdpa),
        "attnopt_exact": cost.predict_seconds(Exact(), sdpa),
        "attnopt_window": cost.predict_seconds(win, sdpa),
    }
    return {
        "predicted_ms": {k: 1e3 * v for k, v in ms.items()},
        "predicted_speedup": {
            "exact_vs_eager": cost.predict_speedup(manual, Exact()),
            "exact_vs_sdpa": cost.predict_speedup(sdpa, Exact()),
            "window_vs_sdpa": cost.predict_speedup(sdpa, win),
        },
    }


def _eager(q, k, v):
    s = q.shape[-2]
    scores = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
    causal = torch.ones(s, s, dtype=torch.bool, device=q.device).tril()
    return torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1) @ v


def _flex_window(q, k, v, window: int):
    """Compiled FlexAttention with a causal window's block mask (as DESIGN.md §3's anchor script)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    s = q.shape[-2]
    block_mask = create_block_mask(lambda b, h, i, j: (i >= j) & (i - j < window), None, None, s, s,
                                   device=q.device, BLOCK_SIZE=cost.BLOCK, _compile=True)  # fmt: skip
    compiled = torch.compile(flex_attention)
    return lambda: compiled(q, k, v, block_mask=block_mask)


def measurements(s: int, window: int) -> dict:
    """Measured ms of each provider (None where it does not fit or fails, with the error)."""
    import attnopt
    import attnopt.kernels.sparse.ops  # noqa: F401  (registers torch.ops.attnopt.sparse_attention)
    from triton.testing import do_bench

    q, k, v = (torch.randn(1, HEADS, s, DIM, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    mask = masks.SlidingWindow(window - 1, 0)
    scale = DIM**-0.5
    providers = {
        "eager": (lambda: _eager(q, k, v)) if s <= EAGER_MAX else None,
        "sdpa_flash": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True),
        "attnopt_exact": lambda: attnopt.attention(q, k, v, is_causal=True),
        "attnopt_window": lambda: torch.ops.attnopt.sparse_attention(q, k, v, None, None, mask.key(), scale),
        "flex_window": "flex",
    }
    out, errors = {}, {}
    for name, fn in providers.items():
        try:
            fn = _flex_window(q, k, v, window) if fn == "flex" else fn
            out[name] = None if fn is None else float(do_bench(fn, warmup=25, rep=100))
        except Exception as exc:  # a provider that fails is reported, the others still run
            out[name], errors[name] = None, f"{type(exc).__name__}: {exc}"[:300]
        torch.cuda.empty_cache()
    ratio = lambda a, b: out[a] / out[b] if out[a] and out[b] else None  # noqa: E731
    return {
        "measured_ms": out,
        "measured_speedup": {
            "exact_vs_eager": ratio("eager", "attnopt_exact"),
            "exact_vs_sdpa": ratio("sdpa_flash", "attnopt_exact"),
            "window_vs_sdpa": ratio("sdpa_flash", "attnopt_window"),
            "flex_window_vs_sdpa": ratio("sdpa_flash", "flex_window"),
        },
        "errors": errors,
    }


def _fmt(x) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3g}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", default="4096,8192,16384,32768", help="comma-separated sequence lengths")
    parser.add_argument("--window", type=int, default=1024, help="causal window, tokens")
    parser.add_argument("--out", help="write the JSON here too")
    args = parser.parse_args(argv)
    gpu = torch.cuda.is_available()
    rows = []
    for s in (int(x) for x in args.seq.split(",")):
        row = {"seq": s, "window": args.window, **predictions(s, args.window)}
        if gpu:
            row.update(measurements(s, args.window))
            row["predicted_over_measured"] = {
                k: row["predicted_speedup"][k] / m for k, m in row["measured_speedup"].items()
                if m and k in row["predicted_speedup"]
            }  # fmt: skip
        rows.append(row)
        pred, meas = row["predicted_speedup"], row.get("measured_speedup", {})
        print(f"S={s:>6}  " + "  ".join(f"{k}: predicted {_fmt(pred[k])}x measured {_fmt(meas.get(k))}x" for k in pred),
              flush=True)  # fmt: skip
    device = torch.cuda.get_device_name() if gpu else None
    if not gpu:
        print(f"no CUDA: predictions for {cost.H100.name} only; the measured columns need a GPU")
    result = {"device": device, "hardware_model": cost.H100.name, "heads": HEADS, "head_dim": DIM, "rows": rows}
    write_json(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
