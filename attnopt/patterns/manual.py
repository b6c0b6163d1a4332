"""Attention written by hand: ``softmax(scale * q @ kᵀ + bias + mask) @ v`` in any spelling and layout.

Matching starts from each softmax and reads the graph through the canonical vocabulary of
:mod:`attnopt.patterns.canonical`:

* forward, through casts, dropout and views that regroup the leading dims, to the ``@ V`` product
  (``matmul``, ``bmm`` or ``einsum``);
* backward, through casts and views, scalings (constants, Python-number nodes such as
  ``q.size(-1) ** -0.5``, tensors broadcast along the keys), additive terms (float masks, relative
  position biases, ALiBi; a row-constant term is dropped, softmax being shift-invariant),
  ``masked_fill``/``where`` with a large negative fill (boolean masks) and a softcap
  ``cap * tanh(s / cap)``, to the scores product (``matmul``, ``bmm``, ``baddbmm`` or ``einsum``).

A term met below a scaling is multiplied by it, so ``(q @ kᵀ + b) / s`` is scale ``1/s`` and term
``b/s``: the match is the function, not the op order. Layouts ([B, H, S, D], [B, S, H, D] through
einsum, merged [B*H, S, D], grouped [B, Hkv, G, S, D]) become view programs to the canonical
[B, H, S, D]; ``repeat_kv``-style repeats of k and v are read through (native GQA), a static causal
mask becomes the kernel's causal flag, and escape analysis checks that nothing but the ``@ V``
consumes the scores or probabilities.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import networkx as nx
import torch
from torch.fx import Node

from attnopt.kernels.exact.reference import CAUSAL_NONE
from attnopt.patterns import canonical as C
from attnopt.patterns import causal as K
from attnopt.patterns.layout import LayoutError, convert, eq, hint, is_one, permutation_ops, prod
from attnopt.patterns.match import AttentionMatch, BoolMask, ScalarExpr, SizeOf, Term, op_supports_softcap

_MAX_DEPTH = 64
_SCORE_PATH = {C.CAST, C.MUL, C.DIV, C.ADD, C.SUB, C.NEG, C.MASKED_FILL, C.WHERE, C.RESHAPE, C.TANH, C.CLAMP_MIN}
_PRODUCTS = {C.MATMUL, C.EINSUM, C.BADDBMM}


class Miss(Exception):
    """A softmax that is not an attention site we can rewrite; the message is the reason."""


def _describe(x) -> str:
    if not isinstance(x, Node):
        return f"constant {x!r}"
    target = x.target if x.op in ("call_method", "call_module") else getattr(x.target, "__name__", str(x.target))
    return f"{x.name} ({x.op} {target})"


def _shape(x) -> tuple:
    s = C.shape(x)
    if s is None:
        raise Miss(f"{_describe(x)} has no recorded shape")
    return s


def _same_shape(a: tuple, b: tuple) -> bool:
    return len(a) == len(b) and all(eq(x, y) for x, y in zip(a, b))


def _distance_to_product(x, _memo: dict | None = None, _depth: int = 0) -> int | None:
    """How many score-path ops lie between ``x`` and a scores product (None: none is reached).

    Memoized per call: a bias computed by a DAG of adds and multiplies is visited once per node.
    """
    memo = {} if _memo is None else _memo
    if not isinstance(x, Node) or _depth > _MAX_DEPTH:
        return None
    if x in memo:
        return memo[x]
    memo[x] = None  # a cycle cannot occur in a DAG; this also bounds revisits
    op = C.classify(x)
    if op is None:
        return None
    if op.kind in _PRODUCTS:
        memo[x] = 0 if op.kind != C.EINSUM or len(op.inputs) == 2 else None
        return memo[x]
    if op.kind not in _SCORE_PATH:
        return None
    if op.kind == C.WHERE:
        cands = op.inputs[1:]
    elif op.kind in (C.MASKED_FILL, C.RESHAPE, C.CAST, C.TANH, C.NEG, C.CLAMP_MIN):
        cands = op.inputs[:1]
    else:
        cands = op.inputs
    found = [d for d in (_distance_to_product(a, memo, _depth + 1) for a in cands) if d is not None]
    memo[x] = 1 + min(found) if found else None
    return memo[x]


def _broadcasts_along_keys(t, scores_shape: tuple) -> bool:
    """A tensor whose broadcast to the scores changes nothing along the keys (last dim 1, or 0-d)."""
    s = C.shape(t)
    if s is None or len(s) > len(scores_shape):
        return False
    return len(s) == 0 or is_one(s[-1])


def _layout_free(t) -> bool:
    """A tensor that broadcasts the same way in every layout of the scores (no leading dim above 1)."""
    s = C.shape(t)
    return s is None or all(is_one(d) for d in s[:-2])


def _broadcasts_into(t, scores_shape: tuple) -> bool:
    s = C.shape(t)
    if s is None:
        return C.scalar_value(t) is not None
    if len(s) > len(scores_shape):
        return False
    return all(is_one(a) or eq(a, b) for a, b in zip(reversed(s), reversed(scores_shape)))


@dataclass
class _Scores:
    """The score expression read from the softmax down to the scores product."""

    product: Node | None = None
    terms: list = field(default_factory=list)  # (node, factor, scalars, ctx lead)
    masks: list = field(default_factory=list)  # (node, attend_when, fill, ctx lead)
    factor: float = 1.0
    scalars: list = field(default_factory=list)  # (node, power, ctx lead): numbers and tensors
    softcap: ScalarExpr | None = None
    inplace: set = field(default_factory=set)


def _fill_of(x) -> float | None:
    v = K.scalar_fill(x)
    return v if v is not None and (v == -math.inf or v <= -1e4) else None


def _walk_scores(x) -> _Scores:
    """Reads the score expression below the softmax; raises :class:`Miss` when it is not one."""
    st = _Scores()
    for _ in range(_MAX_DEPTH):
        op = C.classify(x)
        if op is None:
            raise Miss(f"scores come from {_describe(x)}, not from q @ kᵀ")
        xs = _shape(x)
        lead = xs[:-2]
        if op.attrs.get("inplace"):
            target = op.inputs[0]
            if not isinstance(target, Node) or len(target.users) != 1:
                raise Miss(f"{_describe(x)} mutates scores that are also read elsewhere")
            st.inplace.add(x)
        if op.kind in _PRODUCTS:
            st.product = x
            if op.kind == C.BADDBMM:
                bias, beta, alpha = op.inputs[0], op.attrs["beta"], op.attrs["alpha"]
                for value in (beta, alpha):
                    if C.scalar_value(value) is None and not C.is_symbolic_scalar(value):
                        raise Miss(f"baddbmm with a beta/alpha that is not a number in {_describe(x)}")
                beta_c = C.scalar_value(beta)
                if beta_c != 0 and isinstance(bias, Node):  # beta * bias
                    if st.softcap is not None:
                        raise Miss(f"the baddbmm bias of {_describe(x)} is inside the softcap")
                    if any(ctx is not None and not _same_shape(ctx, lead) and not _layout_free(n)
                           for n, _, ctx in st.scalars):  # fmt: skip
                        raise Miss(f"the baddbmm bias of {_describe(x)} is scaled by a tensor in another layout")
                    scalars = tuple((n, p) for n, p, _ in st.scalars) + (((beta, 1),) if beta_c is None else ())
                    st.terms.append((bias, st.factor * (beta_c if beta_c is not None else 1.0), scalars, lead))
                if C.scalar_value(alpha) is not None:
                    st.factor *= float(alpha)
                else:
                    st.scalars.append((alpha, 1, None))
            return st
        if op.kind == C.CAST:
            x = op.inputs[0]
        elif op.kind == C.RESHAPE:
            src = op.inputs[0]
            ss = _shape(src)
            if len(ss) < 2 or not _same_shape(ss[-2:], xs[-2:]):
                raise Miss(f"{_describe(x)} reshapes the query/key dims of the scores")
            x = src
        elif op.kind == C.NEG:
            st.factor, x = -st.factor, op.inputs[0]
        elif op.kind == C.CLAMP_MIN:
            # max(s, c) with c a large negative constant only lifts masked scores to c: keys that stay
            # masked (HF's clamp to finfo.min after adding the mask).
            if _fill_of(op.inputs[1]) is None or st.softcap is not None:
                raise Miss(f"scores are clamped by {_describe(x)}")
            x = op.inputs[0]
        elif op.kind in (C.MUL, C.DIV):
            x = _scaling(op, x, xs, st)
        elif op.kind in (C.ADD, C.SUB):
            x = _additive(op, x, xs, st)
        elif op.kind == C.MASKED_FILL:
            base, cond, value = op.inputs
            fill = _fill_of(value)
            if fill is None:
                raise Miss(f"masked_fill with {value!r} is not a mask (not -inf or a large negative constant)")
            _check_mask_context(x, st, cond, xs)
            st.masks.append((cond, False, fill * st.factor, lead))
            x = base
        elif op.kind == C.WHERE:
            cond, a, b = op.inputs
            fa, fb = _fill_of(a), _fill_of(b)
            if fb is not None and _distance_to_product(a) is not None:
                _check_mask_context(x, st, cond, xs)
                st.masks.append((cond, True, fb * st.factor, lead))
                x = a
            elif fa is not None and _distance_to_product(b) is not None:
                _check_mask_context(x, st, cond, xs)
                st.masks.append((cond, False, fa * st.factor, lead))
                x = b
            else:
                raise Miss(f"{_describe(x)} selects between values that are not scores and a mask fill")
        elif op.kind == C.TANH:
            if st.softcap is not None:
                raise Miss(f"a second tanh in the scores ({_describe(x)})")
            if any(ctx is not None for _, _, ctx in st.scalars):
                raise Miss(f"the softcap of {_describe(x)} is scaled by a tensor")
            cap = ScalarExpr(st.factor, tuple((n, p) for n, p, _ in st.scalars))
            if not cap.value > 0:
                raise Miss(f"the softcap of {_describe(x)} has a non-positive cap {cap.value}")
            st.softcap, st.factor, st.scalars, x = cap, 1.0, [], op.inputs[0]
        else:
            raise Miss(f"scores pass through {_describe(x)}")
    raise Miss("score expression too deep")


def _check_mask_context(x, st: _Scores, cond, xs: tuple) -> None:
    if st.softcap is not None:
        raise Miss(f"{_describe(x)} masks scores inside the softcap (its fill would be capped)")
    if st.scalars:
        raise Miss(f"{_describe(x)} masks scores that are then scaled by a tensor or a graph value")
    if not st.factor > 0:
        raise Miss(f"{_describe(x)} masks scores that are then scaled by {st.factor}")
    if not _broadcasts_into(cond, xs):
        raise Miss(f"the mask of {_describe(x)} does not broadcast to the scores")


def _scaling(op, x, xs: tuple, st: _Scores):
    a, b = op.inputs
    ca, cb = C.scalar_value(a), C.scalar_value(b)
    if cb is not None:
        if op.kind == C.DIV and cb == 0:
            raise Miss(f"scores divided by zero in {_describe(x)}")
        st.factor = st.factor * cb if op.kind == C.MUL else st.factor / cb
        return a
    if ca is not None:
        if op.kind == C.DIV:
            raise Miss(f"{_describe(x)} divides a constant by the scores")
        st.factor *= ca
        return b
    da, db = _distance_to_product(a), _distance_to_product(b)
    if da is None and db is None:
        raise Miss(f"scores come from {_describe(x)}, a product of tensors that are not q @ kᵀ")
    if op.kind == C.DIV and da is None:
        raise Miss(f"{_describe(x)} divides by the scores")
    scores, other = (a, b) if (db is None or (da is not None and da <= db)) else (b, a)
    power = 1 if op.kind == C.MUL else -1
    if C.is_symbolic_scalar(other):
        st.scalars.append((other, power, None))
        return scores
    if _distance_to_product(other) is not None and other is not scores:
        raise Miss(f"{_describe(x)} multiplies two score-like products")
    if not _broadcasts_along_keys(other, xs) or not _same_shape(_shape(scores), xs):
        raise Miss(f"scores are scaled by a tensor that varies along the keys ({_describe(other)})")
    st.scalars.append((other, power, xs[:-2]))
    return scores


def _additive(op, x, xs: tuple, st: _Scores):
    a, b = op.inputs
    sub = op.kind == C.SUB
    if C.scalar_value(b) is not None or C.is_symbolic_scalar(b):
        if st.softcap is not None:
            raise Miss(f"{_describe(x)} adds a constant inside the softcap")
        return a  # softmax is shift-invariant
    if C.scalar_value(a) is not None or C.is_symbolic_scalar(a):
        if st.softcap is not None:
            raise Miss(f"{_describe(x)} adds a constant inside the softcap")
        st.factor = -st.factor if sub else st.factor
        return b
    da, db = _distance_to_product(a), _distance_to_product(b)
    if da is None and db is None:
        raise Miss(f"cannot tell the scores from the added term in {_describe(x)}: neither comes from q @ kᵀ")
    # The side nearer to a product, unless it is broadcast by the other (then it is the term).
    cands = sorted([(d, i) for i, d in enumerate((da, db)) if d is not None])
    cands = [i for _, i in cands if _same_shape(_shape((a, b)[i]), xs)]
    if not cands:
        raise Miss(f"the scores are broadcast by the term added in {_describe(x)}")
    if cands[0] == 0:
        scores, term, term_factor = a, b, (-st.factor if sub else st.factor)
    else:
        scores, term, term_factor = b, a, st.factor  # term - scores: the scores are negated
    if st.softcap is not None:
        raise Miss(f"{_describe(x)} adds a term inside the softcap, which the kernel applies before its mask")
    if not _broadcasts_into(term, xs):
        raise Miss(f"the term added in {_describe(x)} does not broadcast to the scores")
    if not _broadcasts_along_keys(term, xs):  # else a row constant (e.g. the row max): shift-invariant
        for n, _, ctx in st.scalars:
            if ctx is not None and not _same_shape(ctx, xs[:-2]) and not _layout_free(n):
                raise Miss(f"the term added in {_describe(x)} is scaled by a tensor in another layout")
        st.terms.append((term, term_factor, tuple((n, p) for n, p, _ in st.scalars), xs[:-2]))
    if sub and scores is b:
        st.factor = -st.factor
    return scores


# --------------------------------------------------------------------------------------------- products


def _einsum_letters(eq_: str, ranks: list[int]) -> tuple[list[str], str] | None:
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


def _letter_ops(src: str, batch: str, tail: str) -> tuple:
    """Ops taking an operand with letters ``src`` to ``batch + tail`` (missing batch letters become 1s)."""
    present = [c for c in batch if c in src] + list(tail)
    ops = permutation_ops([src.index(c) for c in present])
    for i, c in enumerate(batch):
        if c not in src:
            ops = ops + (("unsqueeze", (i,)),)
    return ops


@dataclass
class _Operands:
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


def _qk_operands(product: Node, ops: _Operands) -> None:
    op = C.classify(product)
    if op.kind == C.EINSUM:
        if len(op.inputs) != 2:
            raise Miss(f"{_describe(product)} is an einsum of {len(op.inputs)} operands")
        a, b = op.inputs
        parsed = _einsum_letters(op.attrs["equation"], [len(_shape(a)), len(_shape(b))])
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
        ops.q, ops.q_ops = a, _letter_ops(la, batch, ql + d)
        ops.k, ops.k_ops = b, _letter_ops(lb, batch, kl + d)
        ops.layout = "einsum " + op.attrs["equation"]
    else:
        q, kt = (op.inputs[1], op.inputs[2]) if op.kind == C.BADDBMM else op.inputs
        if C.tensor_meta(q) is None or C.tensor_meta(kt) is None:
            raise Miss(f"the operands of {_describe(product)} have no recorded shape")
        if len(_shape(q)) < 2 or len(_shape(kt)) < 2:
            raise Miss(f"{_describe(product)} multiplies vectors")
        ops.q = q
        t = C.classify(kt)
        if t is not None and t.kind == C.TRANSPOSE:
            ops.k = t.inputs[0]
        elif t is not None and t.kind == C.PERMUTE:
            dims = list(t.attrs["dims"])
            ops.k, ops.k_ops = t.inputs[0], permutation_ops(dims[:-2] + [dims[-1], dims[-2]])
        else:
            ops.k, ops.k_transposed = kt, True
    ops.score_lead = _shape(product)[:-2]


def _find_pv(softmax: Node) -> tuple[Node, Node, float]:
    """The ``probs @ v`` product reached from ``softmax`` through casts, dropout and views; the node
    feeding it; the dropout p."""
    frontier, dropout_p = [softmax], 0.0
    for _ in range(_MAX_DEPTH):
        nxt = []
        for n in frontier:
            for user in n.users:
                op = C.classify(user)
                if op is None:
                    continue
                if op.kind == C.MATMUL and op.inputs[0] is n:
                    return user, n, dropout_p
                if op.kind == C.EINSUM and len(op.inputs) == 2 and n in op.inputs and op.inputs[0] is not op.inputs[1]:
                    return user, n, dropout_p
                if op.kind in (C.CAST, C.DROPOUT, C.RESHAPE) and op.inputs[0] is n:
                    if op.kind == C.RESHAPE:
                        a, b = C.shape(n), C.shape(user)
                        if a is None or b is None or len(a) < 2 or len(b) < 2 or not _same_shape(a[-2:], b[-2:]):
                            continue
                    if op.kind == C.DROPOUT and op.attrs.get("p", 0.0):
                        if dropout_p:
                            raise Miss("two dropouts on the probabilities")
                        dropout_p = float(op.attrs["p"])
                    nxt.append(user)
        if not nxt:
            break
        frontier = nxt
    users = ", ".join(_describe(u) for u in softmax.users) or "nothing"
    raise Miss(f"the probabilities are not multiplied by V (softmax feeds {users})")


def _pv_operands(pv: Node, probs: Node, ops: _Operands) -> None:
    op = C.classify(pv)
    ps = _shape(probs)
    ops.out_lead = ps[:-2]
    if op.kind == C.EINSUM:
        i = op.inputs.index(probs)
        v = op.inputs[1 - i]
        ranks = [len(_shape(x)) for x in op.inputs]
        parsed = _einsum_letters(op.attrs["equation"], ranks)
        if parsed is None:
            raise Miss(f"einsum equation {op.attrs['equation']!r} is not understood")
        ins, lo = parsed
        lp, lv = ins[i], ins[1 - i]
        ql, kl, batch = lp[-2], lp[-1], lp[:-2]
        ds = [c for c in lv if c in lo and c not in lp]
        if (kl not in lv or kl in lo or len(ds) != 1 or ql not in lo or any(c not in lo for c in batch)
                or any(c not in batch + kl + ds[0] for c in lv) or len(lo) != len(batch) + 2):  # fmt: skip
            raise Miss(f"einsum {op.attrs['equation']!r} is not probabilities times V")
        canon = batch + ql + ds[0]
        ops.v, ops.v_ops = v, _letter_ops(lv, batch, kl + ds[0])
        ops.out_ops = permutation_ops([canon.index(c) for c in lo])
    else:
        v = op.inputs[1]
        vs = _shape(v)
        if len(vs) < 2 or len(vs) > len(ps):
            raise Miss(f"V of shape {vs} does not fit probabilities of shape {ps}")
        if not _same_shape(_shape(pv)[:-2], ps[:-2]):
            raise Miss(f"V of shape {vs} broadcasts the probabilities of shape {ps}")
        ops.v = v


# ------------------------------------------------------------------------------------------- layouts


def _apply_shape(shape: tuple, ops: tuple) -> tuple:
    s = list(shape)
    for name, args in ops:
        if name == "permute":
            s = [s[d] for d in args[0]] if isinstance(args[0], (tuple, list)) else [s[d] for d in args]
        elif name == "unsqueeze":
            s.insert(args[0] if args[0] >= 0 else len(s) + 1 + args[0], 1)
        elif name == "transpose":
            a, b = (d % len(s) for d in args)
            s[a], s[b] = s[b], s[a]
        else:  # pragma: no cover - only the ops produced above reach here
            raise AssertionError(name)
    return tuple(s)


def _compose_permutes(x, ops: tuple) -> tuple:
    """``x.permute(a)`` followed by a program starting with ``permute(b)``: read from ``x`` with one
    permutation ``a[b]`` (none when it is the identity), so the tensor the model wrote is seen."""
    while ops and ops[0][0] == "permute":
        op = C.classify(x)
        if op is None or op.kind not in (C.PERMUTE, C.TRANSPOSE):
            break
        rank = len(_shape(x))
        a = list(op.attrs["dims"]) if op.kind == C.PERMUTE else list(range(rank - 2)) + [rank - 1, rank - 2]
        b = list(ops[0][1][0]) if isinstance(ops[0][1][0], (tuple, list)) else list(ops[0][1])
        x, ops = op.inputs[0], permutation_ops([a[i] for i in b]) + tuple(ops[1:])
    return x, ops


def _see_through_merge(x, want: tuple | None) -> tuple[Any, tuple] | None:
    """``x`` [B*H, S, D] read as the [B, H, S, D] tensor it was reshaped from (``want``: required (B, H))."""
    op = C.classify(x)
    while op is not None and op.kind == C.CAST and op.attrs.get("dtype") is None:
        x = op.inputs[0]
        op = C.classify(x)
    if op is None or op.kind != C.RESHAPE:
        return None
    src = op.inputs[0]
    ss, xs = C.shape(src), C.shape(x)
    if ss is None or xs is None or len(ss) != 4 or len(xs) != 3 or not _same_shape(ss[-2:], xs[-2:]):
        return None
    if not eq(ss[0] * ss[1], xs[0]) or (want is not None and not _same_shape(ss[:2], want)):
        return None
    return src, ss[:2]


def unrepeat(x) -> tuple[Any, Any] | None:
    """``(base, Hkv)`` when ``x`` [B, H, S, D] repeats each head of ``base`` [B, Hkv, S, D] H/Hkv times in
    a row (``repeat_kv``: expand of ``base[:, :, None]`` and reshape; ``repeat_interleave`` on dim 1;
    expand of a single head)."""
    xs = C.shape(x)
    if xs is None or len(xs) != 4:
        return None

    def skip_identity(n):
        op = C.classify(n)
        while op is not None and op.kind == C.CAST and op.attrs.get("dtype") is None:
            n = op.inputs[0]
            op = C.classify(n)
        return n, op

    n, op = skip_identity(x)
    if op is None:
        return None
    if op.kind == C.REPEAT_INTERLEAVE and op.attrs["dim"] == 1:
        base = op.inputs[0]
        bs = C.shape(base)
        if bs is not None and len(bs) == 4 and eq(bs[1] * op.attrs["repeats"], xs[1]):
            return base, bs[1]
        return None
    if op.kind == C.EXPAND:
        base = op.inputs[0]
        bs = C.shape(base)
        if bs is not None and len(bs) == 4 and is_one(bs[1]) and _same_shape(bs[::2], xs[::2]):
            return base, 1
        return None
    if op.kind != C.RESHAPE:
        return None
    e, eop = skip_identity(op.inputs[0])
    es = C.shape(e)
    if eop is None or eop.kind != C.EXPAND or es is None or len(es) != 5:
        return None
    u, uop = skip_identity(eop.inputs[0])
    us = C.shape(u)
    if uop is None or uop.kind != C.RESHAPE or us is None or len(us) != 5 or not is_one(us[2]):
        return None
    base = uop.inputs[0]
    bs = C.shape(base)
    if bs is None or len(bs) != 4 or not _same_shape(us, bs[:2] + (1,) + bs[2:]):
        return None
    if not (_same_shape(es[:2], bs[:2]) and _same_shape(es[3:], bs[2:]) and eq(es[1] * es[2], xs[1])):
        return None
    return base, bs[1]


def _canonical_lead(score_lead: tuple) -> tuple:
    if len(score_lead) == 0:
        return (1, 1)
    if len(score_lead) == 1:
        return (1, score_lead[0])
    if len(score_lead) == 2:
        return tuple(score_lead)
    return (score_lead[0], prod(score_lead[1:]))


def term_ops(node, ctx: tuple, cb: tuple, s: tuple | None = None, refs: tuple | None = None) -> tuple:
    s = C.shape(node) if s is None else s
    if s is None:
        return ()  # a Python number broadcasts as it is
    pre = (("unsqueeze", (0,)),) * max(0, 2 - len(s))
    s = (1,) * max(0, 2 - len(s)) + tuple(s)
    conv, _ = convert(s[:-2], ctx, cb, "term", refs)
    return pre + conv


# ------------------------------------------------------------------------------------------ the match


class _Static:
    """A static mask value that has no node of its own (read off a constant additive term)."""

    def __init__(self, value):
        self.value = value


def split_causal(masks: list, terms: list, sq, sk) -> tuple[int, list, list]:
    """Finds a static causal component among the masks; returns (causal code, masks, terms) without it.

    A mask whose fill is -inf loses its causal part freely (the kernel masks the same keys). With a
    finite fill the split is exact only when nothing else masks (no row of the original is left with
    every key at the fill value), so it is done only when the causal part is the site's only mask.
    """
    if not (isinstance(sq, int) and isinstance(sk, int)):
        return CAUSAL_NONE, masks, terms
    comps = []  # (index kind, index, fill, ctx, leaves)
    for i, (node, attend, fill, ctx) in enumerate(masks):
        comps.append(("mask", i, fill, ctx, K.conjuncts(node, attend)))
    for i, (node, factor, scalars, ctx) in enumerate(terms):
        op = C.classify(node)
        if scalars or factor <= 0:
            continue
        if op is None or op.kind != C.WHERE:
            val = K.static_value(node) if isinstance(node, Node) and not scalars and factor > 0 else None
            if isinstance(val, torch.Tensor) and val.is_floating_point() and val.numel():
                neg = val[val != 0]
                fill = _fill_of(float(neg[0])) if neg.numel() and bool((neg == neg[0]).all()) else None
                if fill is not None:  # a constant 0 / fill additive mask
                    comps.append(("term", i, fill * factor, ctx, [(_Static(val == 0), True)]))
            continue
        cond, a, b = op.inputs
        if K.is_zero(a) and _fill_of(b) is not None:
            comps.append(("term", i, _fill_of(b) * factor, ctx, K.conjuncts(cond, True)))
        elif K.is_zero(b) and _fill_of(a) is not None:
            comps.append(("term", i, _fill_of(a) * factor, ctx, K.conjuncts(cond, False)))
    for kind, i, fill, ctx, leaves in comps:
        for j, (leaf, attend) in enumerate(leaves):
            val = leaf.value if isinstance(leaf, _Static) else K.static_value(leaf) if isinstance(leaf, Node) else None
            if not isinstance(val, torch.Tensor) or val.dtype != torch.bool:
                continue
            code = K.causal_kind(val if attend else ~val, sq, sk)
            if code == CAUSAL_NONE:
                continue
            rest = leaves[:j] + leaves[j + 1:]
            if math.isfinite(fill):
                alone = not rest and len(masks) + len(terms) == 1
                if not alone or K.has_empty_rows(code, sq, sk):
                    continue
            new_masks = [m for k, m in enumerate(masks) if not (kind == "mask" and k == i)]
            new_terms = [t for k, t in enumerate(terms) if not (kind == "term" and k == i)]
            new_masks += [(leaf_, attend_, fill, ctx) for leaf_, attend_ in rest]
            return code, new_masks, new_terms
    return CAUSAL_NONE, masks, terms


def match(softmax: Node, dag: nx.DiGraph) -> AttentionMatch | None:
    """The attention site whose softmax is ``softmax``; raises :class:`Miss` with the reason if none.

    ``dag`` is the graph's data-flow DAG (nodes -> users), used for escape analysis.
    """
    op = C.classify(softmax)
    if op is None or op.kind != C.SOFTMAX:
        return None
    rank, dim = op.attrs["rank"], op.attrs["dim"]
    if rank is None or dim != rank - 1 or rank < 2:
        raise Miss(f"softmax over dim {dim} of a rank-{rank} tensor, not over the keys (last dim)")
    pv, probs, dropout_p = _find_pv(softmax)
    st = _walk_scores(op.inputs[0])
    product = st.product
    ops = _Operands(None, None, None)
    _qk_operands(product, ops)
    _pv_operands(pv, probs, ops)
    ops.q, ops.q_ops = _compose_permutes(ops.q, ops.q_ops)
    if not ops.k_transposed:
        ops.k, ops.k_ops = _compose_permutes(ops.k, ops.k_ops)
    ops.v, ops.v_ops = _compose_permutes(ops.v, ops.v_ops)
    # Single-use scalings of q and k by constants fold into the scale (before layouts and repeats are
    # read through, and again after: ``reshape(q * c)`` and ``reshape(q) * c`` alike).
    folded = 1.0
    ops.q, folded = _fold_scalar(ops.q, folded)
    ops.k, folded = _fold_scalar(ops.k, folded)
    sl = ops.score_lead
    scores_shape = _shape(product)
    sq, sk = scores_shape[-2:]

    # Canonical lead: [B, H]; a merged [B*H] product of tensors reshaped from [B, H, S, D] keeps B and H.
    cb = _canonical_lead(sl)
    q_ctx = k_ctx = sl
    v_ctx = ops.out_lead
    if len(sl) == 1 and not ops.q_ops:
        seen = _see_through_merge(ops.q, None)
        if seen is not None:
            ops.q, cb = seen
            q_ctx = cb
            k_seen = _see_through_merge(ops.k, cb) if not (ops.k_ops or ops.k_transposed) else None
            if k_seen is not None:
                ops.k, k_ctx = k_seen[0], cb
            if not ops.v_ops:
                v_seen = _see_through_merge(ops.v, cb)
                if v_seen is not None:
                    ops.v, v_ctx = v_seen[0], cb
    ops.q, folded = _fold_scalar(ops.q, folded)
    ops.k, folded = _fold_scalar(ops.k, folded)
    # Run-time sizes for views that need a dynamic B or H: read off q when it is [B, H, S, D] as written.
    qs = C.shape(ops.q)
    refs = None
    if not ops.q_ops and qs is not None and len(qs) == 4 and _same_shape(qs[:2], cb):
        refs = (SizeOf(ops.q, 0), SizeOf(ops.q, 1))
    try:
        q_shape = _apply_shape(_shape(ops.q), ops.q_ops)
        k_raw = _shape(ops.k)
        k_shape = _apply_shape(k_raw[:-2] + (k_raw[-1], k_raw[-2]) if ops.k_transposed else k_raw, ops.k_ops)
        v_shape = _apply_shape(_shape(ops.v), ops.v_ops)
        conv, q_lead = convert(q_shape[:-2], q_ctx, cb, "full")
        q_ops = ops.q_ops + conv
        conv, k_lead = convert(k_shape[:-2], k_ctx, cb, "kv", refs)
        k_ops = ops.k_ops + conv
        conv, v_lead = convert(v_shape[:-2], v_ctx, cb, "kv", refs)
        v_ops = ops.v_ops + conv
        out_conv, _ = convert(cb, cb, ops.out_lead, "full")
        out_ops = out_conv + ops.out_ops
    except LayoutError as exc:
        raise Miss(f"layout not understood: {exc}") from None
    hq, hkv, hv = q_lead[1], k_lead[1], v_lead[1]

    k_node, v_node = ops.k, ops.v
    if not k_ops and not v_ops and not ops.k_transposed:
        rk, rv = unrepeat(k_node), unrepeat(v_node)
        if rk is not None and rv is not None and eq(rk[1], rv[1]):
            (k_node, hkv), (v_node, hv) = rk, rv
    if not eq(hkv, hv):
        if is_one(hkv) and isinstance(hv, int):
            k_ops = k_ops + (("expand", (-1, hv, -1, -1)),)
            hkv = hv
        elif is_one(hv) and isinstance(hkv, int):
            v_ops = v_ops + (("expand", (-1, hkv, -1, -1)),)
            hv = hkv
        else:
            raise Miss(f"keys have {hkv} heads but values have {hv}")
    if isinstance(hq, int) and isinstance(hkv, int) and hq % hkv:
        raise Miss(f"{hq} query heads are not a multiple of {hkv} key/value heads")

    m = AttentionMatch(kind="manual", output=pv, q=ops.q, k=k_node, v=v_node, dropout_p=dropout_p)
    m.k_transposed = ops.k_transposed
    m.q_ops, m.k_ops, m.v_ops, m.out_ops = q_ops, k_ops, v_ops, out_ops

    # The scale: constants, Python-number nodes, and tensors (applied to q); single-use scalings of q
    # and k by constants fold in too.
    cap = st.softcap
    numbers = tuple((n, p) for n, p, ctx in st.scalars if ctx is None)
    scale = st.factor * (cap.const if cap is not None else 1.0) * folded
    if numbers or (cap is not None and cap.factors):
        m.scale_expr = ScalarExpr(scale, numbers + (cap.factors if cap is not None else ()))
        m.scale = m.scale_expr.value
    else:
        m.scale = scale
    if not math.isfinite(m.scale) or m.scale == 0:
        raise Miss(f"scale {m.scale} is not a finite non-zero number")
    if cap is not None:
        m.softcap = cap.value
        m.softcap_expr = cap if cap.factors else None
    try:
        m.q_scalars = tuple((n, p, term_ops(n, ctx, cb, refs=refs)) for n, p, ctx in st.scalars if ctx is not None)
        m.causal, masks, terms = split_causal(st.masks, st.terms, sq, sk)
        m.additive = [Term(n, f, s, term_ops(n, ctx, cb, _product_shape(n, s), refs)) for n, f, s, ctx in terms]
        m.bool_masks = [BoolMask(n, a, fill, term_ops(n, ctx, cb, refs=refs)) for n, a, fill, ctx in masks]
    except LayoutError as exc:
        raise Miss(f"mask or bias layout not understood: {exc}") from None

    d = q_shape[-1]
    m.info = {
        "heads": (as_int(hq), as_int(hkv)),
        "head_dims": (as_int(d), as_int(v_shape[-1])),
        "seq": (as_int(sq), as_int(sk)),
        "batch": as_int(q_lead[0]),
        "layout": _layout_name(ops, softmax),
    }

    region = (nx.descendants(dag, product) & nx.ancestors(dag, pv)) | {product} | st.inplace
    for operand in m.operands():
        if operand in region or operand is pv:
            raise Miss(f"{_describe(operand)} feeds the attention and depends on its scores")
    order = dag.graph.get("order") or {n: i for i, n in enumerate(softmax.graph.nodes)}
    for n in sorted(region, key=order.__getitem__):
        outside = [u for u in n.users if u not in region and u is not pv]
        if outside:
            what = "probabilities" if n is softmax or nx.has_path(dag, softmax, n) else "scores"
            m.escape = f"the {what} ({n.name}) are also used by {_describe(outside[0])}"
            break
    m.interior = region
    if m.escape is None and m.softcap is not None and not op_supports_softcap():
        m.escape = (f"softcap {m.softcap:g}: torch.ops.attnopt.attention has no softcap argument in this build")
    return m


def _product_shape(node, scalars: tuple) -> tuple | None:
    """The shape of a term times its tensor scalings (their broadcast)."""
    shapes = [C.shape(x) for x in [node] + [n for n, _ in scalars]]
    shapes = [sh for sh in shapes if sh is not None]
    return tuple(torch.broadcast_shapes(*shapes)) if shapes else None


def as_int(x):
    """A size for the report: its value, or its hint under dynamic shapes (read without adding a guard)."""
    if isinstance(x, torch.SymInt):
        return int(x.node.hint) if x.node.has_hint() else str(x)
    return int(x) if isinstance(x, int) else str(x)


def _layout_name(ops: _Operands, softmax: Node) -> str:
    if ops.layout:
        return ops.layout
    qs = C.shape(ops.q)
    if qs is not None and len(qs) == 3:
        return "(B*H)SD"
    if qs is not None and len(qs) == 5:
        return "B,Hkv,G,S,D"
    t = C.tensor_meta(ops.q)
    return "BSHD" if t is not None and seq_major(t) else "BHSD"


def seq_major(t: torch.Tensor) -> bool:
    """Whether a [B, H, S, D] tensor is stored sequence-major (a transposed [B, S, H, D]); no guard added."""
    if t.dim() != 4:
        return False
    h, s, st1, st2 = (hint(x) for x in (t.shape[1], t.shape[2], t.stride(1), t.stride(2)))
    return h > 1 and s > 1 and st1 < st2


def _fold_scalar(x, scale: float) -> tuple:
    """Fold single-use ``x * c`` / ``x / c`` chains into ``scale``; returns (operand, scale)."""
    for _ in range(8):
        op = C.classify(x)
        if op is None or op.kind not in (C.MUL, C.DIV) or len(C.value_users(x)) != 1 or op.attrs.get("inplace"):
            return x, scale
        a, b = op.inputs
        cb, ca = C.scalar_value(b), C.scalar_value(a)
        if op.kind == C.MUL and cb is not None:
            x, scale = a, scale * cb
        elif op.kind == C.MUL and ca is not None:
            x, scale = b, scale * ca
        elif op.kind == C.DIV and cb is not None and cb != 0:
            x, scale = a, scale / cb
        else:
            return x, scale
    return x, scale
