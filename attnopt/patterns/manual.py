"""Attention written by hand: ``softmax(scale * q @ kᵀ [+ mask]) @ v`` in any spelling.

Matching starts from each softmax and reads the graph through the canonical vocabulary of
:mod:`attnopt.patterns.canonical`:

* forward, through casts and dropout, to the matmul that multiplies the probabilities by V;
* backward, through casts, scalar multiplications and divisions (folded into one scale), additive
  terms (a float mask or bias; a constant is dropped, softmax being shift-invariant), and
  ``masked_fill``/``where`` with a large negative fill (boolean masks), to the ``q @ kᵀ`` matmul.

An additive term met below a scaling is multiplied by that scaling, so ``(q @ kᵀ + b) / s`` becomes
scale ``1/s`` and term ``b/s``: the match is the function, not the op order. Escape analysis then
checks that nothing but the ``@ V`` consumes the scores or probabilities.
"""

from __future__ import annotations

import math

import networkx as nx
from torch.fx import Node

from attnopt.patterns import canonical as C
from attnopt.patterns.match import AttentionMatch, BoolMask

_MAX_DEPTH = 64
_PASS_THROUGH = {C.CAST, C.MUL, C.DIV, C.ADD, C.MASKED_FILL, C.WHERE}


class Miss(Exception):
    """A softmax that is not an attention site we can rewrite; the message is the reason."""


def _describe(x) -> str:
    if not isinstance(x, Node):
        return f"constant {x!r}"
    target = x.target if x.op == "call_method" else getattr(x.target, "__name__", str(x.target))
    return f"{x.name} ({x.op} {target})"


def _leads_to_matmul(x, depth: int = 0) -> bool:
    """True when ``x`` is a matmul, possibly under score-canonical ops (casts, scaling, masks)."""
    op = C.classify(x)
    if op is None or depth > _MAX_DEPTH:
        return False
    if op.kind == C.MATMUL:
        return True
    if op.kind not in _PASS_THROUGH:
        return False
    if op.kind == C.WHERE:
        return any(_leads_to_matmul(a, depth + 1) for a in op.inputs[1:])
    if op.kind == C.MASKED_FILL:
        return _leads_to_matmul(op.inputs[0], depth + 1)
    return any(_leads_to_matmul(a, depth + 1) for a in op.inputs)


def _fold_scalar(x, scale: float) -> tuple:
    """Fold a single-use ``x * c`` / ``x / c`` into ``scale``; returns (operand, scale)."""
    op = C.classify(x)
    if op is None or op.kind not in (C.MUL, C.DIV) or len(x.users) != 1:
        return x, scale
    a, b = op.inputs
    cb, ca = C.scalar_value(b), C.scalar_value(a)
    if op.kind == C.MUL and cb is not None:
        return a, scale * cb
    if op.kind == C.MUL and ca is not None:
        return b, scale * ca
    if op.kind == C.DIV and cb is not None and cb != 0:
        return a, scale / cb
    return x, scale


def _walk_scores(x, m: AttentionMatch) -> Node:
    """Reads the score expression below the softmax into ``m``; returns the ``q @ kᵀ`` node."""
    factor = 1.0  # product of the scalings met so far, i.e. applied after the current node
    for _ in range(_MAX_DEPTH):
        op = C.classify(x)
        if op is None:
            raise Miss(f"scores come from {_describe(x)}, not from q @ kᵀ")
        if op.kind == C.MATMUL:
            m.scale = factor
            return x
        if op.kind == C.CAST:
            x = op.inputs[0]
        elif op.kind in (C.MUL, C.DIV):
            a, b = op.inputs
            cb, ca = C.scalar_value(b), C.scalar_value(a)
            if cb is not None:
                factor = factor * cb if op.kind == C.MUL else factor / cb
                x = a
            elif ca is not None and op.kind == C.MUL:
                factor, x = factor * ca, b
            else:
                raise Miss(f"scores are scaled by a tensor ({_describe(b)})")
        elif op.kind == C.ADD:
            a, b = op.inputs
            if C.scalar_value(b) is not None or C.scalar_value(a) is not None:
                x = a if C.scalar_value(b) is not None else b
                continue
            la, lb = _leads_to_matmul(a), _leads_to_matmul(b)
            if la == lb:
                raise Miss(f"cannot tell the scores from the added term in {_describe(x)}")
            x, term = (a, b) if la else (b, a)
            m.additive.append((term, factor))
        elif op.kind == C.MASKED_FILL:
            base, cond, value = op.inputs
            if not C.is_large_negative(value):
                raise Miss(f"masked_fill with {value!r} is not a mask")
            m.bool_masks.append(BoolMask(cond, attend_when=False, fill=float(value) * factor))
            x = base
        elif op.kind == C.WHERE:
            cond, a, b = op.inputs
            if C.is_large_negative(b) and _leads_to_matmul(a):
                m.bool_masks.append(BoolMask(cond, attend_when=True, fill=float(b) * factor))
                x = a
            elif C.is_large_negative(a) and _leads_to_matmul(b):
                m.bool_masks.append(BoolMask(cond, attend_when=False, fill=float(a) * factor))
                x = b
            else:
                raise Miss(f"{_describe(x)} selects between values that are not scores and a mask fill")
        else:
            raise Miss(f"scores pass through {_describe(x)}")
    raise Miss("score expression too deep")


def _find_pv(softmax: Node) -> tuple[Node, float]:
    """The ``probs @ v`` matmul reached from ``softmax`` through casts and dropout, and the dropout p."""
    frontier, dropout_p = [softmax], 0.0
    for _ in range(_MAX_DEPTH):
        nxt = []
        for n in frontier:
            for user in n.users:
                op = C.classify(user)
                if op is None:
                    continue
                if op.kind == C.MATMUL and op.inputs[0] is n:
                    return user, dropout_p
                if op.kind in (C.CAST, C.DROPOUT) and op.inputs[0] is n:
                    dropout_p = max(dropout_p, float(op.attrs.get("p", 0.0))) if op.kind == C.DROPOUT else dropout_p
                    nxt.append(user)
        if not nxt:
            break
        frontier = nxt
    users = ", ".join(_describe(u) for u in softmax.users) or "nothing"
    raise Miss(f"the probabilities are not multiplied by V (softmax feeds {users})")


def _check_shapes(q, k_t, v) -> None:
    qm, km, vm = C.tensor_meta(q), C.tensor_meta(k_t), C.tensor_meta(v)
    if qm is None or km is None or vm is None:
        raise Miss("q, k or v has no recorded shape")
    if qm.dim() not in (3, 4) or km.dim() != qm.dim() or vm.dim() != qm.dim():
        raise Miss(f"q/k/v of rank {qm.dim()}/{km.dim()}/{vm.dim()}; only 3-D and 4-D layouts are rewritten")
    if qm.dim() == 4:
        if not (qm.shape[0] == km.shape[0] == vm.shape[0]) or km.shape[1] != vm.shape[1] or qm.shape[1] % km.shape[1]:
            raise Miss(f"q {tuple(qm.shape)}, kᵀ {tuple(km.shape)}, v {tuple(vm.shape)} do not share batch and heads")
    elif not (qm.shape[0] == km.shape[0] == vm.shape[0]):
        raise Miss(f"q {tuple(qm.shape)}, kᵀ {tuple(km.shape)}, v {tuple(vm.shape)} do not share the batch")


def match(softmax: Node, dag: nx.DiGraph) -> AttentionMatch | None:
    """The attention site whose softmax is ``softmax``; raises :class:`Miss` with the reason if none.

    ``dag`` is the graph's data-flow DAG (nodes -> users), used for escape analysis.
    """
    op = C.classify(softmax)
    if op is None or op.kind != C.SOFTMAX:
        return None
    rank, dim = op.attrs["rank"], op.attrs["dim"]
    if rank is None or dim != rank - 1:
        raise Miss(f"softmax over dim {dim} of a rank-{rank} tensor, not over the keys (last dim)")
    pv, dropout_p = _find_pv(softmax)
    v = pv.args[1] if len(pv.args) > 1 else None
    m = AttentionMatch(kind="manual", output=pv, q=None, k=None, v=v, dropout_p=dropout_p)
    qk = _walk_scores(C.classify(softmax).inputs[0], m)
    q_raw, k_t = C.classify(qk).inputs
    _check_shapes(q_raw, k_t, v)
    m.q, scale = _fold_scalar(q_raw, m.scale)
    k_t, scale = _fold_scalar(k_t, scale)
    t_op = C.classify(k_t)
    if t_op is not None and t_op.kind == C.TRANSPOSE:
        m.k, scale = _fold_scalar(t_op.inputs[0], scale)
        m.k_transposed = False
    else:
        m.k, m.k_transposed = k_t, True
    m.scale = scale

    region = (nx.descendants(dag, qk) & nx.ancestors(dag, pv)) | {qk}
    for operand in m.operands():
        if operand in region or operand is pv:
            raise Miss(f"{_describe(operand)} feeds the attention and depends on its scores")
    for n in region:
        outside = [u for u in n.users if u not in region and u is not pv]
        if outside:
            m.escape = (
                f"the {'probabilities' if n is softmax or nx.has_path(dag, softmax, n) else 'scores'} "
                f"({n.name}) are also used by {_describe(outside[0])}"
            )
            break
    m.interior = region
    if not math.isfinite(m.scale):
        raise Miss(f"scale {m.scale} is not finite")
    return m
