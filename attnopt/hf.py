"""Hugging Face integration: ``attn_implementation="attnopt"``.

    import attnopt.hf                                   # registers "attnopt" with transformers
    attnopt.hf.use("exact")                             # the current policy (a setter) ...
    with attnopt.hf.use(attnopt.Policy(default="exact", overrides={"layers.0.*": "keep"})):
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

Site names: :func:`name_sites` tags every attention module of a model with its dotted path (the name
attnopt's graph passes use, e.g. ``layers.0.self_attn``); untagged modules are named
``<ClassName>.<layer_idx>``. ``from_pretrained``/``from_config`` models built while this module is imported
are not tagged automatically: call ``attnopt.hf.name_sites(model)`` to use path globs in a policy.

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
from attnopt.ops import new_seed
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


class _PolicyHolder:
    """The current policy of the Hugging Face integration (one instance: :data:`CURRENT`)."""

    def __init__(self) -> None:
        self.policy: Policy = as_policy("exact")


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
    """Tags every attention module of ``model`` with its dotted path; returns the names tagged."""
    names = []
    for path, module in model.named_modules():
        if path and _looks_like_attention(module):
            name = f"{prefix}{path}"
            object.__setattr__(module, SITE_ATTR, name)
            names.append(name)
    return names


def _looks_like_attention(module: torch.nn.Module) -> bool:
    cls = type(module)
    return cls.__module__.startswith("transformers.") and cls.__name__.endswith("Attention") and \
        hasattr(module, "config")  # fmt: skip


def site_name(module: torch.nn.Module) -> str:
    name = getattr(module, SITE_ATTR, None)
    if name is not None:
        return name
    idx = getattr(module, "layer_idx", None)
    return type(module).__name__ if idx is None else f"{type(module).__name__}.{idx}"


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
    variant = CURRENT.policy.for_site(site_name(module))
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
