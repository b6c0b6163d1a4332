"""``F.scaled_dot_product_attention`` calls, with every argument SDPA takes.

Keys and values repeated per query head (``repeat_kv``, ``repeat_interleave``) are read through, so
the rewrite uses native GQA; a boolean mask built in the graph from a causal pattern (and padding)
loses its causal part to the kernel's causal flag.
"""

from __future__ import annotations

import inspect

import networkx as nx
import torch
from torch.fx import Node

from attnopt.kernels.exact.reference import CAUSAL_NONE, CAUSAL_TOP_LEFT
from attnopt.patterns.canonical import SDPA, bind_call, is_symbolic_scalar, tensor_meta
from attnopt.patterns.causal import split_causal
from attnopt.patterns.layout import LayoutError, as_static, eq, hint, is_one, is_sym, prod
from attnopt.patterns.match import AttentionMatch, BoolMask, Miss, ScalarExpr, Term
from attnopt.patterns.operands import as_int, describe, seq_major, term_ops, unrepeat

_SIGNATURE = inspect.Signature(
    [
        inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=default)
        for name, default in [
            ("query", inspect.Parameter.empty),
            ("key", inspect.Parameter.empty),
            ("value", inspect.Parameter.empty),
            ("attn_mask", None),
            ("dropout_p", 0.0),
            ("is_causal", False),
            ("scale", None),
            ("enable_gqa", False),
        ]
    ]
)


def _arguments(node: Node) -> dict:
    """The call's arguments by name; a :class:`Miss` when they are not ones the rewrite takes."""
    a = bind_call(node, SDPA, _SIGNATURE, "scaled_dot_product_attention")
    if not isinstance(a, dict):
        raise Miss(a or f"{describe(node)} is not a scaled_dot_product_attention call")
    qm, km, vm = tensor_meta(a["query"]), tensor_meta(a["key"]), tensor_meta(a["value"])
    if qm is None or km is None or vm is None:
        raise Miss("q/k/v have no recorded shape")
    if qm.dim() < 3 or km.dim() != qm.dim() or vm.dim() != qm.dim():
        raise Miss(f"q/k/v of ranks {qm.dim()}/{km.dim()}/{vm.dim()}; only q, k and v of one rank (3 or more) "
                   "are rewritten")
    if _folds(qm, km, vm):
        _check_folded_batch(qm, km, vm)
    elif qm.dim() == 4 and (not eq(qm.shape[0], km.shape[0]) or hint(qm.shape[1]) % hint(km.shape[1]) != 0):
        raise Miss(f"q batch/heads {tuple(qm.shape[:2])} incompatible with k {tuple(km.shape[:2])}")
    if qm.dim() == 3 and not eq(qm.shape[0], km.shape[0]):
        raise Miss(f"q batch {qm.shape[0]} differs from k batch {km.shape[0]}")
    if not isinstance(a["is_causal"], bool) or not isinstance(a["dropout_p"], (int, float)):
        raise Miss("is_causal/dropout_p are not constants in the graph")
    if not is_symbolic_scalar(a["scale"]) and a["scale"] is not None and not isinstance(a["scale"], (int, float)):
        raise Miss("scale is not a number in the graph")
    return a


def _folds(qm: torch.Tensor, km: torch.Tensor, vm: torch.Tensor) -> bool:
    """Rank 5 and more, or rank 4 with k/v broadcast along the batch: the batch dims fold (and expand) into one."""
    return qm.dim() > 4 or (qm.dim() == 4 and any(is_one(t.shape[0]) and not eq(t.shape[0], qm.shape[0])
                                                  for t in (km, vm)))  # fmt: skip


def _check_folded_batch(qm: torch.Tensor, km: torch.Tensor, vm: torch.Tensor) -> None:
    """Rank 5 and more: the dims before the heads fold into one batch; k and v may broadcast along them."""
    for name, t in (("k", km), ("v", vm)):
        for a, b in zip(t.shape[:-3], qm.shape[:-3]):
            if not (eq(a, b) or (is_one(a) and not is_sym(b))):
                raise Miss(f"{name} batch dims {tuple(t.shape[:-3])} do not broadcast to q's {tuple(qm.shape[:-3])}")
    if not eq(km.shape[-3], vm.shape[-3]) or hint(qm.shape[-3]) % hint(km.shape[-3]) != 0:
        raise Miss(f"q heads {qm.shape[-3]} incompatible with k/v heads {km.shape[-3]}/{vm.shape[-3]}")


def _fold(x: Node, xm: torch.Tensor, qm: torch.Tensor) -> tuple:
    """The view program taking ``x`` [*batch, H, S, D] (batch broadcasting to q's) to [prod(batch), H, S, D]."""
    lead = qm.dim() - 3
    expand = tuple(-1 if eq(a, b) else int(b) for a, b in zip(xm.shape[:lead], qm.shape[:lead]))
    ops = (("expand", expand + (-1, -1, -1)),) if any(e != -1 for e in expand) else ()
    return ops + (("flatten", (0, lead - 1)),)


def _unfold_sizes(qm: torch.Tensor) -> tuple:
    """Sizes for ``unflatten`` back to q's batch dims: static ones as ints, the one dynamic one -1."""
    dynamic = [x for x in qm.shape[:-3] if is_sym(x)]
    if len(dynamic) > 1:
        raise Miss(f"q has {len(dynamic)} dynamic batch dims {tuple(qm.shape[:-3])}; only one can fold into the batch")
    return tuple(-1 if is_sym(x) else int(as_static(x)) for x in qm.shape[:-3])


def _scale(a: dict) -> dict:
    if is_symbolic_scalar(a["scale"]):  # a float dynamo made a graph input
        expr = ScalarExpr(1.0, ((a["scale"], 1),))
        return {"scale": expr.value, "scale_expr": expr}
    return {"scale": a["scale"]}


def _operands(a: dict, qm: torch.Tensor, km: torch.Tensor) -> dict:
    """q, k and v with their views to [B, H, S, D] (a 3-D call is a batch of one), repeats read through."""
    hq, hkv = (qm.shape[1], km.shape[1]) if qm.dim() == 4 else (qm.shape[0], km.shape[0])
    fields = {"q": a["query"], "k": a["key"], "v": a["value"]}
    vm = tensor_meta(a["value"])
    if _folds(qm, km, vm):  # [*batch, H, S, D]: the batch dims fold into one
        return {**fields, "q_ops": _fold(a["query"], qm, qm), "k_ops": _fold(a["key"], km, qm),
                "v_ops": _fold(a["value"], vm, qm), "out_ops": (("unflatten", (0, _unfold_sizes(qm))),),
                "heads": (qm.shape[-3], km.shape[-3])}  # fmt: skip
    if qm.dim() == 3:  # [N, S, D]: a batch of one with N heads
        unsqueeze = (("unsqueeze", (0,)),)
        return {**fields, "q_ops": unsqueeze, "k_ops": unsqueeze, "v_ops": unsqueeze,
                "out_ops": (("squeeze", (0,)),), "heads": (hq, hkv)}  # fmt: skip
    rk, rv = unrepeat(a["key"]), unrepeat(a["value"])
    if rk is not None and rv is not None and eq(rk[1], rv[1]):
        (fields["k"], hkv), (fields["v"], _) = rk, rv
    return {**fields, "heads": (hq, hkv)}


def _masks(a: dict, qm: torch.Tensor, km: torch.Tensor) -> dict:
    """The attn_mask as an additive term or a boolean mask, its causal part (if static) as the flag."""
    sq, sk, lead = qm.shape[-2], km.shape[-2], tuple(qm.shape[:-2])
    masks, terms, attn_mask = [], [], a["attn_mask"]
    if attn_mask is not None:
        mm = tensor_meta(attn_mask)
        if mm is None:
            raise Miss("attn_mask has no recorded dtype")
        if mm.dim() > qm.dim():
            raise Miss(f"attn_mask of rank {mm.dim()} does not broadcast to q's rank {qm.dim()}")
        if mm.dtype.is_floating_point:
            terms.append((attn_mask, 1.0, (), lead))
        else:
            masks.append((attn_mask, True, float("-inf"), lead))
    causal = CAUSAL_TOP_LEFT if a["is_causal"] else CAUSAL_NONE
    if not a["is_causal"]:
        causal, masks, terms = split_causal(masks, terms, sq, sk)
    cb = lead if qm.dim() == 4 else (1, lead[0]) if qm.dim() == 3 else (prod(lead[:-1]), lead[-1])
    try:
        additive = [Term(n, f, s, term_ops(n, ctx, cb)) for n, f, s, ctx in terms]
        bool_masks = [BoolMask(n, at, fill, term_ops(n, ctx, cb)) for n, at, fill, ctx in masks]
    except LayoutError as exc:
        raise Miss(f"attn_mask layout not understood: {exc}") from None
    return {"causal": causal, "additive": additive, "bool_masks": bool_masks}


def match(node: Node, dag: nx.DiGraph | None = None) -> AttentionMatch:
    """The :class:`AttentionMatch` of an SDPA call; a :class:`Miss` with the reason when it cannot be taken."""
    a = _arguments(node)
    qm, km, vm = tensor_meta(a["query"]), tensor_meta(a["key"]), tensor_meta(a["value"])
    operands = _operands(a, qm, km)
    hq, hkv = operands.pop("heads")
    masks = _masks(a, qm, km)
    info = {
        "heads": (as_int(hq), as_int(hkv)),
        "head_dims": (as_int(qm.shape[-1]), as_int(vm.shape[-1])),
        "seq": (as_int(qm.shape[-2]), as_int(km.shape[-2])),
        "batch": as_int(prod(qm.shape[:-3])) if qm.dim() >= 4 else None,
        "layout": _layout_name(qm),
    }
    return AttentionMatch(kind="sdpa", output=node, dropout_p=float(a["dropout_p"]), info=info, **operands,
                          **_scale(a), **masks)  # fmt: skip


def _layout_name(qm: torch.Tensor) -> str:
    if qm.dim() == 3:
        return "(B*H)SD"
    if qm.dim() > 4:
        return f"BHSD with {qm.dim() - 3} batch dims folded"
    return "BSHD" if seq_major(qm) else "BHSD"
