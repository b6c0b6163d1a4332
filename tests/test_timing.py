"""attnopt.timing: how the report, auto and ``attnopt bench`` time calls."""

import torch

from attnopt.timing import interleaved_times


def test_interleaved_times_go_round_robin_after_each_warm_up():
    """Every fn warms up first, then each round calls every fn once: a load change while measuring hits all of
    them (the report's model times and ``attnopt bench`` both measure this way)."""
    calls = []
    cpu = torch.device("cpu")
    fns = {name: ((lambda name=name: calls.append(name)), cpu) for name in ("original", "optimized")}
    times = interleaved_times(fns, runs=3, warmup=2)
    assert calls == ["original"] * 2 + ["optimized"] * 2 + ["original", "optimized"] * 3
    assert {name: len(ts) for name, ts in times.items()} == {"original": 3, "optimized": 3}
    assert all(t >= 0 for ts in times.values() for t in ts)
