"""What a pattern found, in canonical form, and the one emitter that turns it into an attnopt op call.

Every pattern (SDPA call, manual softmax chain, ``nn.MultiheadAttention``) produces an
:class:`AttentionMatch` describing ``softmax(scale * Q Kᵀ + mask) V`` in terms of the original graph's
nodes. :func:`emit` writes the replacement into any graph, given a map from those original nodes to
nodes of that graph, so the same code serves the rewrite and the per-site validation.
"""

from __future__ import annotations

import copy
import math
import operator
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch.fx import Graph, Node

from attnopt.kernels.exact.reference import CAUSAL_BOTTOM_RIGHT, CAUSAL_NONE, CAUSAL_TOP_LEFT
from attnopt.ops import new_seed
from attnopt.patterns.canonical import tensor_meta

CAUSAL_NAMES = {CAUSAL_NONE: "none", CAUSAL_TOP_LEFT: "top-left", CAUSAL_BOTTOM_RIGHT: "bottom-right"}


@dataclass
class BoolMask:
    node: Any  # a Node (or constant tensor) holding the boolean mask
    attend_when: bool  # True: True means attend; False: True means masked out (masked_fill style)
    fill: float = -math.inf  # the score given to masked-out keys; a finite fill is kept exactly


@dataclass
class AttentionMatch:
    """``dropout(softmax(scale * q @ k^T + Σ additive + bool masks)) @ v`` in a graph.

    ``q`` is [..., Sq, D]; ``k`` is [..., Sk, D], or [..., D, Sk] when ``k_transposed``; ``v`` is
    [..., Sk, Dv]. ``additive`` holds ``(term, factor)`` pairs adding ``factor * term`` to the scaled
    scores. ``output`` is the node whose value the replacement provides; ``interior`` are the
    nodes the replacement makes dead (for escape analysis); ``escape`` says why it cannot be rewritten.
    """

    kind: str
    output: Node
    q: Any
    k: Any
    v: Any
    scale: float | None = None
    k_transposed: bool = False
    additive: list = field(default_factory=list)
    bool_masks: list[BoolMask] = field(default_factory=list)
    causal: int = CAUSAL_NONE
    dropout_p: float = 0.0
    interior: set = field(default_factory=set)
    escape: str | None = None
    custom_emit: Callable[[Graph, Callable[[Any], Any]], Node] | None = None
    extra_operands: list = field(default_factory=list)  # operands of a custom emitter
    info: dict = field(default_factory=dict)  # site facts a custom pattern states itself (heads, layout)

    def operands(self) -> list[Node]:
        """Nodes outside the match that the replacement reads."""
        if self.custom_emit is not None:
            return list(dict.fromkeys(self.extra_operands))
        vals = [self.q, self.k, self.v, *(t for t, _ in self.additive), *(m.node for m in self.bool_masks)]
        return [x for x in vals if isinstance(x, Node)]

    @property
    def mask_kind(self) -> str:
        kinds = (["bool"] if self.bool_masks else []) + (["additive"] if self.additive else [])
        return "+".join(kinds) or "none"


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


def emit(graph: Graph, m: AttentionMatch, lookup: Callable[[Any], Any]) -> Node:
    """Append the attnopt op call computing ``m`` to ``graph``; ``lookup`` maps original nodes to ``graph``'s."""
    if m.custom_emit is not None:
        return m.custom_emit(graph, lookup)
    q, k, v = lookup(m.q), lookup(m.k), lookup(m.v)
    if m.k_transposed:
        k = graph.call_method("transpose", (k, -2, -1))
    rank = len(_shape(m.q))
    if rank == 3:  # merged [B*H, S, D]: a batch of one with B*H heads
        q, k, v = (graph.call_method("unsqueeze", (t, 0)) for t in (q, k, v))

    terms = []
    for term, factor in m.additive:
        t = lookup(term)
        terms.append(t if factor == 1.0 else graph.call_function(operator.mul, (t, factor)))
    keep = None
    for bm in m.bool_masks:
        t = lookup(bm.node)
        if math.isfinite(bm.fill):  # scores + fill == fill in the masked places, exactly as the model wrote it
            terms.append(graph.call_function(torch.where, (t, 0.0, bm.fill) if bm.attend_when else (t, bm.fill, 0.0)))
            continue
        t = t if bm.attend_when else graph.call_function(operator.invert, (t,))
        keep = t if keep is None else graph.call_function(operator.and_, (keep, t))
    mask = None
    for t in terms:
        mask = t if mask is None else graph.call_function(operator.add, (mask, t))
    if keep is not None:
        mask = keep if mask is None else graph.call_function(torch.where, (keep, mask, -math.inf))

    seed = graph.call_function(new_seed, ()) if m.dropout_p > 0.0 else None
    scale = m.scale if m.scale is not None else 1.0 / math.sqrt(_shape(m.q)[-1])
    call = graph.call_function(
        torch.ops.attnopt.attention.default, (q, k, v, mask, float(m.dropout_p), int(m.causal), float(scale), seed)
    )
    out = graph.call_function(operator.getitem, (call, 0))
    if rank == 3:
        out = graph.call_method("squeeze", (out, 0))
    want = _dtype(m.output)
    if want is not None and want != _dtype(m.q):
        out = graph.call_method("to", (out, want))
    return out


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
