"""The linear variant: its config (:class:`Linear`), validation, applicability, and what it writes into a graph.

Linear, per site (``emit_linear``)::

    q, k, v, mask, scale = the site's canonical operands         # [B, Hq, Sq, D], [B, Hkv, Sk, D], ...
    q, k = φ(q), φ(k) · keep                                     # keep [B|1, Hkv|1, Sk, 1]: keys some query sees
    out = site_attention(q, k, v, log λ, causal, normalize, scale, eps, site key)
    out = rms_norm(out)                                          # normalize="rms" only

GQA is native: the op reads key/value head h // (Hq / Hkv) for query head h (the CPU path expands k
and v; the Triton kernels index them). A site mask is reduced to key padding: a key that no query may
attend to is dropped by zeroing its features (exact for padding masks; a causal mask's triangle is the
``causal`` flag's business). ``site_attention`` (:mod:`attnopt.kernels.linear.decode`) runs the op, or,
inside a recurrent session, carries the site's state from call to call.
"""

from __future__ import annotations

import math
import operator
import re
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F

from attnopt import cost
from attnopt.kernels.exact.reference import CAUSAL_BOTTOM_RIGHT, CAUSAL_NONE
from attnopt.kernels.linear import decode
from attnopt.kernels.linear.reference import EPS, FEATURE_MAPS, feature_map, lightning_log_decay
from attnopt.patterns import module_path
from attnopt.patterns.canonical import tensor_meta
from attnopt.patterns.match import emit_operands, emit_output
from attnopt.variants.registry import ApproximateVariant, MethodHandler, register_variant

NORMALIZE = (True, False, "sum", "rms")
RMS_EPS = 1e-6
MASKED = -1e4  # an additive mask entry at or below this hides its key (the convention of the pattern matchers)


# ------------------------------------------------------------------------------------------------ validation

def is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _check_lambda(x: Any, where: str) -> float:
    if not (is_number(x) and 0.0 < x <= 1.0):
        raise ValueError(f"{where} must be a decay λ in (0, 1]; got {x!r}")
    return float(x)


def check_linear(v) -> dict:
    """Validates a ``Linear``'s fields; returns the normalized values to store (e.g. a decay list as a tuple)."""
    if v.feature_map not in FEATURE_MAPS:
        raise ValueError(f"Linear.feature_map must be one of {FEATURE_MAPS}; got {v.feature_map!r}")
    if v.causal not in (None, True, False) or is_number(v.causal) and not isinstance(v.causal, bool):
        raise ValueError(f"Linear.causal must be None (follow the site), True or False; got {v.causal!r}")
    if not any(v.normalize is n or (isinstance(n, str) and v.normalize == n) for n in NORMALIZE):
        raise ValueError(f"Linear.normalize must be one of {NORMALIZE}; got {v.normalize!r}")
    normalize = True if v.normalize == "sum" else v.normalize
    if v.feature_map == "identity" and normalize is True:
        raise ValueError("Linear.normalize: the identity feature map makes the denominator φ(Q)(φ(K)ᵀ1) signed, so it "
                         "can vanish; use normalize='rms' (TransNormer) or False")  # fmt: skip
    decay = v.decay
    if isinstance(decay, str):
        if decay != "lightning":
            raise ValueError(f"Linear.decay must be None, a λ in (0, 1], one λ per head, or 'lightning'; got {decay!r}")
        if not (isinstance(v.num_layers, int) and not isinstance(v.num_layers, bool) and v.num_layers > 0):
            raise ValueError("Linear.num_layers: decay='lightning' needs the model's number of layers (a positive int); "
                             f"got {v.num_layers!r}")  # fmt: skip
    elif isinstance(decay, (tuple, list)):
        if not decay:
            raise ValueError("Linear.decay: a per-head decay needs one λ per query head; got an empty list")
        decay = tuple(_check_lambda(x, f"Linear.decay[{i}]") for i, x in enumerate(decay))
    elif decay is not None:
        decay = _check_lambda(decay, "Linear.decay")
    if v.num_layers is not None and v.decay != "lightning":
        raise ValueError(f"Linear.num_layers is only used with decay='lightning'; got num_layers={v.num_layers!r}")
    if decay is not None and v.causal is False:
        raise ValueError("Linear.decay weighs keys by their distance to the query (λ^(i-j), j <= i): it needs causal "
                         "attention, not causal=False")  # fmt: skip
    return {"normalize": normalize, "decay": decay}




def _parse_value(text: str) -> Any:
    """A bool, None, an int, a float or the text; ``a/b/c`` is a tuple of values (one decay λ per head)."""
    if "/" in text:
        return tuple(_parse_value(x) for x in text.split("/"))
    low = text.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    if low == "none":
        return None
    try:
        return int(low)
    except ValueError:
        pass
    try:
        return float(low)
    except ValueError:
        return text.strip()


def parse_options(text: str, cls) -> dict:
    """Keyword arguments of ``cls`` from ``name[:value|key=value,...]``; a bare value sets the first field.

    ``linear:relu,causal=true,decay=lightning,num_layers=12``; ``sigmoid:-2.5``.
    """
    _, sep, arg = text.strip().partition(":")
    names = [f.name for f in cls.__dataclass_fields__.values()]
    out: dict = {}
    for i, item in enumerate(x for x in arg.split(",") if x.strip()) if sep else ():
        key, eq, value = item.partition("=")
        if not eq:
            if i or not names:
                raise ValueError(f"policy {text!r}: {item.strip()!r} needs a key ({', '.join(names)})")
            key, value = names[0], item
        key = key.strip()
        if key not in names:
            raise ValueError(f"policy {text!r}: unknown option {key!r}; {cls.name} takes {', '.join(names)}")
        out[key] = _parse_value(value)
    return out


def linear_string(v) -> str:
    """``linear:<feature map>`` plus the fields that differ from their defaults (:func:`parse_options` inverts it)."""
    parts = [v.feature_map]
    if v.causal is not None:
        parts.append(f"causal={str(v.causal).lower()}")
    if v.decay is not None:
        parts.append("decay=" + ("/".join(map(str, v.decay)) if isinstance(v.decay, tuple) else str(v.decay)))
    if v.num_layers is not None:
        parts.append(f"num_layers={v.num_layers}")
    if v.normalize is not True:
        parts.append(f"normalize={str(v.normalize).lower()}")
    return "linear:" + ",".join(parts)


# ----------------------------------------------------------------------------------------------- applicability

def masked(m) -> bool:
    """Whether the site has a mask tensor."""
    return bool(m.additive or m.bool_masks)


def mask_causality(mask: torch.Tensor) -> bool | None:
    """What a site's mask (bool True = attend, or additive) is on the values given: causal plus key padding
    (True), key padding alone (False), or neither (None). Rows that see no key (padded queries) are ignored;
    one query over one key counts as causal (a decode step carries the recurrent state)."""
    visible = mask if mask.dtype == torch.bool else mask > MASKED
    sq, sk = visible.shape[-2:]
    seen = visible.any(dim=-1, keepdim=True)  # [..., Sq, 1]: rows that see some key
    keep = visible.any(dim=-2, keepdim=True)  # [..., 1, Sk]: keys some query sees
    if sq == sk:
        tril = torch.ones(sq, sk, dtype=torch.bool, device=visible.device).tril()
        if bool(((visible == (tril & keep)) | ~seen).all()):
            return True
    if bool(((visible == keep) | ~seen).all()):
        return False
    return None


def softcapped(m) -> bool:
    return bool(getattr(m, "softcap", None)) or getattr(m, "softcap_expr", None) is not None


def _seq_lengths(m) -> tuple[Any, Any]:
    """(Sq, Sk) as recorded on the example inputs (None when unknown)."""
    q, k = tensor_meta(m.q), tensor_meta(m.k)
    if q is None or k is None:
        return None, None
    sq = q.shape[-2] if not m.q_ops else None
    sk = (k.shape[-1] if m.k_transposed else k.shape[-2]) if not m.k_ops else None
    return sq, sk


def layer_index(m) -> int | None:
    """The first integer in the module path of the site (``layers.3.self_attn`` -> 3), if any."""
    found = re.search(r"(?:^|\.)(\d+)(?:\.|$)", module_path(m.output))
    return int(found.group(1)) if found else None


def resolve_causal(v, m) -> bool | str:
    """Whether the site runs causal; a string says why it cannot run at all."""
    site_causal = m.causal != CAUSAL_NONE
    if v.causal is None:
        if masked(m):
            return (f"the site's {m.mask_kind} mask tensor is neither causal nor padding on the example inputs "
                    "(or there were none); say what it is: linear:causal=true / Linear(causal=True) for a causal "
                    "mask (padding included), linear:causal=false / Linear(causal=False) for a padding mask")
        return site_causal
    if v.causal is False and site_causal:
        return "the site is causal; Linear(causal=False) would let queries see later keys"
    return v.causal


def linear_unsupported(v, m) -> str | None:
    if m.custom_emit is not None:
        return f"linear attention needs the site's q, k and v; this {m.kind} site is rewritten as a whole"
    if softcapped(m):
        return "the site soft-caps its scores (Gemma 2 style); linear attention has no scores to cap"
    causal = resolve_causal(v, m)
    if isinstance(causal, str):
        return causal
    sq, sk = _seq_lengths(m)
    if causal and isinstance(sq, int) and isinstance(sk, int) and sq != sk:
        return f"causal linear attention needs as many queries as keys (Sq {sq}, Sk {sk}); decode through the state"
    if causal and m.causal == CAUSAL_BOTTOM_RIGHT and not isinstance(sq, int):
        return "a bottom-right causal site may have Sq != Sk, which causal linear attention does not take"
    if v.decay is not None and not causal:
        return "decay needs causal attention and the site is not causal"
    if v.decay == "lightning":
        layer = layer_index(m)
        if layer is None:
            return f"decay='lightning' needs the site's layer index; its module path {module_path(m.output)!r} has none"
        if layer >= v.num_layers:
            return f"decay='lightning': the site's layer {layer} is not below num_layers={v.num_layers}"
    return None


def candidates(cls, site, match) -> list:
    """For the auto policy (``Auto(allow_linear=True)``): linear attention with the elu+1 and the relu feature
    map. Causal when the site is causal or has a mask tensor: a decoder's mask (causal plus padding) then
    stays causal, and an encoder's padding mask gets a causal approximation whose measured deviation rules
    it out; so no candidate lets a query see keys its mask may hide. Non-causal for an unmasked
    non-causal site. Candidates the site cannot take stay in the list: calibration reports why."""
    causal = site.causal != "none" or site.mask != "none"
    return [cls(feature_map, causal=causal) for feature_map in ("elu", "relu")]


def describe_linear(v) -> str:
    parts = [f"feature map {v.feature_map}"]
    if v.causal is not None:
        parts.append("causal" if v.causal else "non-causal")
    if v.decay == "lightning":
        parts.append(f"lightning decay (num_layers {v.num_layers})")
    elif v.decay is not None:
        parts.append(f"decay {v.decay}")
    parts.append({True: "sum-normalized", False: "unnormalized", "rms": "rms-normalized"}[v.normalize])
    return f"linear attention, {', '.join(parts)} (changes the function)"




# ------------------------------------------------------------------------------------------- graph helpers

def key_padding(mask: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """[B|1, Hkv|1, Sk, 1] bool: the keys that at least one query may attend to under ``mask``.

    ``mask`` broadcasts to [B, Hq, Sq, Sk] (bool True = attend, or additive with hidden keys at or below
    :data:`MASKED`). Per-query-head masks are merged over each GQA group (a key seen by any head of the
    group is kept).
    """
    visible = mask if mask.dtype == torch.bool else mask > MASKED
    while visible.dim() < 4:
        visible = visible.unsqueeze(0)
    keep = visible.any(dim=-2)  # [B|1, H|1, Sk]
    h = keep.shape[1]
    if h not in (1, num_kv_heads):
        keep = keep.unflatten(1, (num_kv_heads, h // num_kv_heads)).any(dim=2)
    return keep[..., None]


def site_log_decay(q: torch.Tensor, decay: Any, layer: int | None, num_layers: int | None) -> torch.Tensor:
    """log λ [Hq] fp32 on q's device for the site: from one λ, one λ per head, or the lightning schedule."""
    hq = q.shape[1]
    if decay == "lightning":
        ld = lightning_log_decay(hq, layer, num_layers)
    elif isinstance(decay, tuple):
        if len(decay) != hq:
            raise ValueError(f"Linear.decay gives {len(decay)} values; the site has {hq} query heads")
        ld = torch.log(torch.tensor(decay, dtype=torch.float32))
    else:
        ld = torch.full((hq,), math.log(decay), dtype=torch.float32)
    return ld.to(q.device)


def rms_norm(x: torch.Tensor) -> torch.Tensor:
    """TransNormer's output normalization, without a learned gain: x / rms(x) over the value dim."""
    return F.rms_norm(x, (x.shape[-1],), eps=RMS_EPS)


# ------------------------------------------------------------------------------------------------- emitters

def emit_linear(v, graph, m, lookup):
    causal = resolve_causal(v, m)
    if isinstance(causal, str):
        raise ValueError(causal)
    c = emit_operands(graph, m, lookup)
    q = graph.call_function(feature_map, (c.q, v.feature_map))
    k = graph.call_function(feature_map, (c.k, v.feature_map))
    if c.mask is not None:
        keep = graph.call_function(key_padding, (c.mask, graph.call_method("size", (c.k, 1))))
        k = graph.call_function(operator.mul, (k, keep))
    log_decay = None
    if v.decay is not None:
        layer = layer_index(m) if v.decay == "lightning" else None
        log_decay = graph.call_function(site_log_decay, (c.q, v.decay, layer, v.num_layers))
    normalize = v.normalize is True
    key = module_path(m.output) or m.output.name
    out = graph.call_function(decode.site_attention, (q, k, c.v, log_decay, bool(causal), normalize, c.scale, EPS, key))
    if v.normalize == "rms":
        out = graph.call_function(rms_norm, (out,))
    return emit_output(graph, m, out)


# ------------------------------------------------------------------------------------------- the variant

@dataclass(frozen=True)
class Linear(ApproximateVariant):
    """Linear attention ``φ(Q)(φ(K)ᵀV)`` (changes the function; :mod:`attnopt.kernels.linear.reference`).

    ``feature_map``: ``"elu"`` (elu + 1), ``"relu"`` or ``"identity"``, applied to the site's queries and keys.
    ``causal``: None follows the site (its causal flag; a site with a mask tensor then needs an explicit
    choice); True treats the site's mask as causal plus key padding, False as key padding alone (keys no
    query may see are dropped, which is exact for padding masks).
    ``decay``: None; λ in (0, 1] for every head; one λ per query head; or ``"lightning"``, Lightning
    Attention's schedule ``λ_h = exp(-(8h/H)(1 - l/L))`` with the layer l read from the site's module
    path and L = ``num_layers``. Causal only: query i weighs key j by ``λ^(i-j)``.
    ``normalize``: True or ``"sum"`` divides by ``φ(Q)(φ(K)ᵀ1) + eps``; ``"rms"`` applies TransNormer's
    parameter-free RMS norm to the unnormalized output instead; False leaves it unnormalized.
    Attention dropout is not applied (there is no probability matrix to drop from).
    """

    feature_map: str = "elu"
    causal: bool | None = None
    decay: Any = None
    normalize: bool | str = True
    num_layers: int | None = None
    name = "linear"
    generation = "recurrent"  # attnopt.generate runs its sites through their recurrent states, no KV cache
    auto_option = "allow_linear"  # auto tries linear candidates only when Auto(allow_linear=True)

    def __post_init__(self):
        for key, value in check_linear(self).items():
            object.__setattr__(self, key, value)

    @classmethod
    def from_string(cls, text: str) -> "Linear":
        """``linear`` or ``linear:<feature map>`` or ``linear:key=value,...`` (e.g. ``linear:relu,causal=true``)."""
        return cls(**parse_options(text, cls))

    def to_string(self) -> str:
        """The string form (``parse_variant`` inverts it), e.g. ``linear:relu,causal=true,decay=0.9/0.8``."""
        return linear_string(self)

    @classmethod
    def candidates(cls, site, match) -> list:
        return candidates(cls, site, match)

    def needs_site_mask(self, match) -> bool:
        """``causal=None`` at a site with a mask tensor: whether the mask is causal is read from its values
        on the example inputs (:meth:`bind`)."""
        return self.causal is None and masked(match)

    def bind(self, match, mask) -> "Linear":
        """This variant with ``causal`` read from the site's ``mask`` (causal plus padding, or padding alone);
        unchanged when the mask is neither (the site is then refused, naming the choice to make)."""
        causal = mask_causality(mask)
        if causal is None or (causal is False and self.decay is not None):
            return self
        return replace(self, causal=causal)

    def unsupported(self, match) -> str | None:
        return linear_unsupported(self, match)

    def describe(self, match=None) -> str:
        return describe_linear(self)

    def emit(self, graph, match, lookup):
        return emit_linear(self, graph, match, lookup)


class LinearHandler(MethodHandler):
    def cost(self, variant, shape):
        causal = shape.causal if variant.causal is None else variant.causal
        return cost.linear(causal, variant.normalize)


register_variant(Linear, LinearHandler())
