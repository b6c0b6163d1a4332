"""What a softmax that is not plain attention is: the reason a miss gives names the known kinds.

Vision models use softmaxes that look like attention but compute something else, and attnopt never rewrites
them; the report says which kind each is (read from the graph around the softmax, once the matcher has
refused it):

* *talking heads*: the scores or the probabilities are mixed across heads (a permute that moves the heads
  into the last dims, an einsum or a product over them) before or after the softmax;
* *gated* (gated positional attention): the probabilities are combined with another softmax's output;
* *separable*: a softmax over a context-score vector, reduced by a weighted sum (no query-key scores);
* *factorized*: a softmax over the keys (or queries) alone, multiplied with the values before the queries;
* *outlook*: attention weights projected from the input, multiplied by the values, with no query-key scores.
"""

from __future__ import annotations

from typing import Callable

from torch.fx import Node

from attnopt.patterns.canonical import (ADD, CAST, DROPOUT, EINSUM, EXPAND, MATMUL, MUL, PERMUTE, RESHAPE, SOFTMAX,
                                        SUB, TRANSPOSE, classify, ndim)  # fmt: skip
from attnopt.patterns.match import Miss
from attnopt.patterns.operands import describe
from attnopt.patterns.products import einsum_letters, qk_operands

_DEPTH = 8
_PASS = (CAST, DROPOUT, RESHAPE, EXPAND)


def _forward(softmax: Node, through=_PASS) -> list[Node]:
    """The nodes reading the probabilities, past casts, dropout and views."""
    out, frontier = [], [softmax]
    for _ in range(_DEPTH):
        nxt = []
        for n in frontier:
            for u in n.users:
                op = classify(u)
                (nxt if op is not None and op.kind in through and n in op.inputs else out).append(u)
        frontier = nxt
    return out


def _ancestors(x, depth: int = _DEPTH, limit: int = 256) -> list[Node]:
    """The nodes up to ``depth`` steps above ``x`` (at most ``limit`` of them), nearest first."""
    seen: dict = {}
    frontier = [x] if isinstance(x, Node) else []
    for _ in range(depth):
        nxt = []
        for n in frontier:
            if n not in seen and len(seen) < limit:
                seen[n] = None
                nxt.extend(n.all_input_nodes)
        frontier = nxt
    return list(seen)


def _is_scores_product(n: Node) -> bool:
    op = classify(n)
    if op is None or op.kind not in (MATMUL, EINSUM):
        return False
    try:
        read = qk_operands(n)
    except (Miss, IndexError, KeyError, ValueError):
        return False
    return not read.get("k_transposed") and all(isinstance(read[x], Node) and read[x].op != "get_attr"
                                                for x in ("q", "k"))  # fmt: skip


def _mixes_heads(n: Node) -> bool:
    """A permute moving a leading (head) dim last (for a linear over the heads), or an einsum renaming or
    contracting one."""
    op = classify(n)
    if op is not None and op.kind == PERMUTE:
        rank = len(op.attrs["dims"])
        return op.attrs["dims"][-1] < rank - 2
    if op is not None and op.kind == EINSUM and len(op.inputs) == 2:
        parsed = einsum_letters(op.attrs["equation"], [ndim(x) or 0 for x in op.inputs])
        if parsed is None:
            return False
        (la, lb), lo = parsed
        return any(c not in lo for c in la[:-2]) or any(c not in lo for c in lb[:-2])
    return False


def _gated(softmax: Node) -> str | None:
    for u in _forward(softmax, _PASS + (MUL,)):
        op = classify(u)
        if op is None or op.kind not in (ADD, SUB, MUL):
            continue
        others = [x for x in op.inputs if isinstance(x, Node) and softmax not in _ancestors(x)]
        if any(classify(a) is not None and classify(a).kind == SOFTMAX for o in others for a in _ancestors(o)):
            return f"two softmaxes gated together (gated positional attention): {describe(u)} mixes them"
    return None


def _talking_heads(softmax: Node) -> str | None:
    for u in _forward(softmax):
        if _mixes_heads(u):
            return f"talking-heads attention: the probabilities are mixed across heads by {describe(u)}"
    below = _ancestors(classify(softmax).inputs[0])
    if any(_is_scores_product(n) for n in below):
        for n in below:
            if _mixes_heads(n):
                return f"talking-heads attention: the scores are mixed across heads by {describe(n)}"
    return None


def _separable(softmax: Node) -> str | None:
    dim = classify(softmax).attrs["dim"]
    for u in _forward(softmax):
        op = classify(u)
        if op is None or op.kind != MUL:
            continue
        for r in u.users:
            if r.target in ("sum", "mean") or getattr(r.target, "__name__", "") in ("sum", "mean"):
                return (f"separable attention: a softmax over a context-score vector (dim {dim}), reduced by the "
                        f"weighted sum {describe(r)}; there are no query-key scores")  # fmt: skip
    return None


def _factorized_or_outlook(softmax: Node) -> str | None:
    op = classify(softmax)
    if any(_is_scores_product(n) for n in _ancestors(op.inputs[0])):
        return None
    users = _forward(softmax, _PASS + (TRANSPOSE,))
    products = [u for u in users if classify(u) is not None and classify(u).kind in (MATMUL, EINSUM)]
    if not products:
        return None
    rank = op.attrs["rank"]
    other_softmax = any(classify(a) is not None and classify(a).kind == SOFTMAX and a is not softmax
                        for p in products for x in p.all_input_nodes for a in _ancestors(x, 4))  # fmt: skip
    if op.attrs["dim"] != (rank or 0) - 1 or other_softmax or any(_feeds_product(p) for p in products):
        return (f"factorized attention: a softmax over the keys (or queries) alone (dim {op.attrs['dim']}), "
                "multiplied with the values before the queries; there are no query-key scores")
    pooled = [p for p in products if classify(p).kind == MATMUL and softmax in _ancestors(classify(p).inputs[1], 4)
              and softmax not in _ancestors(classify(p).inputs[0], 4)]  # fmt: skip
    if pooled:  # x @ softmax(c): a weighted sum over the softmax's dim (global context pooling)
        return (f"separable attention: a softmax over a context-score vector (dim {op.attrs['dim']}) pooling the "
                f"values in {describe(pooled[0])}; there are no query-key scores")  # fmt: skip
    return ("outlook attention: the attention weights are projected from the input, with no query-key scores, "
            f"and multiplied by the values in {describe(products[0])}")


def _feeds_product(p: Node) -> bool:
    """``p`` (a softmax times values) is itself multiplied by the queries: a factorized context."""
    return any(classify(u) is not None and classify(u).kind in (MATMUL, EINSUM) for u in _forward(p, _PASS + (TRANSPOSE,)))


# The kinds, first match first: each reads the graph around a refused softmax and names it, or returns None.
KINDS: tuple[Callable[[Node], str | None], ...] = (_gated, _talking_heads, _separable, _factorized_or_outlook)


def diagnose(softmax: Node, reason: str) -> str:
    """``reason`` (why the matcher refused ``softmax``), prefixed with what the softmax is when it is a known kind."""
    if classify(softmax) is None or classify(softmax).kind != SOFTMAX:
        return reason
    for kind in KINDS:
        try:
            what = kind(softmax)
        except Exception:  # a diagnosis only names the miss; it never turns one into a crash
            what = None
        if what:
            return f"{what} ({reason})"
    return reason
