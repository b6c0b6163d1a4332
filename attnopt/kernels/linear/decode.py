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

:func:`generate` does this with transformers' own ``generate`` (greedy, sampling, logits processors,
stopping criteria, streamers): the session is the ``past_key_values`` generate threads from step to
step, and each forward goes through the rewritten graphs.

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
from typing import Any, TypeVar

import torch

from attnopt.kernels.linear.reference import linear_attention_step

T = TypeVar("T")


class RecurrentSession:
    """The states of the causal linear sites of one batch of sequences, how many tokens they have consumed,
    and how often each site ran.

    It is also the ``past_key_values`` that transformers' ``generate`` threads from step to step
    (:func:`generate`): it answers what generate asks of a cache and holds no keys or values.
    """

    is_compileable = False  # generate compiles the forward only for static caches
    is_croppable = False  # a state cannot drop its last tokens (assisted decoding would need that)

    def __init__(self) -> None:
        self.states: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
        self.calls: Counter = Counter()
        self.length = 0

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """The tokens per sequence the states have consumed (transformers' cache interface)."""
        return self.length

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


# ------------------------------------------------------------------------------ transformers' generate

# generate's options that need a cache which can be reordered or cropped; the states can be neither.
_REFUSED_OPTIONS = {
    "num_beams": "beam search reorders the cache between beams",
    "assistant_model": "assisted decoding crops the cache after rejected tokens",
    "prompt_lookup_num_tokens": "prompt-lookup decoding crops the cache after rejected tokens",
}


def _check_options(inner: torch.nn.Module, kwargs: dict) -> None:
    config = kwargs.get("generation_config") or getattr(inner, "generation_config", None)
    for name, why in _REFUSED_OPTIONS.items():
        value = kwargs.get(name, getattr(config, name, None))
        if value is not None and not (name == "num_beams" and value == 1):
            raise ValueError(f"attnopt.generate: {name}={value!r} is not supported: {why}, and the recurrent states "
                             "of linear attention can be neither; use greedy decoding or sampling")  # fmt: skip
    for name in ("past_key_values", "use_cache"):
        if name in kwargs:
            raise ValueError(f"attnopt.generate: do not pass {name}: the recurrent states of the linear sites are the "
                             "cache, one token is fed per step")  # fmt: skip


def linear_sites(report) -> list[str]:
    """The names of the report's sites, all rewritten by ``attnopt.Linear``; a ValueError naming any other."""
    if not report.sites:
        raise ValueError("attnopt.generate: the model has no attention site yet; optimize it with example inputs "
                         "(attnopt.optimize(model, attnopt.Linear(causal=True), kwargs={'input_ids': ...}))")  # fmt: skip
    others = [f"{s.name} ({s.decision}: {s.reason})" for s in report.sites if s.decision != "linear"]
    if others:
        raise ValueError(
            f"attnopt.generate feeds one token per step with no KV cache, so every attention site must be causal "
            f"linear attention; these would need a KV cache: {'; '.join(others)}. Rewrite them with "
            "attnopt.Linear(causal=True) (a policy override per site, or a larger max_error), or generate with the "
            "original model"
        )
    return sorted({s.name for s in report.sites})


def _recurrent_view(model, session: RecurrentSession, sites: list[str]) -> torch.nn.Module:
    """The wrapped Hugging Face model, seen through a subclass whose call runs the rewritten graphs over the states.

    The view shares the model's attributes (parameters, config, generation config), so transformers'
    ``generate`` runs on it unchanged; only ``view(**inputs)`` differs: the cache argument is dropped
    (the session is the cache), the 2-D attention mask is cut to the new tokens (padded keys of the
    prompt are already out of the states), and ``past_key_values`` of the output is the session.
    """
    inner = model.module
    graphs = model._attnopt_backend.contexts.__len__

    def call(self, *args: Any, **kwargs: Any):
        if args:
            raise TypeError("attnopt.generate: the model was called with positional inputs; expected keywords")
        if "position_ids" not in kwargs:
            raise ValueError(f"attnopt.generate: {type(inner).__name__}.forward takes no position_ids, so without a "
                             "KV cache every generated token would sit at position 0")  # fmt: skip
        kwargs.pop("past_key_values", None)
        kwargs["use_cache"] = False
        new = kwargs["input_ids"] if kwargs.get("input_ids") is not None else kwargs["inputs_embeds"]
        tokens = new.shape[1]
        mask = kwargs.get("attention_mask")
        if mask is not None and mask.dim() == 2:
            kwargs["attention_mask"] = mask[:, -tokens:]
        out = session.advance(lambda: model(**kwargs), tokens, graphs, sites)
        out["past_key_values"] = session
        return out

    view_type = type(f"Recurrent{type(inner).__name__}", (type(inner),), {"__call__": call})
    view = object.__new__(view_type)
    view.__dict__ = inner.__dict__
    return view


def generate(model, input_ids: torch.Tensor | None = None, **generate_kwargs: Any):
    """transformers' ``generate`` on a model rewritten by ``attnopt.Linear``, through the recurrent states.

    ``model`` is what :func:`attnopt.optimize` returned for a Hugging Face decoder with a language-modeling
    head (``LlamaForCausalLM``, ``GPT2LMHeadModel``, ...) whose attention sites are all causal linear
    attention. The prompt runs once through the chunked path, then each new token alone through the
    recurrent step: O(D²) work per token and head, no KV cache. ``generate_kwargs`` are generate's
    (``max_new_tokens``, ``do_sample``, ``temperature``, ``logits_processor``, ``return_dict_in_generate``,
    ...); beam search and assisted decoding are refused. Returns what generate returns; its
    ``past_key_values`` (with ``return_dict_in_generate=True``) is the :class:`RecurrentSession`.
    """
    from attnopt.api import OptimizedModule

    if not isinstance(model, OptimizedModule):
        raise TypeError(f"attnopt.generate takes the module attnopt.optimize returned, got {type(model).__name__}")
    inner = model.module
    if not (callable(getattr(inner, "generate", None)) and getattr(inner, "config", None) is not None):
        raise TypeError(f"attnopt.generate needs a Hugging Face model with a generation head (e.g. LlamaForCausalLM); "
                        f"{type(inner).__name__} has no generate()")  # fmt: skip
    if getattr(inner.config, "is_encoder_decoder", False):
        raise NotImplementedError("attnopt.generate runs decoder-only models; encoder-decoders are not supported")
    _check_options(inner, generate_kwargs)
    session = RecurrentSession()
    view = _recurrent_view(model, session, linear_sites(model.attnopt_report))
    return view.generate(input_ids, past_key_values=session, use_cache=True, **generate_kwargs)
