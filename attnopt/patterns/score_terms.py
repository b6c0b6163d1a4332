"""Additive score terms read inside the kernel (a traced score_mod) instead of summed into a mask tensor.

The exact op takes one additive mask: a site with several terms (Bloom: ALiBi ``[B·H, 1, Sk]`` and the padding
mask ``[B, 1, Sq, Sk]``; T5: the position bias and the mask) would add them into a ``[B, H, Sq, Sk]`` tensor. With
:func:`with_score_terms` the site instead runs ``torch.ops.attnopt.score_mod_attention`` whose expression reads
each term at ``(b, h, q_idx, kv_idx)`` through its broadcast strides (:mod:`attnopt.kernels.exact.score_mod`), so
the site allocates nothing of size ``Sq · Sk``. It applies to sites with one of these terms (table rows):

* **a per-head key bias** (ALiBi as Bloom computes it, ``[B·H, 1, Sk]``) beside another term: read as it is;

* **T5's relative position bias** ``embedding(bucket(arange(Sk)[None, :] - arange(Sq)[:, None]), W)
  .permute(2, 0, 1).unsqueeze(0)``: the expression computes ``W[bucket(kv_idx - q_idx), h]`` (the bucket
  function is the model's own subgraph, traced), so the model's ``[1, H, Sq, Sk]`` bias is never built;
* **a zero bias** ``torch.zeros(...)`` (T5's cross-attention "position bias"): dropped, never built.

The other terms of such a site are read as they are. Other sites keep the plain emission (and stay open to the
other variants, which take the canonical operands), as does a site with bool masks, dropout, softcap, a
graph-valued scale or scalars on a term, or a term the tracer cannot follow.
"""

from __future__ import annotations

import dataclasses
import operator

import torch
from torch.fx import Graph, GraphModule, Node

from attnopt.kernels.exact.score_mod import OP
from attnopt.kernels.exact.score_trace import ScoreModError, trace
from attnopt.patterns.canonical import tensor_meta
from attnopt.patterns.match import AttentionMatch, Term, apply_ops, emit_operands, emit_output


def _is_zeros(term: Term) -> bool:
    node = term.node
    return isinstance(node, Node) and node.op == "call_function" and node.target is torch.zeros and not (
        set(node.kwargs) - {"dtype", "device"})


def _is_key_bias(term: Term) -> bool:
    """A bias of one row per head, ``[..., H > 1, 1, Sk > 1]`` (ALiBi, Bloom's ``[B·H, 1, Sk]``)."""
    meta = tensor_meta(term.node)
    shape = tuple(meta.shape) if meta is not None else ()
    return len(shape) >= 3 and shape[-2] == 1 and shape[-1] != 1 and shape[-3] != 1


def _t5_table(term: Term):
    """``(W node, bucket GraphModule of the relative position)`` when ``term`` is T5's position bias, else None."""
    node = term.node
    if term.factor != 1.0 or term.scalars or term.ops or not isinstance(node, Node):
        return None
    if not (node.op == "call_method" and node.target == "unsqueeze" and tuple(node.args[1:]) == (0,)):
        return None
    perm = node.args[0]
    if not (isinstance(perm, Node) and perm.target == "permute" and _dims(perm.args[1:]) == (2, 0, 1)):
        return None
    emb = perm.args[0]
    if not (isinstance(emb, Node) and emb.target is torch.nn.functional.embedding and len(emb.args) >= 2):
        return None
    buckets, weight = emb.args[0], emb.args[1]
    rel = next((n for n in _ancestors(buckets) if _is_relative_position(n)), None)
    return None if rel is None else (weight, _subgraph(rel, buckets))


def _dims(args) -> tuple:
    return tuple(args[0]) if len(args) == 1 and isinstance(args[0], (list, tuple)) else tuple(args)


def _ancestors(node: Node) -> list[Node]:
    seen, todo = [], [node]
    while todo:
        n = todo.pop()
        if isinstance(n, Node) and n not in seen:
            seen.append(n)
            todo.extend(n.all_input_nodes)
    return seen


def _arange_view(node, index) -> bool:
    """``arange(n)[index]`` (start 0, step 1), possibly ``+ 0``."""
    if isinstance(node, Node) and node.target is operator.add and node.args[1] == 0:
        node = node.args[0]
    if not (isinstance(node, Node) and node.target is operator.getitem and node.args[1] == index):
        return False
    src = node.args[0]
    return isinstance(src, Node) and src.target is torch.arange and len(src.args) == 1 and not (
        set(src.kwargs) - {"dtype", "device"})


def _is_relative_position(node: Node) -> bool:
    """``arange(Sk)[None, :] - arange(Sq)[:, None]``: ``kv_idx - q_idx``."""
    full = slice(None, None, None)
    return (node.target is operator.sub and _arange_view(node.args[0], (None, full))
            and _arange_view(node.args[1], (full, None)))


def _subgraph(start: Node, end: Node) -> GraphModule:
    """The nodes computing ``end`` from ``start`` as a function of it; ScoreModError if they read anything else."""
    inside = [n for n in _ancestors(end) if start in _ancestors(n) and n is not start]
    order = {n: i for i, n in enumerate(end.graph.nodes)}
    g = Graph()
    env = {start: g.placeholder("relative_position")}
    for n in sorted(inside, key=order.__getitem__):
        if any(a not in env for a in n.all_input_nodes):
            raise ScoreModError(f"the bucket function reads {n.all_input_nodes}, not only the relative position")
        env[n] = g.node_copy(n, env.__getitem__)
    g.output(env[end])
    return GraphModule(torch.nn.Module(), g)


def _eligible(m: AttentionMatch) -> bool:
    return (m.custom_emit is None and m.escape is None and len(m.additive) >= 1 and not m.bool_masks
            and m.dropout_p == 0.0 and not m.softcap and m.softcap_expr is None and m.scale_expr is None
            and not m.q_scalars and all(not t.scalars for t in m.additive))


def with_score_terms(m: AttentionMatch) -> AttentionMatch:
    """``m`` emitting through a score_mod that reads its additive terms (see the module docstring), or ``m``."""
    if not _eligible(m):
        return m
    tables = [_t5_table(t) for t in m.additive]
    tables = [("zeros", None) if table is None and _is_zeros(t) else table for t, table in zip(m.additive, tables)]
    key_bias = len(m.additive) >= 2 and any(_is_key_bias(t) for t in m.additive)
    if not key_bias and not any(tables):
        return m
    try:
        return _rewritten(m, tables)
    except (ScoreModError, RuntimeError, TypeError, ValueError, AttributeError):
        return m  # a term the tracer cannot follow: the plain emission


def _rewritten(m: AttentionMatch, tables: list) -> AttentionMatch:
    stand_ins: list[tuple[torch.Tensor, object]] = []  # (tensor the trace sees, what the emitter passes)
    parts = []
    for term, table in zip(m.additive, tables):
        if table is not None and table[0] == "zeros":
            continue  # adds nothing
        if table is not None:
            weight, bucket = table
            meta = tensor_meta(weight)
            w = torch.zeros(tuple(meta.shape), dtype=meta.dtype)
            stand_ins.append((w, ("node", weight)))
            parts.append(("table", w, bucket))
        else:
            t = torch.zeros(1, dtype=tensor_meta(term.node).dtype).expand(1, 1, 1, 1)  # only dtype and rank matter
            stand_ins.append((t, ("term", term)))
            parts.append(("term", t, term.factor))

    def score_mod(score, b, h, q_idx, kv_idx):
        for kind, t, extra in parts:
            if kind == "table":
                score = score + t[extra((kv_idx - q_idx).to(torch.int64)), h]
            else:
                score = score + t[b, h, q_idx, kv_idx] * extra
        return score

    traced = trace(score_mod)
    sources = [next(src for t, src in stand_ins if t is buf) for buf in traced.buffers]
    text = traced.expr.text()
    kept = [t for t, table in zip(m.additive, tables) if table is None]
    operands = dataclasses.replace(m, additive=kept).operands()
    operands += [src[1] for src in sources if src[0] == "node"]

    def custom_emit(graph: Graph, lookup) -> Node:
        c = emit_operands(graph, dataclasses.replace(m, additive=[]), lookup)
        sizes = [graph.call_method("size", (c.q, d)) for d in range(3)] + [graph.call_method("size", (c.k, 2))]
        buffers = []
        for kind, payload in sources:
            if kind == "node":
                buffers.append(lookup(payload))
            else:  # the term in the canonical layout, broadcast by strides (a view: no copy)
                buffers.append(graph.call_method("expand", (apply_ops(graph, lookup(payload.node), payload.ops,
                                                                      lookup), *sizes)))
        call = graph.call_function(OP,
                                   (c.q, c.k, c.v, text, buffers, c.scale, c.causal))
        return emit_output(graph, m, graph.call_function(operator.getitem, (call, 0)))

    return dataclasses.replace(m, custom_emit=custom_emit, extra_operands=list(dict.fromkeys(operands)))
