"""The sparse variant in the pipeline: validation, applicability, string/dict forms and what it writes into a graph.

:class:`attnopt.Sparse` (in :mod:`attnopt.policy`) delegates here, so importing attnopt stays light.

``Sparse(mask)`` with a :class:`attnopt.masks.Mask` replaces a site by attention restricted to the mask,
*and* to the site's own masks (causal flag, padding, any bool or additive mask tensor, read only on
the tiles the descriptor visits), so a causal model stays causal::

    q, k, v, site_mask, causal, scale, softcap = the site's canonical operands
    out = torch.ops.attnopt.sparse_attention(q, k, v, site_mask, None, key(mask ∧ causal), scale, softcap)

That changes the function: the report calls it approximate, with its measured deviation.

``Sparse("auto")`` (*exact-sparse*) keeps the function: it writes
``torch.ops.attnopt.sparse_attention_auto(q, k, v, site_mask, causal, scale, softcap)``, which checks
the site's mask at each call and runs the sparse kernel only when the mask *is* a sliding window,
causal, padding or a combination (Mistral, Gemma 2, plain causal LMs), else the exact kernel.
"""

from __future__ import annotations

import json
import operator
from typing import Any

import torch

from attnopt import masks

AUTO = "auto"


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
    ``sparse:<mask JSON>``, ``sliding_window:W`` (causal window of W tokens) or ``sliding_window:L,R``."""
    head, _, arg = text.strip().partition(":")
    head, arg = head.strip().lower(), arg.strip()
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


def to_dict(mask) -> dict:
    if mask == AUTO:
        return {"mask": AUTO}
    d = mask.to_dict()
    if d is None:
        raise TypeError(f"the mask {mask} holds a tensor or a callable: it has no dict form")
    return {"mask": d}


def describe(mask) -> str:
    if mask == AUTO:
        return ("exact-sparse: the site's own mask, recognized at run time as causal / sliding window / padding, "
                "runs the sparse kernel (else the exact kernel); same function")  # fmt: skip
    return f"sparse attention, mask {mask} (approximate: changes the function)"


def unsupported(mask, match) -> str | None:
    if match.custom_emit is not None:
        return f"a {match.kind!r} site is written by its own emitter; the sparse kernel takes canonical q, k, v"
    if match.dropout_p > 0.0:
        return "attention dropout is not supported by the sparse kernels"
    if mask == AUTO and not match.bool_masks and not match.additive and not match.causal:
        return "the site has no mask (full attention): nothing to skip"
    return None


def emit(mask, graph, match, lookup):
    from attnopt.patterns.match import emit_operands, emit_output

    c = emit_operands(graph, match, lookup)
    if mask == AUTO:
        call = graph.call_function(torch.ops.attnopt.sparse_attention_auto.default,
                                   (c.q, c.k, c.v, c.mask, c.causal, c.scale, c.softcap))  # fmt: skip
    else:
        # The site's causal flag joins the descriptor (bottom-right, the FlashAttention-2 convention; the same
        # as SDPA's top-left is_causal when Sq == Sk); its mask tensor goes along, read on visited tiles only.
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
    return out
