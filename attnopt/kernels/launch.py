"""Launching a generated kernel with a fallback, for the families whose tiles come from a preference list
(sparse, linear, sigmoid; the exact family's tiles come from :mod:`attnopt.codegen.tuning`, which has its own).

A tile configuration the compiler rejects (out of shared memory or registers on this GPU, a failed compile:
:func:`attnopt.codegen.tuning.is_config_error`) is remembered for the process and the next, smaller one in
the list is launched instead; any other error, or a rejection of the last configuration, propagates.

Triton is imported only once a launch fails.
"""

from __future__ import annotations

import threading
from typing import Callable, Hashable, Sequence, TypeVar

import torch

from attnopt.codegen import tuning

Spec = TypeVar("Spec", bound=Hashable)

_FAILED: set[tuple[str, Hashable]] = set()  # (device, spec) the compiler rejected in this process
_LOCK = threading.Lock()


def launch_first(specs: Sequence[Spec], launch: Callable[[Spec], object], device: str) -> Spec:
    """Runs ``launch(spec)`` for the first of ``specs`` (most preferred first) that has not failed on
    ``device`` in this process, falling back down the list on a configuration error; returns the spec
    that ran. ``device`` names the GPU (``str(tensor.device)``), so a rejection on one GPU does not demote
    the configuration on another."""
    if not specs:
        raise ValueError("launch_first needs at least one spec")
    with _LOCK:
        untried = [s for s in specs if (device, s) not in _FAILED] or [specs[-1]]
    for spec in untried[:-1]:
        try:
            launch(spec)
            return spec
        except Exception as exc:
            if not tuning.is_config_error(exc):
                raise
            with _LOCK:
                _FAILED.add((device, spec))
    launch(untried[-1])  # the last one left: its error, if any, is the caller's
    return untried[-1]


def device_capability(t) -> tuple[int, int] | None:
    """The CUDA compute capability of tensor ``t``'s GPU (it picks the tile tables' row), None off the GPU."""
    if not t.is_cuda:
        return None
    return tuple(torch.cuda.get_device_capability(t.device))


def failed(device: str) -> list[Hashable]:
    """The specs rejected on ``device`` in this process (for reports and tests)."""
    with _LOCK:
        return [spec for dev, spec in _FAILED if dev == device]


def forget() -> None:
    """Forgets the rejections seen in this process."""
    with _LOCK:
        _FAILED.clear()
