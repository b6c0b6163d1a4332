"""The score walk: from a softmax down to ``q @ kᵀ``, one table row per op the scores may pass through.

:data:`SCORE_STEPS` maps an op kind of the canonical vocabulary (:mod:`attnopt.patterns.canonical`) to
the step that reads one such op into the :class:`Scores` being collected (a scaling, an additive term,
a boolean mask, a softcap, ...) and returns the node below it on the way to the scores; a step that
finds an op it cannot read raises :class:`~attnopt.patterns.match.Miss` with the reason.
:data:`PRODUCTS` maps the kinds that end the walk (the scores product) to the step that reads them.
A new written form of the scores is one row and one small step function.

A term met below a scaling is multiplied by it, so ``(q @ kᵀ + b) / s`` is scale ``1/s`` and term
``b/s``: the match is the function, not the op order.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple

import torch
from torch.fx import Node

from attnopt.patterns.canonical import (ADD, BADDBMM, CAST, CLAMP_MIN, DIV, EINSUM, MASKED_FILL, MATMUL, MUL, NEG,
                                        RESHAPE, SUB, TANH, WHERE, Op, classify, is_symbolic_scalar, scalar_value,
                                        shape, tensor_meta)  # fmt: skip
from attnopt.patterns.causal import mask_fill
from attnopt.patterns.layout import eq, is_one, is_sym
from attnopt.patterns.match import Miss, Region, ScalarExpr
from attnopt.patterns.operands import MAX_DEPTH, describe, same_shape, shape_of
from attnopt.patterns.updates import Updates, find_updates, is_fresh


def _broadcasts_along_keys(t, scores_shape: tuple) -> bool:
    """A tensor whose broadcast to the scores changes nothing along the keys (last dim 1, or 0-d)."""
    s = shape(t)
    if s is None or len(s) > len(scores_shape):
        return False
    return len(s) == 0 or is_one(s[-1])


def _layout_free(t) -> bool:
    """A tensor that broadcasts the same way in every layout of the scores (no leading dim above 1)."""
    s = shape(t)
    return s is None or all(is_one(d) for d in s[:-2])


def _broadcasts_into(t, scores_shape: tuple) -> bool:
    s = shape(t)
    if s is None:
        return scalar_value(t) is not None
    if len(s) > len(scores_shape):
        return False
    return all(is_one(a) or eq(a, b) for a, b in zip(reversed(s), reversed(scores_shape)))


@dataclass
class Scores:
    """The score expression read from the softmax down to the scores product."""

    product: Node | None = None
    terms: list = field(default_factory=list)  # (node, factor, scalars, ctx lead)
    masks: list = field(default_factory=list)  # (node, attend_when, fill, ctx lead)
    factor: float = 1.0
    scalars: list = field(default_factory=list)  # (node, power, ctx lead): numbers and tensors
    softcap: ScalarExpr | None = None
    inplace: set = field(default_factory=set)
    writes: set = field(default_factory=set)  # in-place writes into the scores, read into terms and masks
    kept: str | None = None  # why the site must stay as written (an in-place change that is no bias or mask)
    zone: tuple | None = None  # the scores' shape while the walk is inside a regrouping of their dims (see _reshape)


def _zoned(t: Any, x: Node, xs: tuple, st: Scores, dtype: torch.dtype | None = None) -> tuple:
    """A term or mask ``t`` met at ``x`` as (operand, its lead): inside a regrouping of the scores' dims, the
    :class:`Region` that is ``t`` broadcast to ``x``'s shape and regrouped back to the scores' shape."""
    if st.zone is None:
        return t, xs[:-2]
    region = Region(t, st.zone, (Ellipsis,), dtype or tensor_meta(x).dtype, tuple(xs))
    return region, st.zone[:-2]


# A step: (the op, its node, the node's shape, the scores read so far) -> the node below, towards q @ kᵀ.
Step = Callable[[Op, Node, tuple, Scores], Any]


def _through(op: Op, x: Node, xs: tuple, st: Scores) -> Any:
    return op.inputs[0]


def _reshape(op: Op, x: Node, xs: tuple, st: Scores) -> Any:
    """A view keeping the query/key dims is read through. One regrouping them (``s.view(B, qh, qw, kh, kw)``
    for decomposed relative positions) opens a zone, closed by the view back to the scores' shape: terms and
    masks met inside are broadcast in the regrouped shape and regrouped back (row-major, as the views do)."""
    src = op.inputs[0]
    ss = shape_of(src)
    if st.zone is None and len(ss) >= 2 and same_shape(ss[-2:], xs[-2:]):
        return src
    if st.zone is None:
        if any(ctx is not None for _, _, ctx in st.scalars):
            raise Miss(f"{describe(x)} regroups the query/key dims of scores scaled by a tensor")
        st.zone = xs
    elif same_shape(ss, st.zone):
        st.zone = None
    return src


def _negate(op: Op, x: Node, xs: tuple, st: Scores) -> Any:
    st.factor = -st.factor
    return op.inputs[0]


def _clamp_min(op: Op, x: Node, xs: tuple, st: Scores) -> Any:
    # max(s, c) with c a large negative constant only lifts masked scores to c: keys that stay
    # masked (HF's clamp to finfo.min after adding the mask).
    if mask_fill(op.inputs[1]) is None or st.softcap is not None:
        raise Miss(f"scores are clamped by {describe(x)}")
    return op.inputs[0]


def _masked_fill(op: Op, x: Node, xs: tuple, st: Scores) -> Any:
    base, cond, value = op.inputs
    fill = mask_fill(value)
    if fill is None:
        raise Miss(f"masked_fill with {value!r} is not a mask (not -inf or a large negative constant)")
    _check_mask_context(x, st, cond, xs)
    _add_mask(st, cond, False, fill * st.factor, x, xs)
    return base


def _add_mask(st: Scores, cond: Any, attend: bool, fill: float, x: Node, xs: tuple) -> None:
    node, ctx = _zoned(cond, x, xs, st, torch.bool)
    st.masks.append((node, attend, fill, ctx))


def _where(op: Op, x: Node, xs: tuple, st: Scores) -> Any:
    cond, a, b = op.inputs
    fa, fb = mask_fill(a), mask_fill(b)
    if fb is not None and distance_to_product(a) is not None:
        _check_mask_context(x, st, cond, xs)
        _add_mask(st, cond, True, fb * st.factor, x, xs)
        return a
    if fa is not None and distance_to_product(b) is not None:
        _check_mask_context(x, st, cond, xs)
        _add_mask(st, cond, False, fa * st.factor, x, xs)
        return b
    raise Miss(f"{describe(x)} selects between values that are not scores and a mask fill")


def _softcap(op: Op, x: Node, xs: tuple, st: Scores) -> Any:
    if st.softcap is not None:
        raise Miss(f"a second tanh in the scores ({describe(x)})")
    if any(ctx is not None for _, _, ctx in st.scalars):
        raise Miss(f"the softcap of {describe(x)} is scaled by a tensor")
    cap = ScalarExpr(st.factor, tuple((n, p) for n, p, _ in st.scalars))
    if not cap.value > 0:
        raise Miss(f"the softcap of {describe(x)} has a non-positive cap {cap.value}")
    st.softcap, st.factor, st.scalars = cap, 1.0, []
    return op.inputs[0]


def _check_mask_context(x, st: Scores, cond, xs: tuple) -> None:
    if st.softcap is not None:
        raise Miss(f"{describe(x)} masks scores inside the softcap (its fill would be capped)")
    if st.scalars:
        raise Miss(f"{describe(x)} masks scores that are then scaled by a tensor or a graph value")
    if not st.factor > 0:
        raise Miss(f"{describe(x)} masks scores that are then scaled by {st.factor}")
    if not _broadcasts_into(cond, xs):
        raise Miss(f"the mask of {describe(x)} does not broadcast to the scores")


def _scaling(op: Op, x: Node, xs: tuple, st: Scores) -> Any:
    a, b = op.inputs
    ca, cb = scalar_value(a), scalar_value(b)
    if cb is not None:
        if op.kind == DIV and cb == 0:
            raise Miss(f"scores divided by zero in {describe(x)}")
        st.factor = st.factor * cb if op.kind == MUL else st.factor / cb
        return a
    if ca is not None:
        if op.kind == DIV:
            raise Miss(f"{describe(x)} divides a constant by the scores")
        st.factor *= ca
        return b
    da, db = distance_to_product(a), distance_to_product(b)
    if da is None and db is None:
        raise Miss(f"scores come from {describe(x)}, a product of tensors that are not q @ kᵀ")
    if op.kind == DIV and da is None:
        raise Miss(f"{describe(x)} divides by the scores")
    scores, other = (a, b) if (db is None or (da is not None and da <= db)) else (b, a)
    power = 1 if op.kind == MUL else -1
    if is_symbolic_scalar(other):
        st.scalars.append((other, power, None))
        return scores
    if distance_to_product(other) is not None and other is not scores:
        raise Miss(f"{describe(x)} multiplies two score-like products")
    if not _broadcasts_along_keys(other, xs) or not same_shape(shape_of(scores), xs):
        raise Miss(f"scores are scaled by a tensor that varies along the keys ({describe(other)})")
    if st.zone is not None:
        raise Miss(f"scores are scaled by a tensor ({describe(other)}) while their dims are regrouped")
    st.scalars.append((other, power, xs[:-2]))
    return scores


def _additive(op: Op, x: Node, xs: tuple, st: Scores) -> Any:
    a, b = op.inputs
    sub = op.kind == SUB
    if scalar_value(b) is not None or is_symbolic_scalar(b):
        if st.softcap is not None:
            raise Miss(f"{describe(x)} adds a constant inside the softcap")
        return a  # softmax is shift-invariant
    if scalar_value(a) is not None or is_symbolic_scalar(a):
        if st.softcap is not None:
            raise Miss(f"{describe(x)} adds a constant inside the softcap")
        st.factor = -st.factor if sub else st.factor
        return b
    da, db = distance_to_product(a), distance_to_product(b)
    if da is None and db is None:
        raise Miss(f"cannot tell the scores from the added term in {describe(x)}: neither comes from q @ kᵀ")
    # The side nearer to a product, unless it is broadcast by the other (then it is the term).
    cands = sorted([(d, i) for i, d in enumerate((da, db)) if d is not None])
    cands = [i for _, i in cands if same_shape(shape_of((a, b)[i]), xs)]
    if not cands:
        raise Miss(f"the scores are broadcast by the term added in {describe(x)}")
    if cands[0] == 0:
        scores, term, term_factor = a, b, (-st.factor if sub else st.factor)
    else:
        scores, term, term_factor = b, a, st.factor  # term - scores: the scores are negated
    if st.softcap is not None:
        raise Miss(f"{describe(x)} adds a term inside the softcap, which the kernel applies before its mask")
    if not _broadcasts_into(term, xs):
        raise Miss(f"the term added in {describe(x)} does not broadcast to the scores")
    # a term constant along the keys is a row constant (e.g. the row max): shift-invariant, unless the keys
    # are regrouped (then it varies along the scores' keys)
    if st.zone is not None or not _broadcasts_along_keys(term, xs):
        for n, _, ctx in st.scalars:
            if ctx is not None and not same_shape(ctx, xs[:-2]) and not _layout_free(n):
                raise Miss(f"the term added in {describe(x)} is scaled by a tensor in another layout")
        node, ctx = _zoned(term, x, xs, st)
        st.terms.append((node, term_factor, tuple((n, p) for n, p, _ in st.scalars), ctx))
    if sub and scores is b:
        st.factor = -st.factor
    return scores


def _product(op: Op, x: Node, xs: tuple, st: Scores) -> None:
    """``q @ kᵀ`` (matmul, bmm, einsum): nothing more to read."""


def _baddbmm(op: Op, x: Node, xs: tuple, st: Scores) -> None:
    """``beta * bias + alpha * q @ kᵀ``: the bias is a term, alpha a scaling."""
    lead, (bias, beta, alpha) = xs[:-2], (op.inputs[0], op.attrs["beta"], op.attrs["alpha"])
    for value in (beta, alpha):
        if scalar_value(value) is None and not is_symbolic_scalar(value):
            raise Miss(f"baddbmm with a beta/alpha that is not a number in {describe(x)}")
    beta_c = scalar_value(beta)
    if beta_c != 0 and isinstance(bias, Node):  # beta * bias
        if st.softcap is not None:
            raise Miss(f"the baddbmm bias of {describe(x)} is inside the softcap")
        if any(ctx is not None and not same_shape(ctx, lead) and not _layout_free(n)
               for n, _, ctx in st.scalars):  # fmt: skip
            raise Miss(f"the baddbmm bias of {describe(x)} is scaled by a tensor in another layout")
        scalars = tuple((n, p) for n, p, _ in st.scalars) + (((beta, 1),) if beta_c is None else ())
        st.terms.append((bias, st.factor * (beta_c if beta_c is not None else 1.0), scalars, lead))
    if scalar_value(alpha) is not None:
        st.factor *= float(alpha)
    else:
        st.scalars.append((alpha, 1, None))


class ScoreStep(NamedTuple):
    """One row of the score walk: the step over an op, and which of its inputs may carry the scores."""

    step: Step
    score_inputs: slice = slice(None)


_FIRST = slice(0, 1)
# The ops the scores may pass through on the way up from q @ kᵀ to the softmax.
SCORE_STEPS: dict[str, ScoreStep] = {
    CAST: ScoreStep(_through, _FIRST),
    RESHAPE: ScoreStep(_reshape, _FIRST),
    NEG: ScoreStep(_negate, _FIRST),
    CLAMP_MIN: ScoreStep(_clamp_min, _FIRST),
    MUL: ScoreStep(_scaling),
    DIV: ScoreStep(_scaling),
    ADD: ScoreStep(_additive),
    SUB: ScoreStep(_additive),
    MASKED_FILL: ScoreStep(_masked_fill, _FIRST),
    WHERE: ScoreStep(_where, slice(1, None)),
    TANH: ScoreStep(_softcap, _FIRST),
}
# The scores products, where the walk ends (an einsum counts with two operands).
PRODUCTS: dict[str, Callable[[Op, Node, tuple, Scores], None]] = {MATMUL: _product, EINSUM: _product,
                                                                  BADDBMM: _baddbmm}  # fmt: skip


def _updated(x: Node, xs: tuple, st: Scores, upd: Updates) -> None:
    """The in-place updates of ``x`` (:mod:`attnopt.patterns.updates`) as terms and masks, last one first."""
    st.inplace |= upd.nodes
    st.writes |= upd.writes
    reasons = [upd.reason] if upd.reason else []
    if st.softcap is not None:
        reasons.append(f"the scores changed in place ({describe(x)}) are then capped")
    if any(is_sym(d) for d in xs) or st.zone is not None:
        reasons.append(f"the scores changed in place ({describe(x)}) have dynamic sizes or regrouped dims")
    scalars = tuple((n, p) for n, p, _ in st.scalars)
    if any(ctx is not None and not same_shape(ctx, xs[:-2]) and not _layout_free(n) for n, _, ctx in st.scalars):
        reasons.append(f"the scores changed in place ({describe(x)}) are then scaled by a tensor in another layout")
    for ev in reversed(upd.events):
        value = ev.value
        if ev.kind == "mask" and (st.scalars or not st.factor > 0 or (ev.index is None and value is None)):
            reasons.append(f"{describe(ev.at)} masks scores that are then scaled by {st.factor} or a tensor, "
                           "or fills every score")  # fmt: skip
        elif ev.index is None and not _broadcasts_into(value, xs):
            reasons.append(f"{describe(ev.at)} changes the scores by a tensor that does not broadcast to them")
        elif ev.kind == "add" and ev.index is None and scalar_value(value) is not None:
            continue  # a constant shift: softmax is shift-invariant
        elif ev.kind == "add":
            node = value if ev.index is None else Region(value, xs, ev.index, tensor_meta(x).dtype, ev.inner)
            st.terms.append((node, st.factor * ev.sign, scalars, xs[:-2]))
        else:
            node = value if ev.index is None else Region(True if value is None else value, xs, ev.index, torch.bool)
            st.masks.append((node, False, ev.fill * st.factor, xs[:-2]))
    st.kept = st.kept or (reasons[0] if reasons else None)


def walk_scores(x, reader: Node | None = None) -> Scores:
    """Reads the score expression below the softmax (``reader``: the node reading ``x``, for its in-place
    updates); raises :class:`Miss` when it is not one."""
    st = Scores()
    for _ in range(MAX_DEPTH):
        op = classify(x)
        if op is None:
            raise Miss(f"scores come from {describe(x)}, not from q @ kᵀ")
        xs = shape_of(x)
        upd = find_updates(x, reader) if reader is not None else None
        if upd is not None:
            _updated(x, xs, st, upd)
        reader = x
        if op.attrs.get("inplace"):
            target = op.inputs[0]
            if not isinstance(target, Node) or len(target.users) != 1:
                raise Miss(f"{describe(x)} mutates scores that are also read elsewhere")
            st.inplace.add(x)
            if is_fresh(x):  # it writes only into the site's own scores
                st.writes.add(x)
        if op.kind in PRODUCTS and st.zone is not None:
            raise Miss(f"the scores are regrouped to {tuple(st.zone)} and not back before the softmax")
        if op.kind in PRODUCTS:
            st.product = x
            PRODUCTS[op.kind](op, x, xs, st)
            return st
        row = SCORE_STEPS.get(op.kind)
        if row is None:
            raise Miss(f"scores pass through {describe(x)}")
        x = row.step(op, x, xs, st)
    raise Miss("score expression too deep")


def distance_to_product(x, _memo: dict | None = None, _depth: int = 0) -> int | None:
    """How many score-path ops lie between ``x`` and a scores product (None: none is reached).

    Memoized per call: a bias computed by a DAG of adds and multiplies is visited once per node.
    """
    memo = {} if _memo is None else _memo
    if not isinstance(x, Node) or _depth > MAX_DEPTH:
        return None
    if x in memo:
        return memo[x]
    memo[x] = None  # a cycle cannot occur in a DAG; this also bounds revisits
    op = classify(x)
    if op is None:
        return None
    if op.kind in PRODUCTS:
        memo[x] = 0 if op.kind != EINSUM or len(op.inputs) == 2 else None
        return memo[x]
    row = SCORE_STEPS.get(op.kind)
    if row is None:
        return None
    dists = (distance_to_product(a, memo, _depth + 1) for a in op.inputs[row.score_inputs])
    found = [d for d in dists if d is not None]
    memo[x] = 1 + min(found) if found else None
    return memo[x]
