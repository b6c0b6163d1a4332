"""transformers' ``generate`` on a model whose attention sites decode through a session instead of a KV cache.

Two rewrites generate this way (their variants' generation mode, :func:`attnopt.variants.registry.generation_mode`):

- ``"recurrent"``: ``attnopt.Linear(causal=True)`` sites carry recurrent states
  (:mod:`attnopt.kernels.linear.decode`): the prompt through the chunked path, then each new token alone through
  the recurrent step, no KV cache at all.
- ``"paged"``: ``attnopt.Sparse(Dynamic(..., decode_top_k=K))`` sites keep paged KV caches with per-page key
  summaries (:mod:`attnopt.kernels.dynamic.session`): the prompt through the dynamic prefill, then each new
  token attends to its K best pages (Quest) plus the sink and recent pages, exactly on those.

Either way the model itself runs without a cache, one forward over the prompt and then one per new token; the
session is a transformers ``Cache`` (:class:`RecurrentCache`, :class:`PagedCache`) that generate threads from
step to step like any other, so generate's own loop (greedy, sampling, logits processors, stopping criteria,
streamers) runs unchanged. This module imports transformers (the ``hf`` extra).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from typing import Any

import torch
from transformers.cache_utils import Cache

from attnopt.kernels.dynamic.session import PageSession
from attnopt.kernels.linear.decode import RecurrentSession
from attnopt.report import Report
from attnopt.variants.registry import generation_mode


class SessionCache(Cache):
    """A decode session (:class:`attnopt.kernels.session.DecodeSession`) as the cache transformers' ``generate``
    expects, for the sites ``sites``.

    It holds no cache layers: every question generate (or a mask builder) asks of a cache is answered from the
    number of tokens the session has consumed, and the rows of its tensors (``_map_rows``). The attention layers
    never see it (:func:`generate` takes it out of each forward call); the rewritten sites find the session
    through :mod:`attnopt.kernels.session`. Written against transformers' ``Cache`` of 4.56 and later: the
    methods whose defaults would read cache layers are answered here. A subclass also derives from its session.
    """

    length: int

    def __init__(self, sites: Iterable[str]) -> None:
        Cache.__init__(self, layers=[])
        self.sites = sorted(sites)

    def get_seq_length(self, layer_idx: int | None = 0) -> int:
        """The tokens per sequence the session has consumed (the same for every layer)."""
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
        """-1: a session has no maximum length."""
        return -1

    def get_max_cache_shape(self, layer_idx: int = 0) -> int:
        """-1: a session has no maximum length (transformers 4.x's name)."""
        return -1

    @property
    def max_cache_len(self) -> int:
        return -1

    @property
    def batch_size(self) -> int:
        """The sequences per batch the session holds, -1 before the first forward call."""
        raise NotImplementedError

    @property
    def max_batch_size(self) -> int:
        return self.batch_size

    @property
    def is_compileable(self) -> bool:
        return False  # generate compiles the forward for static caches only; the session is updated per call

    @property
    def is_croppable(self) -> bool:
        return False  # assisted decoding and deferred stops would drop tokens; the session keeps all it consumed

    @property
    def is_initialized(self) -> bool:
        return self.batch_size >= 0

    @property
    def is_sliding(self) -> list[bool]:
        return [False] * len(self.sites)

    @property
    def is_linear(self) -> list[bool]:
        return [False] * len(self.sites)

    @property
    def is_dummy(self) -> list[bool]:
        return [False] * len(self.sites)

    def crop(self, tokens: int) -> None:
        """A session keeps every token it has consumed: a ValueError unless nothing is to be dropped."""
        if tokens != 0 and tokens < self.length:
            raise ValueError(f"attnopt.generate: {self.carrier} cannot be cropped (asked {tokens} of {self.length} "
                             "tokens)")  # fmt: skip

    def reorder_cache(self, beam_idx: torch.Tensor) -> None:
        """Row ``i`` of every tensor of the session becomes row ``beam_idx[i]``."""
        self._map_rows(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep the rows ``indices`` of every tensor of the session."""
        self._map_rows(lambda t: t[indices])

    def batch_repeat_interleave(self, repeats: int) -> None:
        """Each row of every tensor of the session ``repeats`` times, in place."""
        self._map_rows(lambda t: t.repeat_interleave(repeats, dim=0))

    def _map_rows(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        raise NotImplementedError


class RecurrentCache(RecurrentSession, SessionCache):
    """The recurrent states of the causal linear sites ``sites`` as a transformers cache (see :class:`SessionCache`):
    no keys, values or cache layers."""

    def __init__(self, sites: Iterable[str]) -> None:
        RecurrentSession.__init__(self)
        SessionCache.__init__(self, sites)

    @property
    def batch_size(self) -> int:
        return next((state.shape[0] for state, _ in self.states.values()), -1)

    @property
    def is_linear(self) -> list[bool]:
        return [True] * len(self.sites)

    def reset(self) -> None:
        """Back to no tokens consumed."""
        self.states.clear()
        self.calls.clear()
        self.length = 0

    def _map_rows(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.states = {key: (fn(state), None if norm is None else fn(norm))
                       for key, (state, norm) in self.states.items()}


class PagedCache(PageSession, SessionCache):
    """The paged KV caches of the dynamic sites ``sites`` (decode selection) as a transformers cache (see
    :class:`SessionCache`)."""

    def __init__(self, sites: Iterable[str]) -> None:
        PageSession.__init__(self)
        SessionCache.__init__(self, sites)

    @property
    def batch_size(self) -> int:
        return next((cache.k.shape[0] for cache in self.caches.values()), -1)

    def reset(self) -> None:
        """Back to no tokens consumed."""
        self.caches.clear()
        self.selected.clear()
        self.calls.clear()
        self.length = 0

    def _map_rows(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        for cache in self.caches.values():
            cache.map_rows(fn)


# generation mode -> (the session cache, what its sites are, the rewrite that makes a site one)
SESSIONS = {
    "recurrent": (RecurrentCache, "causal linear attention", "attnopt.Linear(causal=True)"),
    "paged": (PagedCache, "dynamic sparse attention with a decode selection",
              "attnopt.Sparse(attnopt.masks.Dynamic(..., decode_top_k=K))"),
}


def cache_keyword(model: torch.nn.Module) -> str:
    """The name under which ``model``'s forward (and so generate) takes the cache: ``cache`` from transformers
    5.24, ``past_key_values`` before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


# generate's options that need a cache which can be reordered or cropped; the sessions are neither.
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
            raise ValueError(f"attnopt.generate: {name}={value!r} is not supported: {why}, and the sites' decode "
                             "session (recurrent states, paged KV caches) is neither reordered nor cropped; use "
                             "greedy decoding or sampling")  # fmt: skip
    for name in ("cache", "past_key_values", "use_cache"):
        if name in kwargs:
            raise ValueError(f"attnopt.generate: do not pass {name}: the sites' decode session (recurrent states, "
                             "paged KV caches) is the cache, one token is fed per step")  # fmt: skip


def session_sites(report) -> tuple[str, list[str]]:
    """``(mode, names)``: the generation mode shared by the report's sites (a key of :data:`SESSIONS`) and their
    names; a ValueError naming every site of another mode (one that would need a KV cache)."""
    if not report.sites:
        raise ValueError("attnopt.generate: the model has no attention site yet; optimize it with example inputs "
                         "(attnopt.optimize(model, attnopt.Linear(causal=True), kwargs={'input_ids': ...}))")  # fmt: skip
    modes = [m for s in report.sites if (m := generation_mode(s.variant)) in SESSIONS]
    wanted = [modes[0]] if modes else list(SESSIONS)
    others = [f"{s.name} ({s.decision}: {s.reason})" for s in report.sites if generation_mode(s.variant) not in wanted]
    if others:
        what = " or ".join(SESSIONS[m][1] for m in wanted)
        fix = " or ".join(SESSIONS[m][2] for m in wanted)
        raise ValueError(
            f"attnopt.generate feeds one token per step with no KV cache of the model's own, so every attention site "
            f"must be {what}; these would need a KV cache: {'; '.join(others)}. Rewrite them with {fix} (a policy "
            "override per site, or a larger max_error), or generate with the original model"
        )
    return wanted[0], sorted({s.name for s in report.sites})


def _session_view(model, cache: SessionCache) -> torch.nn.Module:
    """The wrapped Hugging Face model, seen through a subclass whose call runs the rewritten graphs in the session.

    The view shares the model's attributes (parameters, config, generation config), so transformers'
    ``generate`` runs on it unchanged; only ``view(**inputs)`` differs: the cache argument is dropped
    (the attention layers must not see it: the sites carry the session), the 2-D attention mask is cut
    to the new tokens (padded keys of the prompt are already out of the session), and the cache of the
    output is ``cache``.
    """
    inner = model.module
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
        out = cache.advance(lambda: model(**kwargs), tokens, cache.sites)
        out[keyword] = cache
        return out

    view_type = type(f"{type(cache).__name__[:-5]}{type(inner).__name__}", (type(inner),), {"__call__": call})
    view = object.__new__(view_type)
    view.__dict__ = inner.__dict__
    return view


def generate(model, input_ids: torch.Tensor | None = None, **generate_kwargs: Any):
    """transformers' ``generate`` on a model whose sites decode through a session (see the module docstring).

    ``model`` is what :func:`attnopt.optimize` returned for a Hugging Face decoder with a language-modeling
    head (``LlamaForCausalLM``, ``GPT2LMHeadModel``, ...) whose attention sites are all causal linear
    attention (recurrent states: O(D²) work per token and head, no KV cache), or all dynamic sparse attention
    with a decode selection (paged KV caches: per token, the page summaries and the chosen pages are read).
    The prompt runs once, then each new token alone. ``generate_kwargs`` are generate's (``max_new_tokens``,
    ``do_sample``, ``temperature``, ``logits_processor``, ``return_dict_in_generate``, ...); beam search and
    assisted decoding are refused. Returns what generate returns; its cache (with
    ``return_dict_in_generate=True``: ``out.cache``, ``out.past_key_values`` before transformers 5.24) is the
    :class:`RecurrentCache` or :class:`PagedCache`.
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
    mode, sites = session_sites(model.attnopt_report)
    cache = SESSIONS[mode][0](sites)
    view = _session_view(model, cache)
    return view.generate(input_ids, use_cache=True, **{cache_keyword(inner): cache}, **generate_kwargs)
