"""A process-wide hook through which a front module runs attnopt's ops distributed (context parallelism).

The CPU and CUDA implementations of every attention op (``attention``, ``sparse_attention``,
``sparse_attention_auto``, ``linear_attention`` and their backwards) first call :func:`route` with their
own name and arguments. With no handler installed (the default) it returns None and the op runs as
always. :mod:`attnopt.distributed` installs a handler (:func:`installed`) that computes the op over a
sequence sharded across processes and returns the op's own outputs for the local shard.

The handler is not consulted while a graph is being compiled (``torch.compiler.is_compiling()``:
capture and validation compare the original and rewritten graphs on the local shard) nor while it runs
(it calls the ops itself, locally). A plain global rather than a context variable: the autograd engine
may run a backward on a thread of its own.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterator, Optional

import torch

Handler = Callable[[str, tuple], Any]

_handler: list[Optional[Handler]] = [None]


def route(op: str, *args: Any) -> Any:
    """The handler's outputs for op ``op`` called with ``args``, or None when the op should run locally."""
    handler = _handler[0]
    if handler is None or torch.compiler.is_compiling():
        return None
    _handler[0] = None  # the handler runs the ops on its pieces locally
    try:
        return handler(op, args)
    finally:
        _handler[0] = handler


def active() -> Optional[Handler]:
    """The installed handler, if any."""
    return _handler[0]


@contextmanager
def installed(handler: Handler) -> Iterator[None]:
    """Installs ``handler`` for the duration of the block (handlers do not nest)."""
    if _handler[0] is not None:
        raise RuntimeError("a context-parallel handler is already installed: context_parallel blocks do not nest")
    _handler[0] = handler
    try:
        yield
    finally:
        _handler[0] = None
