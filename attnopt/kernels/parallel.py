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

A backward must run inside the block its forward ran in: run locally, it would compute the gradients of
the shard alone, silently wrong. The hook remembers (weakly) the q of every forward it routed, and a
backward of that q with no handler installed raises instead.
"""

from __future__ import annotations

import weakref
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Optional

import torch

Handler = Callable[[str, tuple], Any]

_handler: list[Optional[Handler]] = [None]


_running = [False]  # a handler is running: the ops it calls run locally
# q of every routed forward, by identity (its storage, offset, shape, strides), while autograd keeps it alive
_routed_q: "weakref.WeakValueDictionary[tuple, torch.Tensor]" = weakref.WeakValueDictionary()


def route(op: str, *args: Any) -> Any:
    """The handler's outputs for op ``op`` called with ``args``, or None when the op should run locally."""
    handler = _handler[0]
    if _running[0] or torch.compiler.is_compiling():
        return None
    backward = op.endswith("_backward")
    if handler is None:
        if backward and _routed_q:  # nothing to check (no identity to compute) unless a forward was ever routed
            _refuse_unrouted(op, args[1])
        return None
    _handler[0], _running[0] = None, True  # the handler runs the ops on its pieces locally
    try:
        result = handler(op, args)
    finally:
        _handler[0], _running[0] = handler, False
    if result is not None and not backward:
        _routed_q[_identity(args[0])] = args[0]
    return result


def _identity(q: torch.Tensor) -> tuple:
    return (q.untyped_storage().data_ptr(), q.storage_offset(), tuple(q.shape), q.stride())


def _refuse_unrouted(op: str, q: torch.Tensor) -> None:
    """Raises if ``q``'s forward ran sharded: its backward must run sharded too."""
    if _routed_q.get(_identity(q)) is not None:
        raise RuntimeError(f"{op}: the backward of an attention that ran sharded (inside "
                           "attnopt.distributed.context_parallel) is running outside that block, where it would "
                           "compute the local shard's gradients only; call loss.backward() inside the block")  # fmt: skip


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
