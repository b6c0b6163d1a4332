"""attnopt demo: build a real Hugging Face model from a config (random weights), optimize it, print the report.

    python examples/demo.py [--model llama] [--attn eager]
"""

from __future__ import annotations

import argparse
import logging

import torch
from torch.utils.benchmark import Timer

import attnopt
from attnopt import zoo
from attnopt.passes import deviation


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llama", choices=zoo.NAMES)
    parser.add_argument("--attn", default="eager", choices=["eager", "sdpa"])
    parser.add_argument("--seq", type=int, default=64)
    opts = parser.parse_args()
    logging.getLogger("transformers").setLevel(logging.ERROR)

    z = zoo.build(opts.model, opts.attn, seq=opts.seq, num_hidden_layers=4) if opts.model == "llama" else zoo.build(
        opts.model, opts.attn, seq=opts.seq
    )
    print(f"{type(z.model).__name__}: {sum(p.numel() for p in z.model.parameters()) / 1e6:.2f}M parameters, "
          f"attn_implementation={opts.attn!r}, random weights")  # fmt: skip

    print("\n== attnopt.inspect ==")
    print(attnopt.inspect(z.model, z.args, z.kwargs))

    print("\n== attnopt.optimize(policy='exact') ==")
    fast = attnopt.optimize(z.model, "exact", z.args, z.kwargs)
    print(attnopt.report(fast))

    with torch.no_grad():
        want = z.model(*z.args, **z.kwargs).last_hidden_state
        got = fast(*z.args, **z.kwargs).last_hidden_state
    print(f"\nlargest output difference: {(got - want).abs().max().item():.3e} absolute, "
          f"{deviation(got, want):.3e} relative to the largest output")  # fmt: skip
    print_speed(z, fast)


def print_speed(z: zoo.ZooModel, fast: torch.nn.Module) -> None:
    """Median forward time of the original and the optimized model on the example inputs (this machine)."""
    times = {}
    for label, model in (("original", z.model), ("attnopt", fast)):
        timer = Timer("with torch.no_grad(): model(*args, **kwargs)",
                      globals={"torch": torch, "model": model, "args": z.args, "kwargs": z.kwargs})  # fmt: skip
        times[label] = timer.blocked_autorange(min_run_time=1.0).median
    device = "CUDA" if torch.cuda.is_available() else f"CPU, {torch.get_num_threads()} threads"
    print(f"measured forward time ({device}, median): original {times['original'] * 1e3:.2f} ms, "
          f"attnopt {times['attnopt'] * 1e3:.2f} ms ({times['original'] / times['attnopt']:.2f}x)")  # fmt: skip


if __name__ == "__main__":
    main()
