"""Masks the graph builds from nothing but constants and shapes: evaluated, and recognized when causal.

A node is *static* when no graph input reaches it (no placeholder, no ``get_attr``, no random op):
in a graph specialized to its shapes it is a constant, so evaluating it once on the spot proves what
it is. A static boolean mask equal to ``j <= i`` (top-left) or ``j <= i + Sk - Sq`` (bottom-right) is
causal: the site drops it and sets the kernel's causal flag instead. Under dynamic shapes the sizes
arrive as graph inputs, the mask is not static, and it stays a mask tensor (still exact).
"""

from __future__ import annotations

import math
import operator
from typing import Any

import torch
from torch.fx import Node
from torch.utils._pytree import tree_map

from attnopt.kernels.exact.reference import CAUSAL_BOTTOM_RIGHT, CAUSAL_NONE, CAUSAL_TOP_LEFT, causal_keep
from attnopt.patterns.canonical import CAST, EXPAND, WHERE, classify, scalar_value, tensor_meta

_MAX_NODES = 400
_MAX_NUMEL = 1 << 24
_NONDETERMINISTIC = ("rand", "bernoulli", "normal", "uniform", "dropout", "multinomial", "poisson", "exponential",
                     "empty", "seed", "manual_seed")  # fmt: skip


def _name(n: Node) -> str:
    return n.target if isinstance(n.target, str) else getattr(n.target, "__name__", str(n.target))


def is_static(node: Any, _seen: dict | None = None) -> bool:
    """True when ``node`` depends on no graph input and no random op (bounded search)."""
    if not isinstance(node, Node):
        return True
    seen = {} if _seen is None else _seen
    stack = [node]
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen[n] = True
        if len(seen) > _MAX_NODES:
            return False
        if n.op == "get_attr" and _is_tracer_constant(n):
            continue
        if n.op not in ("call_function", "call_method"):
            return False
        name = _name(n)
        if any(word in name.lower() for word in _NONDETERMINISTIC):
            return False
        if n.op == "call_method" and name.endswith("_") and not name.startswith("__"):
            return False  # an in-place method: its input's value depends on the order of mutations
        stack.extend(n.all_input_nodes)
    return True


def _is_tracer_constant(n: Node) -> bool:
    """A tensor ``torch.fx.symbolic_trace`` folded while tracing (``_tensor_constant<i>``): a constant of
    the graph, unlike a module's buffer, which its owner may change."""
    return isinstance(n.target, str) and n.target.split(".")[-1].startswith("_tensor_constant")


def _fetch_attr(n: Node) -> Any:
    obj = n.graph.owning_module
    for part in n.target.split("."):
        obj = getattr(obj, part)
    return obj


def evaluate(node: Any, cache: dict | None = None) -> Any:
    """The value of a static node (raises when it cannot be evaluated)."""
    if not isinstance(node, Node):
        return node
    cache = {} if cache is None else cache
    if node in cache:
        return cache[node]
    order: list[Node] = []
    stack, seen = [node], set()
    while stack:  # iterative post-order over the static subgraph
        n = stack[-1]
        pending = [a for a in n.all_input_nodes if a not in seen and a not in cache]
        if pending:
            stack.extend(pending)
            continue
        stack.pop()
        if n not in seen:
            seen.add(n)
            order.append(n)
    for n in order:
        if n in cache:
            continue
        args = tree_map(lambda a: cache[a] if isinstance(a, Node) else a, n.args)
        kwargs = tree_map(lambda a: cache[a] if isinstance(a, Node) else a, n.kwargs)
        if n.op == "get_attr":
            val = _fetch_attr(n)
        elif n.op == "call_function":
            val = n.target(*args, **kwargs)
        else:
            val = getattr(args[0], n.target)(*args[1:], **kwargs)
        if isinstance(val, torch.Tensor) and val.numel() > _MAX_NUMEL:
            raise ValueError("static value too large to evaluate")
        cache[n] = val
    return cache[node]


def static_value(node: Any) -> Any:
    """The value of ``node`` when it is static and small enough, else None."""
    if not isinstance(node, Node):
        return node
    if not is_static(node):
        return None
    try:
        with torch.no_grad():
            return evaluate(node)
    except Exception:
        return None


def scalar_fill(x: Any) -> float | None:
    """A fill value: a Python number, or a static 0-d (or constant-filled) tensor, as a float."""
    v = scalar_value(x)
    if v is not None:
        return v
    if not isinstance(x, Node):
        return None
    op = classify(x)
    if op is not None and op.kind == CAST:
        return scalar_fill(op.inputs[0])
    if x.op == "call_function" and x.target in (torch.full_like,) and len(x.args) >= 2:
        return scalar_value(x.args[1])
    val = static_value(x)
    if isinstance(val, torch.Tensor) and val.numel() >= 1 and val.is_floating_point():
        flat = val.flatten()
        if bool((flat == flat[0]).all()) or bool(flat.isnan().all()):
            return float(flat[0])
    if isinstance(val, (int, float)) and not isinstance(val, bool):
        return float(val)
    return None


def is_zero(x: Any) -> bool:
    v = scalar_fill(x)
    return v == 0.0


_AND_FNS = {operator.and_, torch.logical_and, torch.bitwise_and, torch.Tensor.logical_and, torch.Tensor.bitwise_and,
            torch.Tensor.__and__}  # fmt: skip
_OR_FNS = {operator.or_, torch.logical_or, torch.bitwise_or, torch.Tensor.logical_or, torch.Tensor.bitwise_or,
           torch.Tensor.__or__}  # fmt: skip
_NOT_FNS = {operator.invert, torch.logical_not, torch.bitwise_not, torch.Tensor.logical_not, torch.Tensor.bitwise_not}
_AND_METHODS = {"logical_and", "bitwise_and", "__and__"}
_OR_METHODS = {"logical_or", "bitwise_or", "__or__"}
_NOT_METHODS = {"logical_not", "bitwise_not", "__invert__"}
_LOGIC_OPS = (("and", _AND_FNS, _AND_METHODS, 2), ("or", _OR_FNS, _OR_METHODS, 2), ("not", _NOT_FNS, _NOT_METHODS, 1))


def _logic(n: Any) -> tuple[str, tuple] | None:
    if not isinstance(n, Node) or tensor_meta(n) is None or tensor_meta(n).dtype != torch.bool:
        return None
    for name, fns, methods, arity in _LOGIC_OPS:
        targets = fns if n.op == "call_function" else methods if n.op == "call_method" else ()
        if n.target in targets and len(n.args) == arity:
            return name, tuple(n.args)
    op = classify(n)
    if op is not None and op.kind in (EXPAND, CAST) and tensor_meta(op.inputs[0]) is not None:
        if tensor_meta(op.inputs[0]).dtype == torch.bool:
            return "same", (op.inputs[0],)
    return None


def conjuncts(node: Any, attend: bool) -> list[tuple[Any, bool]]:
    """The boolean mask ``node`` (True = attend when ``attend``, else True = masked out) as a list of
    ``(leaf, attend)`` whose keep-sets intersect to the mask's keep-set."""
    logic = _logic(node)
    if logic is None:
        return [(node, attend)]
    kind, args = logic
    if kind == "same":
        return conjuncts(args[0], attend)
    if kind == "not":
        return conjuncts(args[0], not attend)
    if (kind == "and" and attend) or (kind == "or" and not attend):
        return [leaf for a in args for leaf in conjuncts(a, attend)]
    return [(node, attend)]


def causal_kind(keep: Any, sq: int, sk: int) -> int:
    """CAUSAL_TOP_LEFT / CAUSAL_BOTTOM_RIGHT when the boolean ``keep`` (broadcasting to [..., Sq, Sk]) is
    exactly that causal pattern in every slice, else CAUSAL_NONE."""
    if not isinstance(keep, torch.Tensor) or keep.dtype != torch.bool or keep.dim() < 2:
        return CAUSAL_NONE
    if tuple(keep.shape[-2:]) != (sq, sk):
        return CAUSAL_NONE
    for code in (CAUSAL_TOP_LEFT, CAUSAL_BOTTOM_RIGHT):
        want = causal_keep(sq, sk, code, keep.device)
        if bool((keep == want).all()):
            return code
    return CAUSAL_NONE


def has_empty_rows(code: int, sq: int, sk: int) -> bool:
    """Whether the causal pattern ``code`` leaves some query row with no visible key."""
    if code == CAUSAL_NONE:
        return False
    keep = causal_keep(sq, sk, code, torch.device("cpu"))
    return not bool(keep.any(-1).all())


def mask_fill(x) -> float | None:
    """The fill of a mask: -inf or a large negative constant (``finfo.min``, -1e4, ...), else None."""
    v = scalar_fill(x)
    return v if v is not None and (v == -math.inf or v <= -1e4) else None


class Static:
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
        comps.append(("mask", i, fill, ctx, conjuncts(node, attend)))
    for i, (node, factor, scalars, ctx) in enumerate(terms):
        op = classify(node)
        if scalars or factor <= 0:
            continue
        if op is None or op.kind != WHERE:
            val = static_value(node) if isinstance(node, Node) and not scalars and factor > 0 else None
            if isinstance(val, torch.Tensor) and val.is_floating_point() and val.numel():
                neg = val[val != 0]
                fill = mask_fill(float(neg[0])) if neg.numel() and bool((neg == neg[0]).all()) else None
                if fill is not None:  # a constant 0 / fill additive mask
                    comps.append(("term", i, fill * factor, ctx, [(Static(val == 0), True)]))
            continue
        cond, a, b = op.inputs
        if is_zero(a) and mask_fill(b) is not None:
            comps.append(("term", i, mask_fill(b) * factor, ctx, conjuncts(cond, True)))
        elif is_zero(b) and mask_fill(a) is not None:
            comps.append(("term", i, mask_fill(a) * factor, ctx, conjuncts(cond, False)))
    for kind, i, fill, ctx, leaves in comps:
        for j, (leaf, attend) in enumerate(leaves):
            val = leaf.value if isinstance(leaf, Static) else static_value(leaf) if isinstance(leaf, Node) else None
            if not isinstance(val, torch.Tensor) or val.dtype != torch.bool:
                continue
            code = causal_kind(val if attend else ~val, sq, sk)
            if code == CAUSAL_NONE:
                continue
            rest = leaves[:j] + leaves[j + 1:]
            if math.isfinite(fill):
                alone = not rest and len(masks) + len(terms) == 1
                if not alone or has_empty_rows(code, sq, sk):
                    continue
            new_masks = [m for k, m in enumerate(masks) if not (kind == "mask" and k == i)]
            new_terms = [t for k, t in enumerate(terms) if not (kind == "term" and k == i)]
            new_masks += [(leaf_, attend_, fill, ctx) for leaf_, attend_ in rest]
            return code, new_masks, new_terms
    return CAUSAL_NONE, masks, terms
