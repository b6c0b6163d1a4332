"""transformers' ``generate`` on a model rewritten by ``attnopt.Linear``, through the recurrent states.

The prompt runs once through the chunked path, then each new token alone through the recurrent step of
every causal linear site (:mod:`attnopt.kernels.linear.decode`): no KV cache. The states live in a
:class:`RecurrentCache`, a transformers ``Cache`` that generate threads from step to step like any
other, so generate's own loop (greedy, sampling, logits processors, stopping criteria, streamers) runs
unchanged. This module imports transformers (the ``hf`` extra).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from typing import Any

import torch
from transformers.cache_utils import Cache

from attnopt.kernels.linear.decode import RecurrentSession
from attnopt.report import Report
from attnopt.variants.registry import generation_mode


class RecurrentCache(RecurrentSession, Cache):
    """The recurrent states of the causal linear sites ``sites``, as the cache transformers' ``generate`` expects.

    It holds no keys, values or cache layers: every question generate (or a mask builder) asks of a cache
    is answered from the states and the number of tokens they have consumed. The attention layers never
    see it (:func:`generate` takes it out of each forward call); the rewritten sites find the states
    through :func:`attnopt.kernels.linear.decode.recurrent`. Written against transformers' ``Cache`` of
    4.56 and later: the methods whose defaults would read cache layers are answered here.
    """

    def __init__(self, sites: Iterable[str]) -> None:
        RecurrentSession.__init__(self)
        Cache.__init__(self, layers=[])
        self.sites = sorted(sites)

    def get_seq_length(self, layer_idx: int | None = 0) -> int:
        """The tokens per sequence the states have consumed (the same for every layer)."""
        return self.length

    def get_query_offset(self, layer_idx: int = 0) -> int:
        """The position of the next query token: the tokens consumed so far."""
        return self.length

    def get_mask_sizes(self, query: int | torch.Tensor, layer_idx: int = 0) -> tuple[int, int]:
        """``(kv_length, kv_offset)`` a mask for the next call spans: every consumed token and the new ones.

        ``query`` is the query length (transformers >= 5) or the new tokens' cache positions (4.x).
        """
        new = query if isinstance(query, int) else query.shape[0]
        return self.length + new, 0

    def get_max_length(self, layer_idx: int | None = None) -> int:
        """-1: a state has no maximum length."""
        return -1

    def get_max_cache_shape(self, layer_idx: int = 0) -> int:
        """-1: a state has no maximum length (transformers 4.x's name)."""
        return -1

    @property
    def max_cache_len(self) -> int:
        return -1

    @property
    def batch_size(self) -> int:
        """The sequences per batch the states hold, -1 before the first forward call."""
        return next((state.shape[0] for state, _ in self.states.values()), -1)

    @property
    def max_batch_size(self) -> int:
        return self.batch_size

    @property
    def is_compileable(self) -> bool:
        return False  # generate compiles the forward for static caches only; the states are updated per call

    @property
    def is_croppable(self) -> bool:
        return False  # a state cannot drop its last tokens (assisted decoding and deferred stops would need that)

    @property
    def is_initialized(self) -> bool:
        return bool(self.states)

    @property
    def is_sliding(self) -> list[bool]:
        return [False] * len(self.sites)

    @property
    def is_linear(self) -> list[bool]:
        return [True] * len(self.sites)

    @property
    def is_dummy(self) -> list[bool]:
        return [False] * len(self.sites)

    def reset(self) -> None:
        """Back to no tokens consumed."""
        self.states.clear()
        self.calls.clear()
        self.length = 0

    def crop(self, tokens: int) -> None:
        """A state cannot drop tokens it has consumed: a ValueError unless nothing is to be dropped."""
        if tokens != 0 and tokens < self.length:
            raise ValueError(f"attnopt.generate: the recurrent states cannot be cropped (asked {tokens} of "
                             f"{self.length} tokens): a state sums over every token it has consumed")  # fmt: skip

    def reorder_cache(self, beam_idx: torch.Tensor) -> None:
        """Row ``i`` of every state becomes row ``beam_idx[i]``."""
        self._map_states(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep the rows ``indices`` of every state."""
        self._map_states(lambda t: t[indices])

    def batch_repeat_interleave(self, repeats: int) -> None:
        """Each row of every state ``repeats`` times, in place."""
        self._map_states(lambda t: t.repeat_interleave(repeats, dim=0))

    def _map_states(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.states = {key: (fn(state), None if norm is None else fn(norm))
                       for key, (state, norm) in self.states.items()}


def cache_keyword(model: torch.nn.Module) -> str:
    """The name under which ``model``'s forward (and so generate) takes the cache: ``cache`` from transformers
    5.24, ``past_key_values`` before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


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
    for name in ("cache", "past_key_values", "use_cache"):
        if name in kwargs:
            raise ValueError(f"attnopt.generate: do not pass {name}: the recurrent states of the linear sites are the "
                             "cache, one token is fed per step")  # fmt: skip


def recurrent_sites(report) -> list[str]:
    """The names of the report's sites, all rewritten by a variant that generates through recurrent states
    (``attnopt.Linear``); a ValueError naming any other."""
    if not report.sites:
        raise ValueError("attnopt.generate: the model has no attention site yet; optimize it with example inputs "
                         "(attnopt.optimize(model, attnopt.Linear(causal=True), kwargs={'input_ids': ...}))")  # fmt: skip
    others = [f"{s.name} ({s.decision}: {s.reason})" for s in report.sites
              if generation_mode(s.variant) != "recurrent"]
    if others:
        raise ValueError(
            f"attnopt.generate feeds one token per step with no KV cache, so every attention site must be causal "
            f"linear attention; these would need a KV cache: {'; '.join(others)}. Rewrite them with "
            "attnopt.Linear(causal=True) (a policy override per site, or a larger max_error), or generate with the "
            "original model"
        )
    return sorted({s.name for s in report.sites})


def _recurrent_view(model, cache: RecurrentCache) -> torch.nn.Module:
    """The wrapped Hugging Face model, seen through a subclass whose call runs the rewritten graphs over the states.

    The view shares the model's attributes (parameters, config, generation config), so transformers'
    ``generate`` runs on it unchanged; only ``view(**inputs)`` differs: the cache argument is dropped
    (the attention layers must not see it: the sites carry the states), the 2-D attention mask is cut
    to the new tokens (padded keys of the prompt are already out of the states), and the cache of the
    output is ``cache``.
    """
    inner = model.module
    graphs = model._attnopt_backend.contexts.__len__
    keyword = cache_keyword(inner)

    def call(self, *args: Any, **kwargs: Any):
        if args:
            raise TypeError("attnopt.generate: the model was called with positional inputs; expected keywords")
        if "position_ids" not in kwargs:
            raise ValueError(f"attnopt.generate: {type(inner).__name__}.forward takes no position_ids, so without a "
                             "KV cache every generated token would sit at position 0")  # fmt: skip
        kwargs.pop(keyword, None)
        kwargs["use_cache"] = False
        new = kwargs["input_ids"] if kwargs.get("input_ids") is not None else kwargs["inputs_embeds"]
        tokens = new.shape[1]
        mask = kwargs.get("attention_mask")
        if mask is not None and mask.dim() == 2:
            kwargs["attention_mask"] = mask[:, -tokens:]
        out = cache.advance(lambda: model(**kwargs), tokens, graphs, cache.sites)
        out[keyword] = cache
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
    ...); beam search and assisted decoding are refused. Returns what generate returns; its cache (with
    ``return_dict_in_generate=True``: ``out.cache``, ``out.past_key_values`` before transformers 5.24) is
    the :class:`RecurrentCache`.
    """
    if not isinstance(getattr(model, "attnopt_report", None), Report):  # (attnopt.generate checks the type itself)
        raise TypeError(f"attnopt.generate takes the module attnopt.optimize returned, got {type(model).__name__}")
    inner = model.module
    if not (callable(getattr(inner, "generate", None)) and getattr(inner, "config", None) is not None):
        raise TypeError(f"attnopt.generate needs a Hugging Face model with a generation head (e.g. LlamaForCausalLM); "
                        f"{type(inner).__name__} has no generate()")  # fmt: skip
    if getattr(inner.config, "is_encoder_decoder", False):
        raise NotImplementedError("attnopt.generate runs decoder-only models; encoder-decoders are not supported")
    _check_options(inner, generate_kwargs)
    cache = RecurrentCache(recurrent_sites(model.attnopt_report))
    view = _recurrent_view(model, cache)
    return view.generate(input_ids, use_cache=True, **{cache_keyword(inner): cache}, **generate_kwargs)
