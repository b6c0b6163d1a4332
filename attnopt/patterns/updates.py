"""In-place updates of the scores, read as what they add or mask.

Vision models change their scores in place: ``attn[:, :, i:, i:] += rel_pos`` (a bias over a region),
``attn[..., :n] = float("-inf")`` (a mask over a region), ``attn.masked_fill_(m, -inf)``. Dynamo records
such a statement as a view of the scores (``getitem``), an in-place op on it (``iadd``, ``add_``,
``masked_fill_``) and a ``setitem`` writing it back, or a ``setitem`` of a new value; the softmax then reads
the scores node itself. :func:`find_updates` collects these statements on one node of the score path, in
graph order, as :class:`Event` s: an addition over a region is a bias that is zero elsewhere, an assignment of
-inf or a large negative number over a region is a mask. Any other change (a scaling of a region, an
assignment of a tensor) is not equivalent to either: the site is kept, with that reason.

Updates are read only on a tensor the scores computation allocated (a product or an arithmetic result), so
the writes touch nothing but the site's own scores and die with it (:attr:`Updates.writes`).
"""

from __future__ import annotations

import operator
from typing import Any, NamedTuple

import torch
from torch.fx import Node

from attnopt.patterns.canonical import (ADD, BADDBMM, CAST, CLAMP_MIN, DIV, EINSUM, EXPAND, MASKED_FILL, MATMUL, MUL,
                                        NEG, PERMUTE, RESHAPE, SUB, TANH, TRANSPOSE, WHERE, classify, shape,
                                        tensor_meta)  # fmt: skip
from attnopt.patterns.causal import mask_fill
from attnopt.patterns.operands import describe, value_users

# Ops whose result is a tensor of their own (never a view of an input): their scores may be updated in place.
_FRESH = {MATMUL, EINSUM, BADDBMM, MUL, DIV, ADD, SUB, NEG, MASKED_FILL, WHERE, TANH, CLAMP_MIN}
# Ops whose result may share its input's memory: fresh when the input is and nothing else reads the input.
_VIEWS = {RESHAPE, CAST, TRANSPOSE, PERMUTE, EXPAND}


class Event(NamedTuple):
    """One change of the scores: ``kind`` "add" (``value`` times ``sign`` added over the region) or "mask"
    (the region, where ``value`` is True or everywhere when ``value`` is None, set to ``fill``).
    ``index`` is the region (basic indexing), None for the whole tensor; ``at`` the node making the change;
    ``inner`` the shape the value is added in when the region is regrouped for it (``region.view(..) + t``)."""

    kind: str
    value: Any
    index: tuple | None
    sign: float
    fill: float | None
    at: Node
    inner: tuple | None = None


class Updates(NamedTuple):
    events: list  # in graph order
    nodes: set  # every node of the update statements (they die with the site)
    writes: set  # the nodes among them that write (in-place ops, setitem): only into the site's scores
    reason: str | None  # why the updates are neither a bias nor a mask (the site is then kept)


def is_basic_index(idx: Any) -> bool:
    """Slices of ints, ints and Ellipsis: a region every element of which is written once."""
    idx = idx if isinstance(idx, tuple) else (idx,)
    for i in idx:
        if isinstance(i, slice):
            if not all(p is None or (isinstance(p, int) and not isinstance(p, bool)) for p in (i.start, i.stop, i.step)):
                return False
        elif not (i is Ellipsis or (isinstance(i, int) and not isinstance(i, bool))):
            return False
    return True


def _setitem_of(u: Node, x: Node) -> bool:
    return u.op == "call_function" and u.target is operator.setitem and len(u.args) == 3 and u.args[0] is x


def _view_of(u: Node, x: Node) -> bool:
    return (u.op == "call_function" and u.target is operator.getitem and len(u.args) == 2 and u.args[0] is x
            and isinstance(tensor_meta(u), torch.Tensor))  # fmt: skip


def _inplace_on(u: Node, x: Node) -> bool:
    if u.op == "call_method" and u.target in ("fill_", "zero_", "copy_", "clamp_", "exp_", "mul_", "div_") \
            and u.args and u.args[0] is x:
        return True
    op = classify(u)
    return op is not None and bool(op.attrs.get("inplace")) and bool(op.inputs) and op.inputs[0] is x


def _mutates(v: Node) -> bool:
    """Whether a view ``v`` of the scores is written through."""
    return any(_inplace_on(w, v) for w in v.users)


class _Reader:
    """Collects the update statements on one node ``x``."""

    def __init__(self, x: Node):
        self.x = x
        self.events: list[Event] = []
        self.nodes: set = set()
        self.writes: set = set()
        self.reason: str | None = None
        self.written_back: dict = {}  # in-place result on a view -> the view's index
        self.sums: dict = {}  # setitem -> the terms it adds over its region
        self.chains: set = set()  # the nodes computing those sums

    def refuse(self, reason: str) -> None:
        self.reason = self.reason or reason

    def inplace(self, w: Node, index: tuple | None) -> None:
        """``w`` changes the scores (or the region ``index`` of them) in place."""
        self.nodes.add(w)
        self.writes.add(w)
        op = classify(w)
        kind = op.kind if op is not None and op.attrs.get("inplace") else None
        if kind in (ADD, SUB):
            self.events.append(Event("add", op.inputs[1], index, -1.0 if kind == SUB else 1.0, None, w))
        elif kind == MASKED_FILL and mask_fill(op.inputs[2]) is not None:
            self.events.append(Event("mask", op.inputs[1], index, 1.0, mask_fill(op.inputs[2]), w))
        elif w.op == "call_method" and w.target == "fill_" and len(w.args) == 2 and mask_fill(w.args[1]) is not None:
            self.events.append(Event("mask", None, index, 1.0, mask_fill(w.args[1]), w))
        else:
            self.refuse(f"{describe(w)} changes the scores in place, neither adding a bias nor filling a mask")
        if index is not None:
            self.written_back[w] = index

    def view(self, v: Node) -> None:
        idx = v.args[1]
        self.nodes.add(v)
        if not is_basic_index(idx):
            self.refuse(f"the scores are written through {describe(v)}, an index that is not slices and integers")
        for w in v.users:
            if _inplace_on(w, v):
                self.inplace(w, idx)
            elif w not in self.chains:
                self.refuse(f"the region {idx} of the scores ({describe(v)}) is also read by {describe(w)}")

    def sum_chain(self, u: Node) -> None:
        """Reads ``x[idx] = view(x[idx] ± t1 ± t2 ..)`` (views regrouping the region between the additions): the
        terms, each with the shape it is added in, into ``self.sums[u]``; its nodes into ``self.chains``."""
        idx, n = u.args[1], u.args[2]
        terms, nodes, sign = [], set(), 1.0
        for _ in range(16):
            if not isinstance(n, Node) or (n is not u.args[2] and len(value_users(n)) != 1):
                return
            if _view_of(n, self.x) and n.args[1] == idx:
                if terms:
                    self.sums[u] = terms
                    self.chains |= nodes | {n}
                return
            op = classify(n)
            if op is None or op.attrs.get("inplace") or op.kind not in (RESHAPE, ADD, SUB):
                return
            nodes.add(n)
            if op.kind == RESHAPE:
                n = op.inputs[0]
                continue
            a, b = op.inputs
            if op.kind == SUB and _depends_on(b, self.x):
                return
            chain, t = (a, b) if _depends_on(a, self.x) else (b, a)
            if _depends_on(t, self.x) or shape(chain) != shape(n):
                return
            terms.append((t, sign * (-1.0 if op.kind == SUB and t is b else 1.0), tuple(shape(n))))
            n = chain

    def setitem(self, u: Node) -> None:
        idx, val = u.args[1], u.args[2]
        self.nodes.add(u)
        self.writes.add(u)
        if not is_basic_index(idx):
            self.refuse(f"{describe(u)} writes the scores at an index that is not slices and integers")
        elif isinstance(val, Node) and self.written_back.get(val, None) == idx:
            return  # the in-place result written back onto itself
        elif u in self.sums:
            for t, sign, inner in self.sums[u]:
                self.events.append(Event("add", t, idx, sign, None, u, inner))
            self.nodes |= self.chains
        elif mask_fill(val) is not None:
            self.events.append(Event("mask", None, idx, 1.0, mask_fill(val), u))
        else:
            what = describe(val)
            self.refuse(f"{describe(u)} assigns {what} to a region of the scores, neither adding a bias nor a mask fill")


def _depends_on(value: Any, x: Node, limit: int = 512) -> bool:
    """Whether ``x`` is among the inputs of ``value``. Only nodes after ``x`` in the graph can be computed from
    it, so the search stays between the two (a search that does not finish counts as yes)."""
    if value is x:
        return True
    seen, stack = set(), [value] if isinstance(value, Node) and value > x else []
    while stack:
        n = stack.pop()
        if len(seen) > limit:
            return True
        if n not in seen:
            seen.add(n)
            stack.extend(a for a in n.all_input_nodes if a is x or a > x)
        if x in n.all_input_nodes:
            return True
    return False


def is_fresh(x: Any) -> bool:
    """Whether ``x`` is a tensor of its own: an op result that is not a view, or the in-place result or a view
    of one that nothing else reads."""
    for _ in range(16):
        op = classify(x)
        if op is None or op.kind not in _FRESH | _VIEWS:
            return False
        if op.kind in _FRESH and not op.attrs.get("inplace"):
            return True
        x = op.inputs[0]
        if not isinstance(x, Node) or len(x.users) != 1:
            return False
    return False


def find_updates(x: Any, reader: Node) -> Updates | None:
    """The in-place updates of ``x`` made before ``reader`` (the next node of the score path) reads it; None
    when there are none."""
    if not isinstance(x, Node):
        return None
    statements = [u for u in x.users if u is not reader and (
        _setitem_of(u, x) or _inplace_on(u, x) or (_view_of(u, x) and _mutates(u)))]  # fmt: skip
    if not statements:
        return None
    r = _Reader(x)
    for u in statements:
        if _setitem_of(u, x):
            r.sum_chain(u)
    for u in sorted(statements):
        if _setitem_of(u, x):
            r.setitem(u)
        elif _inplace_on(u, x):
            r.inplace(u, None)
        else:
            r.view(u)
    if not is_fresh(x):
        r.refuse(f"the scores changed in place ({describe(x)}) may be a view of another tensor")
    for ev in r.events:
        if _depends_on(ev.value, x):
            r.refuse(f"{describe(ev.at)} changes the scores by a value computed from the scores themselves")
    late = [n for n in r.writes if n > reader]
    if late:
        r.refuse(f"the scores are changed in place by {describe(min(late))} after {describe(reader)} reads them")
    return Updates(sorted(r.events, key=lambda e: e.at), r.nodes, r.writes, r.reason)
