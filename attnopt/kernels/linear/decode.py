"""Generation through the recurrent form: causal linear sites carry a state instead of a KV cache.

A rewritten linear site calls :func:`site_attention`. Outside a session it is one
``torch.ops.attnopt.linear_attention`` call over the whole sequence (the chunked path). Inside
``with recurrent() as session:`` every causal site keeps its state ``(S [B, H, D, Dv], z [B, H, D])``
in the session, keyed by the site's module path: a call of several tokens continues from that state
through the chunked op (state in and out), and a call of one token is one
:func:`~attnopt.kernels.linear.reference.linear_attention_step`, O(D·Dv) work per head whatever the
length so far. So a decoder generates by feeding the prompt once and then each new token alone, with
its position id, and no cache (:func:`greedy`); its logits equal those of one chunked forward over the
generated sequence (teacher forcing), up to rounding.

A session must only see real forward calls: an attnopt recompilation (a new input shape) validates each
site by running it once more, which would advance the state. :func:`greedy` therefore warms the model up
on both shapes (prompt, one token) outside the session and checks that each site ran exactly once per
call.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections import Counter
from typing import Callable, Iterator

import torch

from attnopt.kernels.linear.reference import linear_attention_step


class RecurrentSession:
    """The states of the causal linear sites of one batch of sequences, and how often each site ran."""

    def __init__(self) -> None:
        self.states: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
        self.calls: Counter = Counter()

    def reset(self) -> None:
        self.states.clear()
        self.calls.clear()


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


NextLogits = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def greedy(next_logits: NextLogits, prompt: torch.Tensor, new_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy decoding through the recurrent path: the prompt once, then one token per call, no cache.

    ``next_logits(input_ids [B, T], position_ids [B, T]) -> logits [B, V]`` of the last position (a
    model whose causal attention sites were rewritten by ``attnopt.Linear``). Returns
    ``(tokens [B, new_tokens], logits [B, new_tokens, V])``.
    """
    b, p = prompt.shape
    positions = torch.arange(p, device=prompt.device).expand(b, p).contiguous()
    with torch.no_grad():
        # warm-up outside the session: compile both shapes, with the strides the steps will have
        next_logits(prompt, positions)
        next_logits(prompt[:, :1].contiguous(), positions[:, :1].contiguous())
        tokens, logits = [], []
        with recurrent() as session:
            ids, pos = prompt, positions
            for step in range(new_tokens):
                before = Counter(session.calls)
                out = next_logits(ids, pos)
                ran = {key: session.calls[key] - before[key] for key in session.calls}
                if step == 0 and not ran:
                    raise RuntimeError("no causal linear site ran: rewrite the model with attnopt.Linear(causal=...)")
                if any(n != 1 for n in ran.values()):
                    raise RuntimeError(f"linear sites ran {ran} times in one call (a recompilation?); the states are off")
                ids = out.argmax(dim=-1, keepdim=True)
                pos = pos[:, -1:] + 1
                tokens.append(ids[:, 0])
                logits.append(out)
    return torch.stack(tokens, dim=1), torch.stack(logits, dim=1)
