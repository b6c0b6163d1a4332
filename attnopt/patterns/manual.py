"""Attention written by hand: ``softmax(scale * q @ kᵀ + bias + mask) @ v`` in any spelling and layout.

Matching starts from each softmax and reads the graph through the canonical vocabulary of
:mod:`attnopt.patterns.canonical`:

* forward, through casts, dropout and views that regroup the leading dims, to the ``@ V`` product
  (``matmul``, ``bmm`` or ``einsum``; :mod:`attnopt.patterns.products`);
* backward, through casts and views, scalings (constants, Python-number nodes such as
  ``q.size(-1) ** -0.5``, tensors broadcast along the keys), additive terms (float masks, relative
  position biases, ALiBi; a row-constant term is dropped, softmax being shift-invariant),
  ``masked_fill``/``where`` with a large negative fill (boolean masks) and a softcap
  ``cap * tanh(s / cap)``, to the scores product (``matmul``, ``bmm``, ``baddbmm`` or ``einsum``): the
  score walk of :mod:`attnopt.patterns.scores`, one table row per op.

Layouts ([B, H, S, D], [B, S, H, D] through einsum, merged [B*H, S, D], grouped [B, Hkv, G, S, D])
become view programs to the canonical [B, H, S, D]; ``repeat_kv``-style repeats of k and v are read
through (native GQA), a static causal mask becomes the kernel's causal flag, and escape analysis
checks that nothing but the ``@ V`` consumes the scores or probabilities.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any, NamedTuple

import networkx as nx
from torch.fx import Node

from attnopt.patterns.canonical import CAST, SOFTMAX, TRANSPOSE, Op, classify, shape, tensor_meta
from attnopt.patterns.causal import split_causal
from attnopt.patterns.layout import LayoutError, convert, eq, is_one
from attnopt.patterns.match import AttentionMatch, BoolMask, Miss, ScalarExpr, SizeOf, Term
from attnopt.patterns.operands import (apply_shape, as_int, canonical_lead, compose_permutes, describe, fold_scalar,
                                       product_shape, same_shape, see_through_merge, seq_major, shape_of, term_ops,
                                       unrepeat)  # fmt: skip
from attnopt.patterns.products import Operands, find_pv, pv_operands, qk_operands
from attnopt.patterns.scores import Scores, walk_scores
from attnopt.patterns.special import diagnose


class _Read(NamedTuple):
    """What the graph says around one softmax, before canonicalization."""

    ops: Operands
    scores: Scores
    pv: Node
    dropout_p: float
    folded: float  # constant scalings of q and k folded into the scale so far


class _Lead(NamedTuple):
    """The canonical lead [B, H] and the lead each operand broadcasts against."""

    cb: tuple
    q_ctx: tuple
    k_ctx: tuple
    v_ctx: tuple


class _Views(NamedTuple):
    """The view programs to [B, H, S, D] and what they give."""

    q_ops: tuple
    k_ops: tuple
    v_ops: tuple
    out_ops: tuple
    q_shape: tuple
    v_shape: tuple
    q_lead: tuple
    heads: tuple  # (Hq, Hkv, Hv) as the views give them


def _softmax_over_keys(softmax: Node) -> Op:
    op = classify(softmax)
    if op is None or op.kind != SOFTMAX:
        raise Miss(f"{describe(softmax)} is not a softmax")
    rank, dim = op.attrs["rank"], op.attrs["dim"]
    if rank is None or dim != rank - 1 or rank < 2:
        raise Miss(f"softmax over dim {dim} of a rank-{rank} tensor, not over the keys (last dim)")
    return op


def _read(softmax: Node, op: Op) -> _Read:
    """The ``@ V`` product, the score expression and the operands of both products."""
    found = find_pv(softmax)
    st = walk_scores(op.inputs[0], softmax)
    ops = Operands(**qk_operands(st.product), **pv_operands(found))
    q, q_ops = compose_permutes(ops.q, ops.q_ops)
    k, k_ops = (ops.k, ops.k_ops) if ops.k_transposed else compose_permutes(ops.k, ops.k_ops)
    v, v_ops = compose_permutes(ops.v, ops.v_ops)
    # Single-use scalings of q and k by constants fold into the scale (before layouts and repeats are
    # read through, and again after: ``reshape(q * c)`` and ``reshape(q) * c`` alike).
    q, folded = fold_scalar(q, 1.0)
    k, folded = fold_scalar(k, folded)
    ops = replace(ops, q=q, q_ops=q_ops, k=k, k_ops=k_ops, v=v, v_ops=v_ops)
    return _Read(ops, st, found.pv, found.dropout_p, folded)


def _lead(ops: Operands) -> tuple[Operands, _Lead]:
    """Canonical lead: [B, H]; a merged [B*H] product of tensors reshaped from [B, H, S, D] keeps B and H
    (the operands returned then read those tensors)."""
    sl = ops.score_lead
    lead = _Lead(canonical_lead(sl), sl, sl, ops.out_lead)
    if len(sl) != 1 or ops.q_ops:
        return ops, lead
    seen = see_through_merge(ops.q, None)
    if seen is None:
        return ops, lead
    ops, cb = replace(ops, q=seen[0]), seen[1]
    lead = _Lead(cb, cb, sl, ops.out_lead)
    k_seen = see_through_merge(ops.k, cb) if not (ops.k_ops or ops.k_transposed) else None
    if k_seen is not None:
        ops, lead = replace(ops, k=k_seen[0]), lead._replace(k_ctx=cb)
    v_seen = see_through_merge(ops.v, cb) if not ops.v_ops else None
    if v_seen is not None:
        ops, lead = replace(ops, v=v_seen[0]), lead._replace(v_ctx=cb)
    return ops, lead


def _views(ops: Operands, lead: _Lead, refs: tuple | None) -> _Views:
    try:
        q_shape = apply_shape(shape_of(ops.q), ops.q_ops)
        k_raw = shape_of(ops.k)
        k_shape = apply_shape(k_raw[:-2] + (k_raw[-1], k_raw[-2]) if ops.k_transposed else k_raw, ops.k_ops)
        v_shape = apply_shape(shape_of(ops.v), ops.v_ops)
        q_conv, q_lead = convert(q_shape[:-2], lead.q_ctx, lead.cb, "full")
        k_conv, k_lead = convert(k_shape[:-2], lead.k_ctx, lead.cb, "kv", refs)
        v_conv, v_lead = convert(v_shape[:-2], lead.v_ctx, lead.cb, "kv", refs)
        out_conv, _ = convert(lead.cb, lead.cb, ops.out_lead, "full")
    except LayoutError as exc:
        raise Miss(f"layout not understood: {exc}") from None
    return _Views(ops.q_ops + q_conv, ops.k_ops + k_conv, ops.v_ops + v_conv, out_conv + ops.out_ops, q_shape,
                  v_shape, q_lead, (q_lead[1], k_lead[1], v_lead[1]))  # fmt: skip


def _kv_heads(ops: Operands, views: _Views) -> dict:
    """k and v with repeats read through (native GQA) or a single head expanded; the fields they give."""
    hq, hkv, hv = views.heads
    k_node, v_node, k_ops, v_ops = ops.k, ops.v, views.k_ops, views.v_ops
    k_transposed = ops.k_transposed
    if not k_ops and not v_ops:
        # keys given pre-transposed ([.., D, Sk]) as a transposed copy of repeated keys: read through both
        k_seen = _untransposed(k_node) if k_transposed else k_node
        rk, rv = unrepeat(k_seen), unrepeat(v_node)
        if rk is not None and rv is not None and eq(rk[1], rv[1]):
            (k_node, hkv), (v_node, hv), k_transposed = rk, rv, False
    if not eq(hkv, hv):
        if is_one(hkv) and isinstance(hv, int):
            k_ops, hkv = k_ops + (("expand", (-1, hv, -1, -1)),), hv
        elif is_one(hv) and isinstance(hkv, int):
            v_ops, hv = v_ops + (("expand", (-1, hkv, -1, -1)),), hkv
        else:
            raise Miss(f"keys have {hkv} heads but values have {hv}")
    if isinstance(hq, int) and isinstance(hkv, int) and hq % hkv:
        raise Miss(f"{hq} query heads are not a multiple of {hkv} key/value heads")
    return {"k": k_node, "v": v_node, "k_ops": k_ops, "v_ops": v_ops, "hkv": hkv, "k_transposed": k_transposed}


def _untransposed(k: Any) -> Any:
    """``k`` [.., D, Sk] read as the [.., Sk, D] tensor it transposes (through ``contiguous``), else None."""
    op = classify(k)
    while op is not None and op.kind == CAST and op.attrs.get("dtype") is None:
        op = classify(op.inputs[0])
    return op.inputs[0] if op is not None and op.kind == TRANSPOSE else None


def _scale(st: Scores, folded: float) -> dict:
    """The scale: constants, Python-number nodes, and tensors (applied to q), and the softcap."""
    cap = st.softcap
    numbers = tuple((n, p) for n, p, ctx in st.scalars if ctx is None)
    value = st.factor * (cap.const if cap is not None else 1.0) * folded
    fields: dict[str, Any] = {"scale": value}
    if numbers or (cap is not None and cap.factors):
        expr = ScalarExpr(value, numbers + (cap.factors if cap is not None else ()))
        fields = {"scale_expr": expr, "scale": expr.value}
    if not math.isfinite(fields["scale"]) or fields["scale"] == 0:
        raise Miss(f"scale {fields['scale']} is not a finite non-zero number")
    if cap is not None:
        fields.update(softcap=cap.value, softcap_expr=cap if cap.factors else None)
    return fields


def _masks(st: Scores, sq: Any, sk: Any, cb: tuple, refs: tuple | None) -> dict:
    """Tensor scalings of q, the causal flag, the additive terms and the boolean masks."""
    try:
        q_scalars = tuple((n, p, term_ops(n, ctx, cb, refs=refs)) for n, p, ctx in st.scalars if ctx is not None)
        causal, masks, terms = split_causal(st.masks, st.terms, sq, sk)
        additive = [Term(n, f, s, term_ops(n, ctx, cb, product_shape(n, s), refs)) for n, f, s, ctx in terms]
        bool_masks = [BoolMask(n, a, fill, term_ops(n, ctx, cb, refs=refs)) for n, a, fill, ctx in masks]
    except LayoutError as exc:
        raise Miss(f"mask or bias layout not understood: {exc}") from None
    return {"q_scalars": q_scalars, "causal": causal, "additive": additive, "bool_masks": bool_masks}


def _escape(m: AttentionMatch, dag: nx.DiGraph, product: Node, softmax: Node, inplace: set,
            kept: str | None = None) -> AttentionMatch:
    """``m`` with its interior (the nodes the replacement makes dead) and why it must be kept, if it must."""
    pv = m.output
    region = (nx.descendants(dag, product) & nx.ancestors(dag, pv)) | {product} | inplace
    for operand in m.operands():
        if operand in region or operand is pv:
            raise Miss(f"{describe(operand)} feeds the attention and depends on its scores")
    order = dag.graph.get("order") or {n: i for i, n in enumerate(softmax.graph.nodes)}
    escape = kept
    for n in sorted(region, key=order.__getitem__) if escape is None else ():
        outside = [u for u in n.users if u not in region and u is not pv]
        if outside:
            what = "probabilities" if n is softmax or nx.has_path(dag, softmax, n) else "scores"
            escape = f"the {what} ({n.name}) are also used by {describe(outside[0])}"
            break
    return replace(m, interior=region, escape=escape)


def match(softmax: Node, dag: nx.DiGraph) -> AttentionMatch:
    """The attention site whose softmax is ``softmax``; raises :class:`Miss` with the reason if none.

    ``dag`` is the graph's data-flow DAG (nodes -> users), used for escape analysis. A softmax that is not plain
    attention is a :class:`Miss` whose reason names its kind (:func:`attnopt.patterns.special.diagnose`).
    """
    try:
        return _match(softmax, dag)
    except Miss as miss:
        raise Miss(diagnose(softmax, str(miss))) from None


def _match(softmax: Node, dag: nx.DiGraph) -> AttentionMatch:
    r = _read(softmax, _softmax_over_keys(softmax))
    ops, st = r.ops, r.scores
    sq, sk = shape_of(st.product)[-2:]
    ops, lead = _lead(ops)
    q, folded = fold_scalar(ops.q, r.folded)
    k, folded = fold_scalar(ops.k, folded)
    ops = replace(ops, q=q, k=k)
    # Run-time sizes for views that need a dynamic B or H: read off q when it is [B, H, S, D] as written.
    qs = shape(ops.q)
    refs = None
    if not ops.q_ops and qs is not None and len(qs) == 4 and same_shape(qs[:2], lead.cb):
        refs = (SizeOf(ops.q, 0), SizeOf(ops.q, 1))
    views = _views(ops, lead, refs)
    kv = _kv_heads(ops, views)
    scale = _scale(st, folded)
    masks = _masks(st, sq, sk, lead.cb, refs)
    info = {
        "heads": (as_int(views.heads[0]), as_int(kv.pop("hkv"))),
        "head_dims": (as_int(views.q_shape[-1]), as_int(views.v_shape[-1])),
        "seq": (as_int(sq), as_int(sk)),
        "batch": as_int(views.q_lead[0]),
        "layout": _layout_name(ops),
    }
    m = AttentionMatch(kind="manual", output=r.pv, q=ops.q, dropout_p=r.dropout_p,
                       q_ops=views.q_ops, out_ops=views.out_ops, info=info, **kv, **scale, **masks)  # fmt: skip
    m = replace(m, dead_writes=frozenset(st.writes))
    return _escape(m, dag, st.product, softmax, st.inplace, st.kept)


def _layout_name(ops: Operands) -> str:
    if ops.layout:
        return ops.layout
    qs = shape(ops.q)
    if qs is not None and len(qs) == 3:
        return "(B*H)SD"
    if qs is not None and len(qs) == 5:
        return "B,Hkv,G,S,D"
    t = tensor_meta(ops.q)
    return "BSHD" if t is not None and seq_major(t) else "BHSD"
