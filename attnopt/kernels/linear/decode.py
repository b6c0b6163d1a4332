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

Only real forward calls reach a session: attnopt compiles new graphs with sessions suspended
(:mod:`attnopt.kernels.session`), and :meth:`~attnopt.kernels.session.DecodeSession.advance` checks that a
call ran every site exactly once.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from attnopt.kernels.linear.reference import linear_attention_step
from attnopt.kernels.session import DecodeSession, active, current


class RecurrentSession(DecodeSession):
    """The states of the causal linear sites of one batch of sequences, how many tokens they have consumed,
    and how often each site ran. (:class:`attnopt.generation.RecurrentCache` is one that transformers'
    ``generate`` takes as its cache.)
    """

    sites_are = "causal linear sites"
    carrier = "the recurrent state"
    fix = ("at this input shape they run as non-causal linear attention or were rolled back to softmax (see "
           "attnopt.report(model)); rewrite them with attnopt.Linear(causal=True)")  # fmt: skip

    def __init__(self) -> None:
        super().__init__()
        self.states: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}


@contextlib.contextmanager
def recurrent(session: RecurrentSession | None = None) -> Iterator[RecurrentSession]:
    """Within the block, causal linear sites carry their state from one forward call to the next."""
    with active(session if session is not None else RecurrentSession()) as session:
        yield session


def site_attention(q, k, v, log_decay, causal: bool, normalize: bool, scale: float, eps: float, key: str):
    """The output [B, Hq, Sq, Dv] of one linear site; stateful inside a :func:`recurrent` session (causal only)."""
    session = current(RecurrentSession)
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
