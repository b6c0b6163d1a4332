"""What a pattern found, in canonical form, and the one emitter that turns it into an attnopt op call.

Every pattern (SDPA call, manual softmax chain, ``nn.MultiheadAttention``) produces an
:class:`AttentionMatch` describing ``dropout(softmax(softcap(scale * Q Kᵀ) + bias + mask)) V`` in terms
of the original graph's nodes. The nodes are taken as the model wrote them; small *view programs*
(``q_ops``, ``k_ops``, ``v_ops``, each term's ``ops``) bring them to the canonical layout
``[B, H, S, D]`` (scores ``[B, H, Sq, Sk]``), and ``out_ops`` bring the op's output back to the layout of
the node it replaces. :func:`emit` writes the replacement into any graph, given a map from the original
nodes to nodes of that graph, so the same code serves the rewrite and the per-site validation.

Other variants (sparse, linear, ...) that replace a site can reuse the canonicalization:
:func:`emit_operands` writes the canonical operands and :func:`emit_output` the way back.
"""

from __future__ import annotations

import copy
import math
import operator
from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple

import torch
from torch.fx import Graph, Node

from attnopt.kernels.exact.reference import CAUSAL_BOTTOM_RIGHT, CAUSAL_NONE, CAUSAL_TOP_LEFT
from attnopt.kernels.exact.ops import new_seed
from attnopt.patterns.canonical import meta_value, tensor_meta

CAUSAL_NAMES = {CAUSAL_NONE: "none", CAUSAL_TOP_LEFT: "top-left", CAUSAL_BOTTOM_RIGHT: "bottom-right"}


class Miss(Exception):
    """Raised by a matcher: the candidate is not an attention site it can rewrite; the message is the reason."""


class SizeOf(NamedTuple):
    """``node.size(dim)`` evaluated when the replacement runs (a dynamic size in a view program)."""

    node: Any
    dim: int


# A view program: ((method name, args), ...) replayed with graph.call_method; args may hold SizeOf.
Ops = tuple


@dataclass
class ScalarExpr:
    """``const * Π node**power`` over Python-number nodes (e.g. a float dynamo made a graph input)."""

    const: float
    factors: tuple = ()  # ((node, power), ...), power ±1

    @property
    def value(self) -> float:
        """The value on the example inputs (symbolic numbers at their hints)."""
        out = self.const
        for n, power in self.factors:
            v = _number(n)
            out = out * v if power > 0 else out / v
        return float(out)

    def emit(self, graph: Graph, lookup: Callable[[Any], Any]) -> Any:
        return _scaled(graph, float(self.const), self.factors, lookup)


def _number(n: Any) -> float:
    """The example value of a Python-number node (a symbolic number at its hint)."""
    v = meta_value(n)
    if isinstance(v, (torch.SymInt, torch.SymFloat)):
        return float(v.node.hint) if v.node.has_hint() else float("nan")
    return float(v)


@dataclass
class Term:
    """``factor * Π scalars * node`` added to the scaled scores (a float mask or a bias).

    ``scalars`` are ``(node, power)`` pairs (power ±1) of tensors or Python-number nodes met above the
    term (e.g. ``(s + bias) / t``); ``ops`` bring the product to the canonical score layout.
    """

    node: Any
    factor: float = 1.0
    scalars: tuple = ()
    ops: Ops = ()


@dataclass(frozen=True)
class Region:
    """``node`` (a tensor or a number) written over ``index`` (basic indexing) of a tensor of ``shape`` that is
    0 (False) elsewhere: a bias or a mask that covers part of the scores (``attn[:, :, i:, i:] += rel``)."""

    node: Any
    shape: tuple
    index: tuple
    dtype: torch.dtype
    inner: tuple | None = None  # the region regrouped to this shape is where ``node`` broadcasts (None: the region)


def place_region(value: Any, like: torch.Tensor, shape: tuple, index: tuple, dtype: torch.dtype,
                 inner: tuple | None = None) -> torch.Tensor:
    """The tensor a :class:`Region` describes, on ``like``'s device (what the emitted graph runs)."""
    out = torch.zeros(shape, dtype=dtype, device=like.device)
    if inner is not None:
        value = torch.as_tensor(value, dtype=dtype, device=like.device).expand(inner).reshape(out[index].shape)
    out[index] = value
    return out


@dataclass
class BoolMask:
    node: Any  # a Node (or constant tensor) holding the boolean mask
    attend_when: bool  # True: True means attend; False: True means masked out (masked_fill style)
    fill: float = -math.inf  # the score given to masked-out keys; a finite fill is kept exactly
    ops: Ops = ()  # brings the mask to the canonical score layout


@dataclass(frozen=True)
class AttentionMatch:
    """``dropout(softmax(softcap(scale * q @ kᵀ) + Σ additive + bool masks)) @ v`` in a graph.

    ``q`` is [..., Sq, D]; ``k`` is [..., Sk, D], or [..., D, Sk] when ``k_transposed``; ``v`` is
    [..., Sk, Dv]; after ``q_ops``/``k_ops``/``v_ops`` they are [B, Hq, Sq, D], [B, Hkv, Sk, D],
    [B, Hkv, Sk, Dv] with Hq % Hkv == 0 (native GQA). ``additive`` holds :class:`Term` s. The scale is
    ``scale`` (or ``scale_expr`` when it is a graph value) with q multiplied by the tensors of ``q_scalars``;
    ``softcap`` likewise (``softcap_expr``).
    ``output`` is the node whose value the replacement provides (reached from the op's
    [B, Hq, Sq, Dv] through ``out_ops``); ``interior`` are the nodes the replacement makes dead (for
    escape analysis); ``escape`` says why it cannot be rewritten. A matcher builds it once (frozen;
    ``dataclasses.replace`` gives a changed copy).
    """

    kind: str
    output: Node
    q: Any
    k: Any
    v: Any
    scale: float | None = None
    k_transposed: bool = False
    additive: list[Term] = field(default_factory=list)
    bool_masks: list[BoolMask] = field(default_factory=list)
    causal: int = CAUSAL_NONE
    dropout_p: float = 0.0
    softcap: float | None = None
    q_ops: Ops = ()
    k_ops: Ops = ()
    v_ops: Ops = ()
    out_ops: Ops = ()
    scale_expr: ScalarExpr | None = None  # when set, the scale the emitter writes (``scale`` is its value)
    softcap_expr: ScalarExpr | None = None  # when set, the softcap the emitter writes
    q_scalars: tuple = ()  # ((node, power, ops), ...): tensor factors applied to the canonical q
    interior: set = field(default_factory=set)
    escape: str | None = None
    custom_emit: Callable[[Graph, Callable[[Any], Any]], Node] | None = None
    extra_operands: list = field(default_factory=list)  # operands of a custom emitter
    info: dict = field(default_factory=dict)  # site facts for the report (heads, head_dims, seq, batch, layout)
    # In-place writes into the site's own scores (``attn[..., :n] = -inf``): read into the bias and masks above,
    # they write nothing else, so the replacement makes them dead although they write.
    dead_writes: frozenset = frozenset()

    def operands(self) -> list[Node]:
        """Nodes outside the match that the replacement reads."""
        if self.custom_emit is not None:
            return list(dict.fromkeys(self.extra_operands))
        vals = [self.q, self.k, self.v]
        for t in self.additive:
            vals += [_unplaced(t.node), *(n for n, _ in t.scalars), *_op_refs(t.ops)]
        for bm in self.bool_masks:
            vals += [_unplaced(bm.node), *_op_refs(bm.ops)]
        for expr in (self.scale_expr, self.softcap_expr):
            vals += [n for n, _ in expr.factors] if expr is not None else []
        for n, _, ops in self.q_scalars:
            vals += [n, *_op_refs(ops)]
        for ops in (self.q_ops, self.k_ops, self.v_ops, self.out_ops):
            vals += _op_refs(ops)
        return list(dict.fromkeys(x for x in vals if isinstance(x, Node)))

    @property
    def mask_kind(self) -> str:
        kinds = (["bool"] if self.bool_masks else []) + (["additive"] if self.additive else [])
        return "+".join(kinds) or "none"


def _unplaced(x: Any) -> Any:
    return x.node if isinstance(x, Region) else x


def _term_value(graph: Graph, x: Any, m: AttentionMatch, lookup: Callable[[Any], Any]) -> Any:
    """A term or mask operand in ``graph``: the node, or the :class:`Region` tensor built next to q."""
    if isinstance(x, Region):
        return graph.call_function(place_region, (lookup(x.node), lookup(m.q), x.shape, x.index, x.dtype, x.inner))
    return lookup(x)


def _op_refs(ops: Ops) -> list:
    refs = []

    def walk(a):
        if isinstance(a, SizeOf):
            refs.append(a.node)
        elif isinstance(a, (tuple, list)):
            for b in a:
                walk(b)

    for _, args in ops:
        walk(args)
    return refs


def copy_graph(graph: Graph) -> tuple[Graph, dict[Node, Node]]:
    """A copy of ``graph`` (node meta shared shallowly) and the map from its nodes to the copy's."""
    new = Graph(tracer_cls=graph._tracer_cls)
    env: dict[Node, Node] = {}
    output_val, old_output = new.graph_copy(graph, val_map=env, return_output_node=True)
    new._codegen = copy.deepcopy(graph._codegen)
    out = new.output(output_val, type_expr=getattr(old_output, "type", None))
    out.meta = copy.copy(old_output.meta)
    env[old_output] = out
    return new, env


def _shape(x: Any) -> tuple | None:
    t = tensor_meta(x)
    return tuple(t.shape) if t is not None else None


def _dtype(x: Any) -> torch.dtype | None:
    t = tensor_meta(x)
    return t.dtype if t is not None else None


def apply_ops(graph: Graph, x: Any, ops: Ops, lookup: Callable[[Any], Any]) -> Any:
    """Replays the view program ``ops`` on ``x`` (a node of ``graph``)."""

    def resolve(a):
        if isinstance(a, SizeOf):
            return graph.call_method("size", (lookup(a.node), a.dim))
        if isinstance(a, tuple):
            return tuple(resolve(b) for b in a)
        if isinstance(a, list):
            return [resolve(b) for b in a]
        return a

    for name, args in ops:
        x = graph.call_method(name, (x, *resolve(tuple(args))))
    return x


def _scaled(graph: Graph, x: Any, scalars: tuple, lookup) -> Any:
    for n, power in scalars:
        x = graph.call_function(operator.mul if power > 0 else operator.truediv, (x, lookup(n)))
    return x


@dataclass
class CanonicalCall:
    """The operands of one exact attention call, written into a graph (SDPA layout and semantics)."""

    q: Node  # [B, Hq, Sq, D]
    k: Node  # [B, Hkv, Sk, D]
    v: Node  # [B, Hkv, Sk, Dv]
    mask: Node | None  # broadcasts to [B, Hq, Sq, Sk]; bool (True = attend) or additive
    dropout_p: float
    causal: int
    scale: Any  # a float or a node computing a Python float
    softcap: Any  # 0.0 = none; a float or a node computing one


def _fill_dtype(fill: float) -> torch.dtype:
    return torch.float64 if math.isfinite(fill) and abs(fill) > torch.finfo(torch.float32).max else torch.float32


def emit_mask(graph: Graph, m: AttentionMatch, lookup: Callable[[Any], Any]) -> Node | None:
    """The combined mask of ``m`` in the canonical layout: bool (True = attend) or additive float."""
    floats = []
    for t in m.additive:
        x = _scaled(graph, _term_value(graph, t.node, m, lookup), t.scalars, lookup)
        if t.factor != 1.0:
            x = graph.call_function(operator.mul, (x, t.factor))
        floats.append(apply_ops(graph, x, t.ops, lookup))
    keep, finite = None, []
    for bm in m.bool_masks:
        t = apply_ops(graph, _term_value(graph, bm.node, m, lookup), bm.ops, lookup)
        t = t if bm.attend_when else graph.call_function(operator.invert, (t,))
        if math.isfinite(bm.fill):
            finite.append((t, bm.fill))
        else:
            keep = t if keep is None else graph.call_function(operator.and_, (keep, t))
    if finite:
        # bool_masks are listed outermost first: the outermost fill wins where several masks mask a key,
        # and each masked key gets its fill once (as the model's masked_fill/where chain gives it).
        expr: Any = 0.0
        for t, fill in reversed(finite):
            if isinstance(expr, float):
                zero = graph.call_function(torch.zeros, ((),), {"dtype": _fill_dtype(fill)})
                expr = graph.call_function(torch.where, (t, zero, fill))
            else:
                expr = graph.call_function(torch.where, (t, expr, fill))
        floats.append(expr)
    mask = None
    for t in floats:
        mask = t if mask is None else graph.call_function(operator.add, (mask, t))
    if keep is not None:
        mask = keep if mask is None else graph.call_function(torch.where, (keep, mask, -math.inf))
    return mask


def emit_operands(graph: Graph, m: AttentionMatch, lookup: Callable[[Any], Any]) -> CanonicalCall:
    """Writes the canonical operands of ``m`` into ``graph`` (not for ``custom_emit`` matches)."""
    if m.custom_emit is not None:
        raise ValueError(f"a {m.kind!r} match has its own emitter; it has no canonical operands")
    q0, k, v = lookup(m.q), lookup(m.k), lookup(m.v)
    if m.k_transposed:
        k = graph.call_method("transpose", (k, -2, -1))
    q = apply_ops(graph, q0, m.q_ops, lookup)
    k = apply_ops(graph, k, m.k_ops, lookup)
    v = apply_ops(graph, v, m.v_ops, lookup)
    if m.q_scalars:
        for n, power, ops in m.q_scalars:
            t = apply_ops(graph, lookup(n), ops, lookup)
            q = graph.call_function(operator.mul if power > 0 else operator.truediv, (q, t))
        q = graph.call_method("type_as", (q, q0))
    if m.scale_expr is not None:
        scale: Any = m.scale_expr.emit(graph, lookup)
    elif m.scale is not None:
        scale = float(m.scale)
    else:
        d = _shape(m.q)[-1]
        scale = 1.0 / math.sqrt(d) if isinstance(d, int) else graph.call_function(
            operator.pow, (graph.call_method("size", (q, -1)), -0.5))
    softcap = m.softcap_expr.emit(graph, lookup) if m.softcap_expr is not None else float(m.softcap or 0.0)
    return CanonicalCall(q, k, v, emit_mask(graph, m, lookup), float(m.dropout_p), int(m.causal), scale, softcap)


def emit_output(graph: Graph, m: AttentionMatch, out: Node) -> Node:
    """Brings the canonical [B, Hq, Sq, Dv] result ``out`` to the layout and dtype of ``m.output``."""
    out = apply_ops(graph, out, m.out_ops, lambda x: x)
    want = _dtype(m.output)
    if want is not None and want != _dtype(m.q):
        out = graph.call_method("to", (out, want))
    return out


def emit(graph: Graph, m: AttentionMatch, lookup: Callable[[Any], Any]) -> Node:
    """Append the attnopt op call computing ``m`` to ``graph``; ``lookup`` maps original nodes to ``graph``'s."""
    if m.custom_emit is not None:
        return m.custom_emit(graph, lookup)
    c = emit_operands(graph, m, lookup)
    seed = graph.call_function(new_seed, ()) if c.dropout_p > 0.0 else None
    args = (c.q, c.k, c.v, c.mask, c.dropout_p, c.causal, c.scale, seed)
    if not (isinstance(c.softcap, float) and c.softcap == 0.0):
        # torch.ops.attnopt.attention(q, k, v, attn_mask, dropout_p, causal, scale, seed, softcap): the
        # scaled scores become softcap * tanh(scores / softcap) before the mask is added.
        args = args + (c.softcap,)
    call = graph.call_function(torch.ops.attnopt.attention.default, args)
    return emit_output(graph, m, graph.call_function(operator.getitem, (call, 0)))


def replacement_graph(m: AttentionMatch, emitter: Callable | None = None) -> tuple[torch.fx.GraphModule, list[Node]]:
    """A standalone GraphModule computing ``m`` from its operands (used to validate one site).

    ``emitter`` writes the replacement (default: :func:`emit`, the exact op call).
    """
    g = Graph()
    operands = m.operands()
    env = {n: g.placeholder(f"in_{i}") for i, n in enumerate(operands)}
    out = (emitter or emit)(g, m, lambda x: env.get(x, x))
    g.output(out)
    return torch.fx.GraphModule(torch.nn.Module(), g), operands


def original_graph(m: AttentionMatch, root: torch.nn.Module) -> tuple[torch.fx.GraphModule, list[Node]] | None:
    """The site as the model wrote it, standalone: the nodes between ``m``'s operands and its output, copied into
    a GraphModule over ``root`` (the graph's module: it holds what ``get_attr`` nodes read), taking the
    operands :func:`replacement_graph` takes. None when the site also reads a graph input the replacement does
    not read (it cannot run alone)."""
    operands = m.operands()
    order = {n: i for i, n in enumerate(m.output.graph.nodes)}
    body, todo = set(), [m.output]
    while todo:
        n = todo.pop()
        if n in body or n in operands:
            continue
        if n.op == "placeholder":
            return None
        body.add(n)
        todo.extend(n.all_input_nodes)
    g = Graph()
    env = {n: g.placeholder(f"in_{i}") for i, n in enumerate(operands)}
    for n in sorted(body, key=order.__getitem__):
        env[n] = g.node_copy(n, env.__getitem__)
    g.output(env[m.output])
    return torch.fx.GraphModule(root, g), operands
