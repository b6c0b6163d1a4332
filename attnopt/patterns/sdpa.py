"""``F.scaled_dot_product_attention`` calls, with every argument SDPA takes."""

from __future__ import annotations

import inspect

from torch.fx import Node

from attnopt.kernels.exact.reference import CAUSAL_NONE, CAUSAL_TOP_LEFT
from attnopt.patterns import canonical as C
from attnopt.patterns.match import AttentionMatch, BoolMask

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
    op = C.classify(node)
    if op is None or op.kind != C.SDPA:
        return None
    try:
        bound = _SIGNATURE.bind(*node.args, **node.kwargs)
    except TypeError as exc:
        return f"unrecognized scaled_dot_product_attention arguments: {exc}"
    bound.apply_defaults()
    a = bound.arguments
    q, k, v, attn_mask = a["query"], a["key"], a["value"], a["attn_mask"]
    qm, km = C.tensor_meta(q), C.tensor_meta(k)
    if qm is None or km is None:
        return "q/k have no recorded shape"
    if qm.dim() not in (3, 4) or km.dim() != qm.dim():
        return f"q/k of rank {qm.dim()}/{km.dim()}; only 3-D and 4-D layouts are rewritten"
    if qm.dim() == 4 and (qm.shape[0] != km.shape[0] or qm.shape[1] % km.shape[1] != 0):
        return f"q batch/heads {tuple(qm.shape[:2])} incompatible with k {tuple(km.shape[:2])}"
    if qm.dim() == 3 and qm.shape[0] != km.shape[0]:
        return f"q batch {qm.shape[0]} differs from k batch {km.shape[0]}"
    if not isinstance(a["is_causal"], bool) or not isinstance(a["dropout_p"], (int, float)):
        return "is_causal/dropout_p are not constants in the graph"
    if a["scale"] is not None and not isinstance(a["scale"], (int, float)):
        return "scale is not a constant in the graph"
    m = AttentionMatch(
        kind="sdpa",
        output=node,
        q=q,
        k=k,
        v=v,
        scale=a["scale"],
        causal=CAUSAL_TOP_LEFT if a["is_causal"] else CAUSAL_NONE,
        dropout_p=float(a["dropout_p"]),
    )
    if attn_mask is not None:
        mm = C.tensor_meta(attn_mask)
        if mm is None:
            return "attn_mask has no recorded dtype"
        if mm.dtype.is_floating_point:
            m.additive.append((attn_mask, 1.0))
        else:
            m.bool_masks.append(BoolMask(attn_mask, attend_when=True))
    return m


