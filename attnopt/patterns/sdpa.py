"""``F.scaled_dot_product_attention`` calls, with every argument SDPA takes.

Keys and values repeated per query head (``repeat_kv``, ``repeat_interleave``) are read through, so
the rewrite uses native GQA; a boolean mask built in the graph from a causal pattern (and padding)
loses its causal part to the kernel's causal flag.
"""

from __future__ import annotations

import inspect

from torch.fx import Node

from attnopt.kernels.exact.reference import CAUSAL_NONE, CAUSAL_TOP_LEFT
from attnopt.patterns import canonical as C
from attnopt.patterns.layout import LayoutError, eq, hint
from attnopt.patterns.match import AttentionMatch, BoolMask, ScalarExpr, Term

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


def match(node: Node) -> AttentionMatch | str | None:
    """An :class:`AttentionMatch` for an SDPA call, a reason string when it cannot be taken, else None."""
    from attnopt.patterns import manual  # the shared canonicalization helpers

    a = C.bind_call(node, C.SDPA, _SIGNATURE, "scaled_dot_product_attention")
    if not isinstance(a, dict):
        return a
    q, k, v, attn_mask = a["query"], a["key"], a["value"], a["attn_mask"]
    qm, km, vm = C.tensor_meta(q), C.tensor_meta(k), C.tensor_meta(v)
    if qm is None or km is None or vm is None:
        return "q/k/v have no recorded shape"
    if qm.dim() not in (3, 4) or km.dim() != qm.dim() or vm.dim() != qm.dim():
        return f"q/k of rank {qm.dim()}/{km.dim()}; only 3-D and 4-D layouts are rewritten"
    if qm.dim() == 4 and (not eq(qm.shape[0], km.shape[0]) or hint(qm.shape[1]) % hint(km.shape[1]) != 0):
        return f"q batch/heads {tuple(qm.shape[:2])} incompatible with k {tuple(km.shape[:2])}"
    if qm.dim() == 3 and not eq(qm.shape[0], km.shape[0]):
        return f"q batch {qm.shape[0]} differs from k batch {km.shape[0]}"
    if not isinstance(a["is_causal"], bool) or not isinstance(a["dropout_p"], (int, float)):
        return "is_causal/dropout_p are not constants in the graph"
    scale_expr = None
    if C.is_symbolic_scalar(a["scale"]):  # a float dynamo made a graph input
        scale_expr = ScalarExpr(1.0, ((a["scale"], 1),))
    elif a["scale"] is not None and not isinstance(a["scale"], (int, float)):
        return "scale is not a number in the graph"
    m = AttentionMatch(
        kind="sdpa",
        output=node,
        q=q,
        k=k,
        v=v,
        scale=scale_expr.value if scale_expr is not None else a["scale"],
        scale_expr=scale_expr,
        causal=CAUSAL_TOP_LEFT if a["is_causal"] else CAUSAL_NONE,
        dropout_p=float(a["dropout_p"]),
    )
    hq, hkv = (qm.shape[1], km.shape[1]) if qm.dim() == 4 else (qm.shape[0], km.shape[0])
    if qm.dim() == 3:  # [N, S, D]: a batch of one with N heads
        m.q_ops = m.k_ops = m.v_ops = (("unsqueeze", (0,)),)
        m.out_ops = (("squeeze", (0,)),)
    else:
        rk, rv = manual.unrepeat(k), manual.unrepeat(v)
        if rk is not None and rv is not None and eq(rk[1], rv[1]):
            (m.k, hkv), (m.v, _) = rk, rv
    sq, sk = qm.shape[-2], km.shape[-2]
    lead = tuple(qm.shape[:-2])
    masks, terms = [], []
    if attn_mask is not None:
        mm = C.tensor_meta(attn_mask)
        if mm is None:
            return "attn_mask has no recorded dtype"
        if mm.dim() > qm.dim():
            return f"attn_mask of rank {mm.dim()} does not broadcast to q's rank {qm.dim()}"
        if mm.dtype.is_floating_point:
            terms.append((attn_mask, 1.0, (), lead))
        else:
            masks.append((attn_mask, True, float("-inf"), lead))
    if not a["is_causal"]:
        m.causal, masks, terms = manual.split_causal(masks, terms, sq, sk)
    cb = lead if qm.dim() == 4 else (1, lead[0])
    try:
        m.additive = [Term(n, f, s, manual.term_ops(n, ctx, cb)) for n, f, s, ctx in terms]
        m.bool_masks = [BoolMask(n, at, fill, manual.term_ops(n, ctx, cb)) for n, at, fill, ctx in masks]
    except LayoutError as exc:
        return f"attn_mask layout not understood: {exc}"
    stored_seq_major = manual.seq_major(qm)
    m.info = {
        "heads": (manual.as_int(hq), manual.as_int(hkv)),
        "head_dims": (manual.as_int(qm.shape[-1]), manual.as_int(vm.shape[-1])),
        "seq": (manual.as_int(sq), manual.as_int(sk)),
        "batch": manual.as_int(qm.shape[0]) if qm.dim() == 4 else None,
        "layout": "(B*H)SD" if qm.dim() == 3 else ("BSHD" if stored_seq_major else "BHSD"),
    }
    return m
