"""The sparse variant in the pipeline: validation, applicability, string/dict forms and what it writes into a graph.

:class:`attnopt.Sparse` (in :mod:`attnopt.policy`) delegates here, so importing attnopt stays light.

``Sparse(mask)`` with a :class:`attnopt.masks.Mask` replaces a site by attention restricted to the mask,
*and* to the site's own masks (causal flag, padding, any bool or additive mask tensor, read only on
the tiles the descriptor visits), so a causal model stays causal::

    q, k, v, site_mask, causal, scale, softcap = the site's canonical operands
    out = torch.ops.attnopt.sparse_attention(q, k, v, site_mask, None, key(mask ∧ causal), scale, softcap)

That changes the function: the report calls it approximate, with its measured deviation.

``Sparse(Dynamic(...))`` writes ``torch.ops.attnopt.dynamic_attention(q, k, v, site_mask, causal, scale, key)``;
with a decode selection (``decode_top_k``) it writes
``kernels.dynamic.session.site_attention(q, k, v, site_mask, causal, scale, key, site name)``, the same op outside
a decode session and the paged decode step inside one (the model's generation mode is then ``"paged"``).

``Sparse("auto")`` (*exact-sparse*) keeps the function: it writes
``torch.ops.attnopt.sparse_attention_auto(q, k, v, site_mask, causal, scale, softcap)``, which checks
the site's mask at each call and runs the sparse kernel only when the mask *is* a sliding window,
causal, padding or a combination (Mistral, Gemma 2, plain causal LMs), else the exact kernel.
"""

from __future__ import annotations

import json
import math
import operator
from dataclasses import dataclass
from typing import Any

import sympy
import torch
from torch.fx import Node

from attnopt import cost, masks
from attnopt.kernels.dynamic import ops as dynamic_ops  # noqa: F401  (registers torch.ops.attnopt.dynamic_attention)
from attnopt.kernels.dynamic import session as dynamic_session
from attnopt.masks.dynamic import DEFAULT_THRESHOLD
from attnopt.masks.structured import Grid
from attnopt.patterns import module_path
from attnopt.patterns.canonical import tensor_meta
from attnopt.patterns.match import emit_operands, emit_output
from attnopt.variants.registry import ApproximateVariant, MethodHandler, register_variant

AUTO = "auto"
# auto tries dynamic selections on sites attending to at least this many keys, with these estimators.
DYNAMIC_MIN_KEYS = 2048
DYNAMIC_CANDIDATES = ("pooled", "vertical_slash")


def check_mask(mask: Any) -> Any:
    """``mask`` normalized (a :class:`~attnopt.masks.Mask` or ``"auto"``); ValueError/TypeError otherwise."""
    if isinstance(mask, str) and mask.strip().lower() == AUTO:
        return AUTO
    if isinstance(mask, masks.Mask):
        return mask
    if isinstance(mask, dict):
        return masks.from_dict(mask)
    raise TypeError(f"attnopt.Sparse takes a mask descriptor (attnopt.masks.SlidingWindow(...), Neighborhood(...), ...) "
                    f"or 'auto' (the site's own mask, exact-sparse); got {mask!r}")  # fmt: skip


def parse(text: str):
    """The mask of a string form: ``sparse``/``sparse:auto``, ``sparse:causal``, ``sparse:blocked:B``,
    ``sparse:<mask JSON>``, ``sliding_window:W`` (causal window of W tokens), ``sliding_window:L,R`` or
    ``dynamic[:estimator[,key=value...]]`` (see :func:`parse_dynamic`)."""
    head, _, arg = text.strip().partition(":")
    head, arg = head.strip().lower(), arg.strip()
    if head == "dynamic":
        return parse_dynamic(text, arg)
    if head == "sliding_window":
        parts = [p.strip() for p in arg.split(",")] if arg else []
        try:
            nums = [int(p) for p in parts]
        except ValueError:
            nums = []
        if len(nums) == 1 and nums[0] >= 1:
            return masks.SlidingWindow(nums[0] - 1, 0)
        if len(nums) == 2:
            return masks.SlidingWindow(nums[0], nums[1])
        raise ValueError(f"policy {text!r}: sliding_window takes W (a causal window of W tokens, W >= 1) or L,R "
                         "(keys i - L .. i + R)")  # fmt: skip
    if not arg or arg.lower() == AUTO:
        return AUTO
    if arg.lower() == "causal":
        return masks.causal()
    if arg.lower().startswith("blocked:"):
        return masks.Blocked(int(arg.split(":", 1)[1]))
    if arg.startswith("{"):
        return masks.from_dict(json.loads(arg))
    raise ValueError(f"policy {text!r}: sparse takes auto, causal, blocked:B or a mask's JSON (mask.to_dict())")


_DYNAMIC_INTS = ("top_k", "sink", "local", "decode_top_k", "page")


def _value(text: str):
    """A policy string's option value: an int, a float, a bool or the text itself."""
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def parse_dynamic(text: str, arg: str) -> masks.Dynamic:
    """``dynamic`` (pooled, threshold 0.9), ``dynamic:ESTIMATOR`` or ``dynamic:ESTIMATOR,key=value,...`` with keys
    ``block`` (B or BMxBN), ``top_k``, ``threshold``, ``sink``, ``local``, ``per_head``, the decode selection's
    ``decode_top_k`` and ``page``, and the estimator's own options (``stride=16``), e.g.
    ``dynamic:vertical_slash,top_k=8,block=64`` or ``dynamic:pooled,decode_top_k=32,page=16``."""
    parts = [p.strip() for p in arg.split(",") if p.strip()] if arg else []
    estimator = parts.pop(0) if parts and "=" not in parts[0] else "pooled"
    fields, options = {"estimator": estimator}, []
    for part in parts:
        key, eq, value = (x.strip() for x in part.partition("="))
        if not eq or not value:
            raise ValueError(f"policy {text!r}: expected key=value after the estimator; got {part!r}")
        if key == "block":
            fields["block"] = tuple(int(b) for b in value.lower().split("x"))
        elif key in (*_DYNAMIC_INTS, "threshold", "per_head"):
            fields[key] = _value(value)
        else:
            options.append((key, _value(value)))
    try:
        return masks.Dynamic(**fields, options=tuple(options))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"policy {text!r}: {exc}") from exc


def dynamic_string(mask: masks.Dynamic) -> str:
    """The ``dynamic:...`` form :func:`parse_dynamic` reads back (fields at their defaults left out)."""
    default = masks.Dynamic()
    parts = [mask.estimator]
    if mask.block != default.block:
        parts.append(f"block={mask.block_m}x{mask.block_n}")
    fields = ("top_k", "threshold", "sink", "local", "per_head", "decode_top_k", "page")
    parts += [f"{f}={getattr(mask, f)}" for f in fields
              if getattr(mask, f) is not None and getattr(mask, f) != getattr(default, f)]  # fmt: skip
    parts += [f"{k}={v}" for k, v in mask.options]
    return "dynamic:" + ",".join(parts)


def to_string(mask) -> str:
    """The string form :func:`parse` reads back: ``sparse`` (exact-sparse), ``sparse:causal``,
    ``sliding_window:W`` (a causal window of W tokens), ``sliding_window:L,R``, ``sparse:blocked:B``, else
    ``sparse:<mask JSON>``; a mask without a dict form (a tensor, a callable) as its own text."""
    if mask == AUTO:
        return "sparse"
    if isinstance(mask, masks.Dynamic):
        return dynamic_string(mask)
    if mask == masks.causal():
        return "sparse:causal"
    if isinstance(mask, masks.SlidingWindow) and mask.dilation == 1 and None not in (mask.left, mask.right):
        return f"sliding_window:{mask.left + 1}" if mask.right == 0 else f"sliding_window:{mask.left},{mask.right}"
    if isinstance(mask, masks.Blocked) and len(mask.block) == 1 and mask == masks.Blocked(mask.block[0]):
        return f"sparse:blocked:{mask.block[0]}"
    d = mask.to_dict()
    return str(mask) if d is None else "sparse:" + json.dumps(d, separators=(",", ":"))


def to_dict(mask) -> dict:
    if mask == AUTO:
        return {"mask": AUTO}
    d = mask.to_dict()
    if d is None:
        raise TypeError(f"the mask {mask} holds a tensor or a callable: it has no dict form")
    return {"mask": d}


def describe(mask, match=None) -> str:
    """The report's reason; with the site's ``match``, a grid mask names the grid it runs on and its source."""
    if mask == AUTO:
        return ("exact-sparse: the site's own mask, recognized at run time as causal / sliding window / padding, "
                "runs the sparse kernel (else the exact kernel); same function")  # fmt: skip
    if isinstance(mask, masks.Dynamic):
        return (f"dynamic sparse attention, {mask}: key blocks chosen from q and k at each call, within the site's "
                "causal mask and key padding (approximate: changes the function)")  # fmt: skip
    where = ""
    if match is not None:
        mask, source = resolve(mask, match)
        where = f"; {source}" if source else ""
    text = to_string(mask)
    shown = f"mask {mask}" if text.startswith("sparse:{") else text  # a JSON form reads worse than the mask
    return f"sparse attention, {shown}{where} (approximate: changes the function)"


def unsupported(mask, match) -> str | None:
    if match.custom_emit is not None:
        return f"a {match.kind!r} site is written by its own emitter; the sparse kernel takes canonical q, k, v"
    if match.dropout_p > 0.0:
        return "attention dropout is not supported by the sparse kernels"
    if mask == AUTO and not match.bool_masks and not match.additive and not match.causal:
        return "the site has no mask (full attention): nothing to skip"
    if mask != AUTO:
        resolve(mask, match)  # a grid that cannot be inferred or does not fit the site raises here, at decide time
    return None


# --- token grids of vision models -------------------------------------------------------------------------
_CONV_FUNCTIONS = {torch.conv1d, torch.conv2d, torch.conv3d, torch.nn.functional.conv1d, torch.nn.functional.conv2d,
                   torch.nn.functional.conv3d, torch.ops.aten.convolution.default, torch.ops.aten.conv1d.default,
                   torch.ops.aten.conv2d.default, torch.ops.aten.conv3d.default}  # fmt: skip


def _is_conv(node: Node) -> bool:
    if node.op == "call_function":
        return node.target in _CONV_FUNCTIONS
    if node.op == "call_module" and node.graph.owning_module is not None:
        module = node.graph.owning_module.get_submodule(node.target)
        return isinstance(module, torch.nn.modules.conv._ConvNd)
    return False


def patch_grid(node: Node) -> tuple[tuple[int, ...], Node] | None:
    """The token grid of the patch embedding that ``node``'s tokens come from, and that convolution node.

    The grid is the spatial output shape (``[B, C, *grid]``: ``(H', W')`` for Conv2d, ``(T', H', W')`` for
    Conv3d) of the convolution closest to ``node`` among its producers (the last one in graph order: a
    hybrid backbone's last stage). None when no convolution produces ``node``.
    """
    seen, stack, convs = {node}, [node], []
    while stack:
        for parent in stack.pop().all_input_nodes:
            if parent not in seen:
                seen.add(parent)
                stack.append(parent)
                if _is_conv(parent):
                    convs.append(parent)
    if not convs:
        return None
    order = {n: i for i, n in enumerate(node.graph.nodes)}
    conv = max(convs, key=order.__getitem__)
    out = tensor_meta(conv)
    if out is None or out.dim() < 3:
        return None
    grid = tuple(out.shape[2:])
    if not all(isinstance(n, int) for n in grid):
        raise ValueError(f"the patch embedding {conv.name} has a dynamic output shape {tuple(out.shape)}; pass the "
                         "token grid in the policy: attnopt.Sparse(Neighborhood(..., grid=(H, W)))")  # fmt: skip
    return grid, conv


def _site_len(match) -> int | None:
    k = tensor_meta(match.k)
    if "seq" in match.info:
        sk = match.info["seq"][1]
    elif k is not None:
        sk = k.shape[-1] if match.k_transposed else k.shape[-2]
    else:
        return None
    return sk if isinstance(sk, int) else None


def resolve(mask, match):
    """``(mask, source)``: ``mask`` with the token grid of the site filled in where a grid mask has none.

    A :class:`~attnopt.masks.Neighborhood` or :class:`~attnopt.masks.Blocked` without ``grid`` applied to
    tokens that come from a convolutional patch embedding runs on that embedding's output grid; the
    tokens past the grid (CLS, register or distillation tokens, which a vision model puts first) become
    its global tokens. ``source`` says where the grid came from ("" when nothing was inferred). Without
    a patch embedding the mask stays 1-D. ValueError when the grid does not fit the site's sequence.
    """
    if not isinstance(mask, masks.Mask):
        return mask, ""
    if isinstance(mask, (masks.And, masks.Or)):
        parts = [resolve(p, match) for p in mask.parts]
        sources = list(dict.fromkeys(s for _, s in parts if s))
        return type(mask)(tuple(p for p, _ in parts)), "; ".join(sources)
    if not isinstance(mask, Grid) or mask.grid is not None:
        return mask, ""
    found = patch_grid(match.q)
    if found is None:
        return mask, ""
    grid, conv = found
    sk = _site_len(match)
    fix = (f"pass the token grid in the policy, e.g. attnopt.Sparse({type(mask).__name__}(..., grid=(H, W), "
           "global_tokens=G)), or grid=(S,) for a 1-D sequence")  # fmt: skip
    shape = "x".join(map(str, grid))
    if sk is None:
        raise ValueError(f"{mask}: the site's sequence length is unknown, so the {shape} grid of the patch "
                         f"embedding {conv.name} cannot be checked against it; {fix}")  # fmt: skip
    extra = sk - math.prod(grid)
    if extra < 0 or (mask.global_tokens and extra != mask.global_tokens):
        raise ValueError(f"{mask}: the site attends over {sk} tokens, which do not match the {shape} token grid of "
                         f"the patch embedding {conv.name} plus {mask.global_tokens or 'leading extra'} tokens; {fix}")  # fmt: skip
    try:
        resolved = mask.on_grid(grid, extra)
    except ValueError as exc:
        raise ValueError(f"{mask} does not fit the {shape} token grid of the patch embedding {conv.name}: {exc}; "
                         f"{fix}") from exc  # fmt: skip
    source = f"grid {shape} inferred from the patch embedding {conv.name}" + (
        f", {extra} leading extra token(s) as global tokens" if extra else "")
    return resolved, source


def emit(mask, graph, match, lookup):
    c = emit_operands(graph, match, lookup)
    if isinstance(mask, masks.Dynamic) and mask.decode_top_k is not None:  # paged inside a decode session
        site = module_path(match.output) or match.output.name
        call = graph.call_function(dynamic_session.site_attention,
                                   (c.q, c.k, c.v, c.mask, c.causal, c.scale, mask.key(), site))  # fmt: skip
        return emit_output(graph, match, call)
    if isinstance(mask, masks.Dynamic):  # the block lists are estimated inside the op, at each call
        call = graph.call_function(torch.ops.attnopt.dynamic_attention.default,
                                   (c.q, c.k, c.v, c.mask, c.causal, c.scale, mask.key()))  # fmt: skip
    elif mask == AUTO:
        call = graph.call_function(torch.ops.attnopt.sparse_attention_auto.default,
                                   (c.q, c.k, c.v, c.mask, c.causal, c.scale, c.softcap))  # fmt: skip
    else:
        # The site's causal flag joins the descriptor (bottom-right, the FlashAttention-2 convention; the same
        # as SDPA's top-left is_causal when Sq == Sk); its mask tensor goes along, read on visited tiles only.
        mask, _ = resolve(mask, match)
        full = mask & masks.causal() if c.causal else mask
        call = graph.call_function(torch.ops.attnopt.sparse_attention.default,
                                   (c.q, c.k, c.v, c.mask, None, full.key(), c.scale, c.softcap))  # fmt: skip
    return emit_output(graph, match, graph.call_function(operator.getitem, (call, 0)))


def candidates(cls, site, match) -> list:
    """For the auto policy: exact-sparse when the site has a mask, then causal windows of Sk/8 .. Sk/2 tokens
    (causal sites) or symmetric windows (the others)."""
    out = []
    if unsupported(AUTO, match) is None:
        out.append(cls(AUTO))
    sk = site.seq[1] if len(site.seq) == 2 and isinstance(site.seq[1], int) else None
    if sk is None or unsupported(masks.causal(), match) is not None:
        return out
    for frac in (8, 4, 2):
        w = sk // frac
        if w >= 16:
            out.append(cls(masks.SlidingWindow(w - 1, 0) if site.causal != "none" else masks.SlidingWindow(w // 2, w // 2)))
    if sk >= DYNAMIC_MIN_KEYS:  # long sites: content-based selections, kept only within the error budget
        out += [cls(masks.Dynamic(e, threshold=DEFAULT_THRESHOLD)) for e in DYNAMIC_CANDIDATES]
    return out


# ------------------------------------------------------------------------------------------- the variant

class _SparseName:
    """``Sparse.name``: "sparse" on the class and for a given mask, "exact-sparse" for ``Sparse("auto")``."""

    def __get__(self, obj, cls=None) -> str:
        return "exact-sparse" if obj is not None and obj.mask == "auto" else "sparse"


@dataclass(frozen=True)
class Sparse(ApproximateVariant):
    """Attention restricted to a mask descriptor (:mod:`attnopt.masks`); see :mod:`attnopt.variants.sparse`.

    ``Sparse(mask)`` applies a new mask on top of the site's own (an approximation for a model trained
    dense, reported with its measured deviation). ``Sparse("auto")`` (the default) is exact-sparse: the
    site's own mask, recognized at run time as causal, a sliding window or padding, runs the sparse kernel,
    with the same results.
    """

    mask: Any = "auto"
    name = _SparseName()
    exact = property(lambda self: self.mask == "auto")  # same function: validated at the dtype's tolerance
    # a dynamic mask with a decode selection generates through its paged caches (attnopt.generate)
    generation = property(lambda self: "paged" if getattr(self.mask, "decode_top_k", None) is not None else "kv-cache")

    def __post_init__(self):
        object.__setattr__(self, "mask", check_mask(self.mask))

    @classmethod
    def from_string(cls, text: str) -> "Sparse":
        """``sparse``, ``sparse:auto``, ``sparse:causal``, ``sparse:blocked:B``, ``sparse:<mask JSON>``,
        ``sliding_window:W`` (a causal window of W tokens) or ``sliding_window:L,R``."""
        return cls(parse(text))

    def to_string(self) -> str:
        """The string form ``parse_variant`` reads back, e.g. ``sliding_window:4`` or ``sparse:causal``."""
        return to_string(self.mask)

    def to_dict(self) -> dict:
        return to_dict(self.mask)

    @classmethod
    def from_dict(cls, body: dict) -> "Sparse":
        unknown = sorted(set(body) - {"mask"})
        if unknown:
            raise ValueError(f"unknown key {unknown[0]!r} for variant 'sparse'; known keys: ['mask']")
        return cls(body.get("mask", "auto"))

    @classmethod
    def candidates(cls, site, match) -> list:
        return candidates(cls, site, match)

    def unsupported(self, match) -> str | None:
        return unsupported(self.mask, match)

    def describe(self, match=None) -> str:
        """The report's reason; given the site's match, it names the token grid a grid mask runs on and its source."""
        return describe(self.mask, match)

    def emit(self, graph, match, lookup):
        return emit(self.mask, graph, match, lookup)


class SparseHandler(MethodHandler):
    def run_facts(self, variant):
        return dynamic_facts(variant.mask) if isinstance(variant.mask, masks.Dynamic) else None

    def cost(self, variant, shape):
        """``Sparse(mask)`` visits the tiles of ``mask`` (and causal for a causal site) and reads the site's mask
        tensor there; exact-sparse visits those of ``shape.own_mask`` and is the exact kernel when the site's
        mask is not structured (or not known)."""
        if isinstance(variant.mask, masks.Dynamic):
            return cost.sparse(sympy.Float(dynamic_tiles(variant.mask, shape)), shape.masked)
        if variant.exact:
            if shape.own_mask is None:
                return cost.exact(shape.causal, shape.masked)
            return cost.sparse(sympy.Float(cost.mask_tiles(shape.own_mask, shape.sq, shape.sk, shape.heads)))
        mask = variant.mask & masks.causal() if shape.causal else variant.mask
        return cost.sparse(sympy.Float(cost.mask_tiles(mask, shape.sq, shape.sk, shape.heads)), shape.masked)


def dynamic_facts(mask: masks.Dynamic) -> dict | None:
    """The last run's achieved density (mean and per-head range, of the blocks the site's mask allows) and the
    estimator's share of the site's time (see :func:`attnopt.kernels.dynamic.ops.last_stats`)."""
    stats = dynamic_ops.last_stats(mask.key())
    if stats is None:
        return None
    summary = (f"density {stats['density_mean']:.1%} of the allowed blocks, per head {stats['density_min']:.1%}-"
               f"{stats['density_max']:.1%}; estimation {stats['estimate_share']:.0%} of the time")  # fmt: skip
    return {**stats, "summary": summary}


def dynamic_tiles(mask: masks.Dynamic, shape) -> float:
    """Key tiles (of the cost model's size) per query tile a dynamic selection is expected to visit: its expected
    share (:meth:`~attnopt.masks.Dynamic.expected_blocks`) of the tiles the site's own mask allows."""
    allowed = cost.mask_tiles(masks.causal(), shape.sq, shape.sk) if shape.causal else -(-shape.sk // cost.BLOCK)
    own = max(1.0, allowed * cost.BLOCK / mask.block_n)  # the same in the mask's key blocks
    return allowed * mask.expected_blocks(own) / own


register_variant(Sparse, SparseHandler(), heads=("sliding_window", "dynamic"))
