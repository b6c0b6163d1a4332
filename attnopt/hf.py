"""Hugging Face integration: ``attn_implementation="attnopt"``.

    import attnopt.hf                                   # registers "attnopt" with transformers
    attnopt.hf.use("exact")                             # the current policy (a setter) ...
    with attnopt.hf.use(attnopt.Policy(default="exact", overrides={"model.layers.0.*": "keep"})):
        ...                                             # ... or a context manager restoring the previous one
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="attnopt")

Importing this module registers :func:`attention_forward` in transformers' ``AttentionInterface`` and
transformers' SDPA mask builder (boolean masks, True = attend) in its ``AttentionMaskInterface``, both
under the name ``"attnopt"``. Each attention layer then calls :func:`attention_forward`, which looks up the
layer's variant in the current policy and runs:

* ``exact``: ``torch.ops.attnopt.attention`` (GQA native, masks bool or additive, ``is_causal`` top-left as
  SDPA, ``softcap`` and ``position_bias`` honoured, dropout in training mode);
* ``keep`` (or a call attnopt's kernel cannot serve: ``output_attentions``, paged caches): transformers'
  own SDPA function, or the model's eager function where SDPA cannot run it (softcap, attention weights).

Site names are module paths relative to the model, as everywhere in attnopt (``model.layers.0.self_attn``
for a ``LlamaForCausalLM``, ``layers.0.self_attn`` for a ``LlamaModel``; ``model.get_submodule(name)`` is
the layer). They are found automatically at a model's first call: the first attention layer that
runs looks up the outermost transformers model on the call stack holding it and tags every attention
module of that model (:func:`name_sites`, which can also be called directly). At that moment, and
whenever the policy changes, a policy glob matching none of the model's site names is an error. Under
``torch.compile`` an untagged layer is named by a graph break on its first trace when the policy has
overrides; ``torch.export`` cannot break the graph, so call ``attnopt.hf.name_sites(model)`` before
exporting a model whose policy has overrides.

The current policy lives in one explicit holder, :data:`CURRENT` (read it with :func:`current_policy`);
there is no other module-level mutable state. A module built with ``attn_implementation="attnopt"`` can be
traced by ``torch.export``: the graph then holds ``torch.ops.attnopt.attention`` calls.
"""

from __future__ import annotations

import math
import sys
from typing import Any

import torch

from attnopt.kernels.exact.reference import CAUSAL_NONE, CAUSAL_TOP_LEFT
from attnopt.kernels.exact.ops import new_seed
from attnopt.policy import Exact, Keep, Policy, as_policy

try:
    import transformers  # noqa: F401
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    from transformers.modeling_utils import AttentionInterface
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError("attnopt.hf needs transformers >= 4.56: pip install 'attnopt[hf]'") from exc

NAME = "attnopt"
SITE_ATTR = "_attnopt_site_name"
NAMES_ATTR = "_attnopt_model_sites"  # on each tagged module: every site name of its model (one shared tuple)


class _PolicyHolder:
    """The current policy of the Hugging Face integration (one instance: :data:`CURRENT`)."""

    def __init__(self) -> None:
        self.policy: Policy = as_policy("exact")
        self.checked: set[tuple[Policy, tuple[str, ...]]] = set()  # (policy, a model's site names) whose globs match


CURRENT = _PolicyHolder()


def current_policy() -> Policy:
    """The policy ``attn_implementation="attnopt"`` layers follow now (default ``exact``)."""
    return CURRENT.policy


class use:
    """Sets the current policy now; as a context manager, restores the previous one on exit.

    ``attnopt.hf.use("exact")`` or ``with attnopt.hf.use(policy): ...``.
    """

    def __init__(self, policy: Any = "exact"):
        register()
        self.policy = as_policy(policy)
        other = sorted({v.name for v in (self.policy.default, *(v for _, v in self.policy.overrides))
                        if not isinstance(v, (Exact, Keep))})  # fmt: skip
        if other:
            raise NotImplementedError(
                f"attnopt.hf runs exact and keep per layer; {other} need attnopt's graph passes: use "
                "attnopt.optimize(model, policy, ...) or `attnopt convert` for them"
            )
        self.previous = CURRENT.policy
        CURRENT.policy = self.policy

    def __enter__(self) -> Policy:
        return self.policy

    def __exit__(self, *exc: Any) -> None:
        CURRENT.policy = self.previous


def register() -> None:
    """Registers ``"attnopt"`` with transformers (idempotent; done when this module is imported)."""
    AttentionInterface.register(NAME, attention_forward)
    AttentionMaskInterface.register(NAME, sdpa_mask)


def name_sites(model: torch.nn.Module, prefix: str = "") -> list[str]:
    """Tags every attention module of ``model`` with its module path (``prefix`` first); returns the names."""
    modules = [(f"{prefix}{path}", m) for path, m in model.named_modules() if path and _looks_like_attention(m)]
    names = tuple(name for name, _ in modules)
    for name, module in modules:
        object.__setattr__(module, SITE_ATTR, name)
        object.__setattr__(module, NAMES_ATTR, names)
    return list(names)


def _looks_like_attention(module: torch.nn.Module) -> bool:
    cls = type(module)
    return cls.__module__.startswith("transformers.") and cls.__name__.endswith("Attention") and \
        hasattr(module, "config")  # fmt: skip


def _owning_model(module: torch.nn.Module) -> torch.nn.Module | None:
    """The outermost transformers model on the Python call stack that holds ``module`` (None outside one)."""
    from transformers import PreTrainedModel

    found, frame = None, sys._getframe(1)
    while frame is not None:
        owner = frame.f_locals.get("self")
        if isinstance(owner, PreTrainedModel) and owner is not found and any(m is module for m in owner.modules()):
            found = owner
        frame = frame.f_back
    return found


@torch.compiler.disable
def _name_from_owner(module: torch.nn.Module) -> str | None:
    """Tags the attention modules of ``module``'s model and returns its name (None outside a model). Always
    runs eagerly: under ``torch.compile`` the call is a graph break, and the recompiled graph reads the tag."""
    root = _owning_model(module)
    if root is None:
        return None
    name_sites(root)
    return getattr(module, SITE_ATTR, None)


def site_name(module: torch.nn.Module) -> str:
    """``module``'s site name: its module path in the model that runs it (tagging that model's attention
    modules on first use), else ``<ClassName>.<layer_idx>`` for a layer called outside any model."""
    name = getattr(module, SITE_ATTR, None)
    # a traced call needs the name only to pick an override (torch.export cannot break the graph for it)
    if name is None and (CURRENT.policy.overrides or not torch.compiler.is_compiling()):
        name = _name_from_owner(module)
    if name is not None:
        return name
    idx = getattr(module, "layer_idx", None)
    return type(module).__name__ if idx is None else f"{type(module).__name__}.{idx}"


def _check_globs(module: torch.nn.Module) -> None:
    """A glob of the current policy matching none of the site names of ``module``'s model is an error."""
    policy, names = CURRENT.policy, getattr(module, NAMES_ATTR, None)
    if not policy.overrides or names is None or torch.compiler.is_compiling() or (policy, names) in CURRENT.checked:
        return
    unmatched = policy.unmatched_globs(list(names))
    if unmatched:
        raise ValueError(f"policy override glob(s) {unmatched} match no attention layer of this model; its sites "
                         f"are {list(names)} (module paths from the model you loaded)")  # fmt: skip
    CURRENT.checked.add((policy, names))


def _model_eager(module: torch.nn.Module):
    fn = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    return fn


def _fallback(module, query, key, value, attention_mask, scaling, dropout, **kwargs):
    if kwargs.get("softcap") is not None or kwargs.get("output_attentions", False):
        eager = _model_eager(module)
        if eager is not None:
            return eager(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  **kwargs)  # fmt: skip


def _combine_position_bias(position_bias, attention_mask, causal_now: bool, query, key):
    """An additive mask holding ``position_bias`` where attending is allowed and -inf elsewhere."""
    bias = position_bias
    if attention_mask is None:
        if causal_now:
            sq, sk = query.shape[2], key.shape[2]
            keep = torch.arange(sq, device=key.device)[:, None] >= torch.arange(sk, device=key.device)[None, :]
            bias = torch.where(keep, bias, float("-inf"))
    elif attention_mask.dtype == torch.bool:
        bias = torch.where(attention_mask, bias, float("-inf"))
    else:
        bias = bias + attention_mask
    return bias


def attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                      **kwargs: Any) -> tuple[torch.Tensor, None]:  # fmt: skip
    """transformers' attention-function signature; q [B, Hq, Sq, D], k/v [B, Hkv, Sk, D] -> ([B, Sq, Hq, Dv], None)."""
    name = site_name(module)
    _check_globs(module)
    variant = CURRENT.policy.for_site(name)
    unsupported = kwargs.get("output_attentions", False) or kwargs.get("cache") is not None
    if isinstance(variant, Keep) or unsupported:
        return _fallback(module, query, key, value, attention_mask, scaling, dropout, **kwargs)
    if not isinstance(variant, Exact):  # use() refuses these; a policy set another way may still hold one
        raise NotImplementedError(f"attnopt.hf runs exact and keep per layer, not {variant.name!r}")
    is_causal = kwargs.get("is_causal")
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    # SDPA's convention, as transformers' sdpa function: the flag applies only without a mask (the mask
    # builder returns None when plain causal suffices) and not to a single query (decoding).
    causal_now = bool(is_causal) and attention_mask is None and query.shape[2] > 1
    mask = attention_mask
    position_bias = kwargs.get("position_bias")
    if position_bias is not None:
        mask = _combine_position_bias(position_bias, attention_mask, causal_now, query, key)
        causal_now = False
    softcap = kwargs.get("softcap")
    scale = float(scaling) if scaling is not None else 1.0 / math.sqrt(query.shape[-1])
    dropout_p = float(dropout) if module.training else 0.0
    seed = new_seed() if dropout_p > 0.0 else None
    causal = CAUSAL_TOP_LEFT if causal_now else CAUSAL_NONE
    out, _ = torch.ops.attnopt.attention(query, key, value, mask, dropout_p, causal, scale, seed,
                                         float(softcap) if softcap else 0.0)  # fmt: skip
    return out.transpose(1, 2).contiguous(), None


register()

__all__ = ["CURRENT", "attention_forward", "current_policy", "name_sites", "register", "site_name", "use"]  # fmt: skip
