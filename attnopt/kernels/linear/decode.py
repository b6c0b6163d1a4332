"""Generation through the recurrent form: causal linear sites carry a state instead of a KV cache.

A rewritten linear site calls :func:`site_attention`. Outside a session it is one
``torch.ops.attnopt.linear_attention`` call over the whole sequence (the chunked path). Inside
``with recurrent() as session:`` every causal site keeps its state ``(S [B, H, D, Dv], z [B, H, D])``
in the session, keyed by the site's name (its module path): a call of several tokens continues from
that state through the chunked op (state in and out), and a call of one token is one
:func:`~attnopt.kernels.linear.reference.linear_attention_step`, O(D·Dv) work per head whatever the
length so far. So a decoder generates by feeding the prompt once and then each new token alone, with
its position id, and no KV cache; its logits equal those of one chunked forward over the generated
sequence (teacher forcing), up to rounding.

:func:`attnopt.generation.generate` does this with transformers' own ``generate`` (greedy, sampling,
logits processors, stopping criteria, streamers): a session that is also a transformers ``Cache`` is the
cache generate threads from step to step, and each forward goes through the rewritten graphs.

A session must only see real forward calls: compiling a graph for a new input shape (or grad mode)
validates each rewritten site by running it once more, which would advance the state.
:meth:`RecurrentSession.advance` therefore runs such a call again from the saved states, and checks
that every site ran exactly once.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

import torch

from attnopt.kernels.linear.reference import linear_attention_step

T = TypeVar("T")


class RecurrentSession:
    """The states of the causal linear sites of one batch of sequences, how many tokens they have consumed,
    and how often each site ran. (:class:`attnopt.generation.RecurrentCache` is one that transformers'
    ``generate`` takes as its cache.)
    """

    def __init__(self) -> None:
        self.states: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
        self.calls: Counter = Counter()
        self.length = 0

    def advance(self, call: Callable[[], T], tokens: int, graphs: Callable[[], int], sites: Iterable[str]) -> T:
        """``call()``, one forward over ``tokens`` new tokens per sequence, continuing from the states.

        ``graphs()`` counts the graphs attnopt has compiled: a call that compiles one has validated each
        rewritten site once more on its inputs, advancing the states, so it runs again from the saved
        states. Each of ``sites`` must then have run exactly once, through its state.
        """
        saved = dict(self.states)
        for _ in range(2):
            compiled, before = graphs(), Counter(self.calls)
            with recurrent(self):
                out = call()
            if graphs() == compiled:
                break
            self.states = dict(saved)
        else:
            raise RuntimeError("attnopt compiled a new graph on the same inputs twice; the recurrent states are off")
        ran = {key: n for key in self.calls if (n := self.calls[key] - before[key])}
        expected = dict.fromkeys(sites, 1)
        if ran != expected:
            missing = sorted(set(expected) - set(ran))
            raise RuntimeError(
                f"causal linear sites ran {ran} times in one forward call; expected once each of {sorted(expected)}"
                + (f". {missing} did not run through the recurrent state: at this input shape they run as non-causal "
                   "linear attention or were rolled back to softmax (see attnopt.report(model)); rewrite them with "
                   "attnopt.Linear(causal=True)" if missing else "")
            )  # fmt: skip
        self.length += tokens
        return out


_SESSION: contextvars.ContextVar[RecurrentSession | None] = contextvars.ContextVar("attnopt_linear_session",
                                                                                   default=None)  # fmt: skip


@contextlib.contextmanager
def recurrent(session: RecurrentSession | None = None) -> Iterator[RecurrentSession]:
    """Within the block, causal linear sites carry their state from one forward call to the next."""
    session = session if session is not None else RecurrentSession()
    token = _SESSION.set(session)
    try:
        yield session
    finally:
        _SESSION.reset(token)


def site_attention(q, k, v, log_decay, causal: bool, normalize: bool, scale: float, eps: float, key: str):
    """The output [B, Hq, Sq, Dv] of one linear site; stateful inside a :func:`recurrent` session (causal only)."""
    session = _SESSION.get()
    if session is None or not causal:
        return torch.ops.attnopt.linear_attention(q, k, v, log_decay, causal, normalize, scale, eps, None, None)[0]
    state, norm = session.states.get(key, (None, None))
    if q.shape[2] == 1:
        out, state, norm = linear_attention_step(q[:, :, 0], k[:, :, 0], v[:, :, 0], state, norm, log_decay, scale,
                                                 normalize, eps)  # fmt: skip
        out = out[:, :, None]
    else:
        out, _, state, norm = torch.ops.attnopt.linear_attention(q, k, v, log_decay, True, normalize, scale, eps, state,
                                                                 norm)  # fmt: skip
        norm = norm if normalize else None
    session.states[key] = (state, norm)
    session.calls[key] += 1
    return out
