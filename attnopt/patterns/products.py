"""The two products of hand-written attention: the scores ``q @ kᵀ`` and the output ``probs @ v``.

Each is a ``matmul``/``bmm`` (``baddbmm`` for the scores) or a two-operand ``einsum``; reading one gives
the operands as written and the view programs (:mod:`attnopt.patterns.layout`) taking them to the
product's batch dims followed by ``[S, D]``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, NamedTuple

from torch.fx import Node

from attnopt.patterns.canonical import (BADDBMM, CAST, DROPOUT, EINSUM, MATMUL, PERMUTE, RESHAPE, TRANSPOSE, Op,
                                        classify, shape, tensor_meta)  # fmt: skip
from attnopt.patterns.layout import permutation_ops
from attnopt.patterns.match import Miss
from attnopt.patterns.operands import MAX_DEPTH, describe, same_shape, shape_of

def einsum_letters(eq_: str, ranks: list[int]) -> tuple[list[str], str] | None:
    """The operands' letters and the output's of an einsum equation, ``...`` spelt out in spare letters."""
    if "->" in eq_:
        lhs, rhs = eq_.split("->")
    else:
        lhs, rhs = eq_, None
    ins = lhs.split(",")
    if len(ins) != len(ranks):
        return None
    used = set(eq_) - set(".,->")
    spare = [c for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZ" if c not in used]
    n_ell = 0
    for s, r in zip(ins, ranks):
        if "..." in s:
            n_ell = max(n_ell, r - (len(s) - 3))
    ell = "".join(spare[:n_ell])
    out_ins = []
    for s, r in zip(ins, ranks):
        if "..." in s:
            k = r - (len(s) - 3)
            s = s.replace("...", ell[len(ell) - k:] if k else "")
        if len(s) != r or len(set(s)) != len(s):
            return None
        out_ins.append(s)
    if rhs is None:
        counts = {}
        for s in out_ins:
            for c in s:
                counts[c] = counts.get(c, 0) + 1
        rhs = ell + "".join(sorted(c for c, n in counts.items() if n == 1 and c not in ell))
    else:
        rhs = rhs.replace("...", ell)
    if len(set(rhs)) != len(rhs):
        return None
    return out_ins, rhs


def letter_ops(src: str, batch: str, tail: str) -> tuple:
    """Ops taking an operand with letters ``src`` to ``batch + tail`` (missing batch letters become 1s)."""
    present = [c for c in batch if c in src] + list(tail)
    ops = permutation_ops([src.index(c) for c in present])
    for i, c in enumerate(batch):
        if c not in src:
            ops = ops + (("unsqueeze", (i,)),)
    return ops


@dataclass(frozen=True)
class Operands:
    """q, k and v of a site as written, with the view programs to the products' layouts."""

    q: Any
    k: Any
    v: Any
    q_ops: tuple = ()
    k_ops: tuple = ()
    v_ops: tuple = ()
    k_transposed: bool = False
    out_ops: tuple = ()  # after the regrouping to the output's lead (einsum output permutation)
    score_lead: tuple = ()
    out_lead: tuple = ()  # lead of the probabilities at the @ V (the output's lead before out_ops)
    layout: str = ""


def _qk_einsum(product: Node, op: Op) -> dict:
    if len(op.inputs) != 2:
        raise Miss(f"{describe(product)} is an einsum of {len(op.inputs)} operands")
    a, b = op.inputs
    parsed = einsum_letters(op.attrs["equation"], [len(shape_of(a)), len(shape_of(b))])
    if parsed is None:
        raise Miss(f"einsum equation {op.attrs['equation']!r} is not understood")
    (la, lb), lc = parsed
    if len(lc) < 2:
        raise Miss(f"einsum {op.attrs['equation']!r} does not produce [.., q, k] scores")
    ql, kl = lc[-2], lc[-1]
    if kl in la and ql in lb:
        a, b, la, lb = b, a, lb, la
    contracted = [c for c in la if c in lb and c not in lc]
    batch = lc[:-2]
    if (ql not in la or ql in lb or kl not in lb or kl in la or len(contracted) != 1
            or any(c not in la for c in batch)
            or any(c not in lc and c not in contracted for c in la + lb)):  # fmt: skip
        raise Miss(f"einsum {op.attrs['equation']!r} is not a q·k product over one head dim")
    d = contracted[0]
    return {"q": a, "q_ops": letter_ops(la, batch, ql + d), "k": b, "k_ops": letter_ops(lb, batch, kl + d),
            "layout": "einsum " + op.attrs["equation"]}  # fmt: skip


def _qk_matmul(product: Node, op: Op) -> dict:
    q, kt = (op.inputs[1], op.inputs[2]) if op.kind == BADDBMM else op.inputs
    if tensor_meta(q) is None or tensor_meta(kt) is None:
        raise Miss(f"the operands of {describe(product)} have no recorded shape")
    if len(shape_of(q)) < 2 or len(shape_of(kt)) < 2:
        raise Miss(f"{describe(product)} multiplies vectors")
    t = classify(kt)
    if t is not None and t.kind == TRANSPOSE:
        return {"q": q, "k": t.inputs[0]}
    if t is not None and t.kind == PERMUTE:
        dims = list(t.attrs["dims"])
        return {"q": q, "k": t.inputs[0], "k_ops": permutation_ops(dims[:-2] + [dims[-1], dims[-2]])}
    return {"q": q, "k": kt, "k_transposed": True}


# How q and k are read off each kind of scores product (the kinds of attnopt.patterns.scores.PRODUCTS).
QK_READERS: dict[str, Callable[[Node, Op], dict]] = {EINSUM: _qk_einsum, MATMUL: _qk_matmul, BADDBMM: _qk_matmul}


def qk_operands(product: Node) -> dict:
    """The :class:`Operands` fields read off the scores product: q, k and the scores' lead."""
    op = classify(product)
    return {**QK_READERS[op.kind](product, op), "score_lead": shape_of(product)[:-2]}


class PV(NamedTuple):
    """The ``@ V`` product of a softmax: the product, the node feeding it, the dropout p, and whether the
    probabilities reach it transposed (``v @ pᵀ``: values on the left, channels-first output)."""

    pv: Node
    probs: Node
    dropout_p: float
    transposed: bool


def _pv_of(user: Node, op: Op, n: Node, transposed: bool) -> bool:
    """Whether ``user`` is the ``@ V`` product of ``n``: ``p @ v``, ``v @ pᵀ``, or a two-operand einsum."""
    if op.kind == MATMUL:
        return op.inputs[1 if transposed else 0] is n and op.inputs[0] is not op.inputs[1]
    return op.kind == EINSUM and len(op.inputs) == 2 and n in op.inputs and op.inputs[0] is not op.inputs[1]


def find_pv(softmax: Node) -> PV:
    """The ``probs @ v`` product reached from ``softmax`` through casts, dropout, views and one swap of the
    last two dims (``v @ probs.transpose(-2, -1)``)."""
    frontier, dropout_p = [(softmax, False)], 0.0
    for _ in range(MAX_DEPTH):
        nxt = []
        for n, transposed in frontier:
            for user in n.users:
                op = classify(user)
                if op is None or not op.inputs:
                    continue
                if _pv_of(user, op, n, transposed):
                    return PV(user, n, dropout_p, transposed)
                if op.kind == TRANSPOSE and op.inputs[0] is n and not transposed:
                    nxt.append((user, True))
                if op.kind in (CAST, DROPOUT, RESHAPE) and op.inputs[0] is n:
                    if op.kind == RESHAPE:
                        a, b = shape(n), shape(user)
                        if a is None or b is None or len(a) < 2 or len(b) < 2 or not same_shape(a[-2:], b[-2:]):
                            continue
                    if op.kind == DROPOUT and op.attrs.get("p", 0.0):
                        if dropout_p:
                            raise Miss("two dropouts on the probabilities")
                        dropout_p = float(op.attrs["p"])
                    nxt.append((user, transposed))
        if not nxt:
            break
        frontier = nxt
    users = ", ".join(describe(u) for u in softmax.users) or "nothing"
    raise Miss(f"the probabilities are not multiplied by V (softmax feeds {users})")


def _swap_last(rank: int) -> tuple:
    return permutation_ops(list(range(rank - 2)) + [rank - 1, rank - 2])


def _pv_einsum(pv: Node, op: Op, probs: Node, ps: tuple, transposed: bool) -> dict:
    i = op.inputs.index(probs)
    v = op.inputs[1 - i]
    parsed = einsum_letters(op.attrs["equation"], [len(shape_of(x)) for x in op.inputs])
    if parsed is None:
        raise Miss(f"einsum equation {op.attrs['equation']!r} is not understood")
    ins, lo = parsed
    lp, lv = ins[i], ins[1 - i]
    ql, kl, batch = (lp[-1], lp[-2], lp[:-2]) if transposed else (lp[-2], lp[-1], lp[:-2])
    ds = [c for c in lv if c in lo and c not in lp]
    if (kl not in lv or kl in lo or len(ds) != 1 or ql not in lo or any(c not in lo for c in batch)
            or any(c not in batch + kl + ds[0] for c in lv) or len(lo) != len(batch) + 2):  # fmt: skip
        raise Miss(f"einsum {op.attrs['equation']!r} is not probabilities times V")
    canon = batch + ql + ds[0]
    return {"v": v, "v_ops": letter_ops(lv, batch, kl + ds[0]),
            "out_ops": permutation_ops([canon.index(c) for c in lo])}  # fmt: skip


def _pv_matmul(pv: Node, op: Op, probs: Node, ps: tuple, transposed: bool) -> dict:
    v = op.inputs[0 if transposed else 1]
    vs = shape_of(v)
    if len(vs) < 2 or len(vs) > len(ps):
        raise Miss(f"V of shape {vs} does not fit probabilities of shape {ps}")
    if not same_shape(shape_of(pv)[:-2], ps[:-2]):
        raise Miss(f"V of shape {vs} broadcasts the probabilities of shape {ps}")
    if transposed:  # v [.., Dv, Sk] @ pᵀ: out [.., Dv, Sq] is (p @ vᵀ)ᵀ, contiguous as matmul writes it
        return {"v": v, "v_ops": _swap_last(len(vs)), "out_ops": _swap_last(len(ps)) + (("contiguous", ()),)}
    return {"v": v}


# How v is read off each kind of ``probs @ v`` product (the kinds find_pv stops at).
PV_READERS: dict[str, Callable[[Node, Op, Node, tuple, bool], dict]] = {EINSUM: _pv_einsum, MATMUL: _pv_matmul}


def pv_operands(found: PV) -> dict:
    """The :class:`Operands` fields read off the ``probs @ v`` product: v, the output's lead and permutation."""
    op, ps = classify(found.pv), shape_of(found.probs)
    if found.transposed:
        ps = ps[:-2] + (ps[-1], ps[-2])
    return {"out_lead": ps[:-2], **PV_READERS[op.kind](found.pv, op, found.probs, ps, found.transposed)}
