"""Decode sessions: what a generating model's rewritten sites carry from one forward call to the next.

A site that decodes incrementally keeps its per-sequence memory in the active session, keyed by the site's
name (its module path): a causal linear site its recurrent state (:mod:`attnopt.kernels.linear.decode`), a
dynamic site with a decode selection its paged KV cache (:mod:`attnopt.kernels.dynamic.session`). A decoder
then generates by feeding the prompt once and each new token alone, with no cache of the model's own.

Only real forward calls may reach a session: compiling a graph for a new input shape runs each rewritten
site again (validation, timing, the whole-graph check), which would advance the memory. attnopt's backend
therefore compiles under :func:`suspended`, where every site runs as it would with no session; and
:meth:`DecodeSession.advance` checks that one forward call ran each site exactly once.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")
S = TypeVar("S", bound="DecodeSession")


class DecodeSession:
    """The memory of the decoding sites of one batch of sequences, the tokens it has consumed and how often each
    site ran. A subclass holds the memory and names, for the error messages, what its sites are (``sites_are``),
    what they carry (``carrier``) and how a site that did not run through it is fixed (``fix``)."""

    sites_are = "decoding sites"
    carrier = "the session"
    fix = "see attnopt.report(model)"

    def __init__(self) -> None:
        self.calls: Counter = Counter()
        self.length = 0

    def advance(self, call: Callable[[], T], tokens: int, sites: Iterable[str]) -> T:
        """``call()``, one forward over ``tokens`` new tokens per sequence, continuing from the memory; each of
        ``sites`` must run exactly once through the session (RuntimeError naming the others)."""
        before = Counter(self.calls)
        with active(self):
            out = call()
        ran = {key: n for key in self.calls if (n := self.calls[key] - before[key])}
        expected = dict.fromkeys(sites, 1)
        if ran != expected:
            missing = sorted(set(expected) - set(ran))
            raise RuntimeError(f"{self.sites_are} ran {ran} times in one forward call; expected once each of "
                               f"{sorted(expected)}" + (f". {missing} did not run through {self.carrier}: {self.fix}"
                                                        if missing else ""))  # fmt: skip
        self.length += tokens
        return out


_SESSION: contextvars.ContextVar[DecodeSession | None] = contextvars.ContextVar("attnopt_decode_session",
                                                                               default=None)  # fmt: skip


@contextlib.contextmanager
def active(session: S) -> Iterator[S]:
    """Within the block, the decoding sites carry their memory in ``session``."""
    token = _SESSION.set(session)
    try:
        yield session
    finally:
        _SESSION.reset(token)


@contextlib.contextmanager
def suspended() -> Iterator[None]:
    """Within the block, no session is active: sites run statelessly (attnopt's compiler runs them here)."""
    token = _SESSION.set(None)
    try:
        yield
    finally:
        _SESSION.reset(token)


def current(kind: type[S]) -> S | None:
    """The active session when it is a ``kind``, else None."""
    session = _SESSION.get()
    return session if isinstance(session, kind) else None
