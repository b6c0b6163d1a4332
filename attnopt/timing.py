"""Wall-clock timing on the device a call runs on: the one way attnopt measures speed (the report's measured
times, auto's ranking of candidates, ``attnopt bench``).

A call is timed alone: CUDA work is synchronized before the clock stops, warm-up calls run first (kernel
compilation, caches, the SDPA dispatch's own measurement), and the median of the timed calls is the answer, as
``attnopt bench`` reports it.
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_of(tensors: Any) -> torch.device:
    """The device of the first tensor among ``tensors`` (a pytree), else the CPU."""
    for t in torch.utils._pytree.tree_leaves(tensors):
        if isinstance(t, torch.Tensor):
            return t.device
    return torch.device("cpu")


def device_label(device: torch.device) -> str:
    """``cpu``, or ``cuda (NVIDIA H100 80GB HBM3)``: what a measured time was measured on."""
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return device.type


def call_times(fn: Callable[[], Any], device: torch.device, runs: int = 10, warmup: int = 3) -> list[float]:
    """Milliseconds of each of ``runs`` calls of ``fn`` after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    return times


def interleaved_times(fns: dict[str, tuple[Callable[[], Any], torch.device]], runs: int = 10,
                      warmup: int = 3) -> dict[str, list[float]]:
    """Milliseconds of each of ``runs`` calls of every ``fn`` (``fns``: name -> (fn, device)), after ``warmup``
    untimed calls of each: the calls go round-robin, one of each per round, so that a change of the machine's
    load while measuring hits every fn alike (measured one after the other, a load spike lands on one of them
    only). How the report's model times (``optimize(..., measure=True)``) and ``attnopt bench`` measure."""
    for fn, device in fns.values():
        call_times(fn, device, runs=0, warmup=warmup)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(runs):
        for name, (fn, device) in fns.items():
            times[name] += call_times(fn, device, runs=1, warmup=0)
    return times


def median_ms(fn: Callable[[], Any], device: torch.device, budget_s: float = 0.05, most: int = 25) -> float:
    """The median milliseconds of ``fn`` within about ``budget_s`` of timed calls (at least 3, at most ``most``),
    after one warm-up call: cheap enough to run per attention site on the example inputs."""
    fn()
    sync(device)
    times: list[float] = []
    spent = 0.0
    while len(times) < 3 or (spent < budget_s * 1e3 and len(times) < most):
        times += call_times(fn, device, runs=1, warmup=0)
        spent += times[-1]
    return statistics.median(times)
