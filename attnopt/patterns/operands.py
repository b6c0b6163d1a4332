"""The operands of an attention site read the way the model wrote them, and brought to ``[B, H, S, D]``.

Shared by the matchers (:mod:`attnopt.patterns.manual`, :mod:`attnopt.patterns.sdpa`): keys and values
repeated per query head (``repeat_kv``, ``repeat_interleave``, expand), merged ``[B*H, S, D]``
tensors reshaped from ``[B, H, S, D]``, chained permutations, constant scalings of q and k, and the
view programs that take a mask or a bias to the canonical score layout.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.fx import Node

from attnopt.patterns.canonical import (CAST, DIV, EXPAND, MUL, PERMUTE, REPEAT_INTERLEAVE, RESHAPE, TRANSPOSE,
                                        classify, scalar_value, shape)  # fmt: skip
from attnopt.patterns.layout import convert, eq, hint, is_one, permutation_ops, prod
from attnopt.patterns.match import Miss, Region

# How far a walk through the graph goes (score expressions, the way from the softmax to the @ V).
MAX_DEPTH = 64


def describe(x) -> str:
    """``x`` as a reason names it: the node and its target, or the constant."""
    if not isinstance(x, Node):
        return f"constant {x!r}"
    target = x.target if x.op in ("call_method", "call_module") else getattr(x.target, "__name__", str(x.target))
    return f"{x.name} ({x.op} {target})"


def shape_of(x) -> tuple:
    """The recorded shape of ``x``; a :class:`Miss` when there is none."""
    s = shape(x)
    if s is None:
        raise Miss(f"{describe(x)} has no recorded shape")
    return s


def same_shape(a: tuple, b: tuple) -> bool:
    return len(a) == len(b) and all(eq(x, y) for x, y in zip(a, b))


def apply_shape(dims: tuple, ops: tuple) -> tuple:
    """The shape ``dims`` after the view program ``ops`` (permute, unsqueeze, transpose)."""
    s = list(dims)
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


def compose_permutes(x, ops: tuple) -> tuple:
    """``x.permute(a)`` followed by a program starting with ``permute(b)``: read from ``x`` with one
    permutation ``a[b]`` (none when it is the identity), so the tensor the model wrote is seen."""
    while ops and ops[0][0] == "permute":
        op = classify(x)
        if op is None or op.kind not in (PERMUTE, TRANSPOSE):
            break
        rank = len(shape_of(x))
        a = list(op.attrs["dims"]) if op.kind == PERMUTE else list(range(rank - 2)) + [rank - 1, rank - 2]
        b = list(ops[0][1][0]) if isinstance(ops[0][1][0], (tuple, list)) else list(ops[0][1])
        x, ops = op.inputs[0], permutation_ops([a[i] for i in b]) + tuple(ops[1:])
    return x, ops


def see_through_merge(x, want: tuple | None) -> tuple[Any, tuple] | None:
    """``x`` [B*H, S, D] read as the [B, H, S, D] tensor it was reshaped from (``want``: required (B, H))."""
    op = classify(x)
    while op is not None and op.kind == CAST and op.attrs.get("dtype") is None:
        x = op.inputs[0]
        op = classify(x)
    if op is None or op.kind != RESHAPE:
        return None
    src = op.inputs[0]
    ss, xs = shape(src), shape(x)
    if ss is None or xs is None or len(ss) != 4 or len(xs) != 3 or not same_shape(ss[-2:], xs[-2:]):
        return None
    if not eq(ss[0] * ss[1], xs[0]) or (want is not None and not same_shape(ss[:2], want)):
        return None
    return src, ss[:2]


def unrepeat(x) -> tuple[Any, Any] | None:
    """``(base, Hkv)`` when ``x`` [B, H, S, D] repeats each head of ``base`` [B, Hkv, S, D] H/Hkv times in
    a row (``repeat_kv``: expand of ``base[:, :, None]`` and reshape; ``repeat_interleave`` on dim 1;
    expand of a single head)."""
    xs = shape(x)
    if xs is None or len(xs) != 4:
        return None

    def skip_identity(n):
        op = classify(n)
        while op is not None and op.kind == CAST and op.attrs.get("dtype") is None:
            n = op.inputs[0]
            op = classify(n)
        return n, op

    n, op = skip_identity(x)
    if op is None:
        return None
    if op.kind == REPEAT_INTERLEAVE and op.attrs["dim"] == 1:
        base = op.inputs[0]
        bs = shape(base)
        if bs is not None and len(bs) == 4 and eq(bs[1] * op.attrs["repeats"], xs[1]):
            return base, bs[1]
        return None
    if op.kind == EXPAND:
        base = op.inputs[0]
        bs = shape(base)
        if bs is not None and len(bs) == 4 and is_one(bs[1]) and same_shape(bs[::2], xs[::2]):
            return base, 1
        return None
    if op.kind != RESHAPE:
        return None
    e, eop = skip_identity(op.inputs[0])
    es = shape(e)
    if eop is None or eop.kind != EXPAND or es is None or len(es) != 5:
        return None
    u, uop = skip_identity(eop.inputs[0])
    us = shape(u)
    if uop is None or uop.kind != RESHAPE or us is None or len(us) != 5 or not is_one(us[2]):
        return None
    base = uop.inputs[0]
    bs = shape(base)
    if bs is None or len(bs) != 4 or not same_shape(us, bs[:2] + (1,) + bs[2:]):
        return None
    if not (same_shape(es[:2], bs[:2]) and same_shape(es[3:], bs[2:]) and eq(es[1] * es[2], xs[1])):
        return None
    return base, bs[1]


def canonical_lead(score_lead: tuple) -> tuple:
    if len(score_lead) == 0:
        return (1, 1)
    if len(score_lead) == 1:
        return (1, score_lead[0])
    if len(score_lead) == 2:
        return tuple(score_lead)
    return (score_lead[0], prod(score_lead[1:]))


def term_ops(node, ctx: tuple, cb: tuple, s: tuple | None = None, refs: tuple | None = None) -> tuple:
    s = node.shape if isinstance(node, Region) else shape(node) if s is None else s
    if s is None:
        return ()  # a Python number broadcasts as it is
    pre = (("unsqueeze", (0,)),) * max(0, 2 - len(s))
    s = (1,) * max(0, 2 - len(s)) + tuple(s)
    conv, _ = convert(s[:-2], ctx, cb, "term", refs)
    return pre + conv


def product_shape(node, scalars: tuple) -> tuple | None:
    """The shape of a term times its tensor scalings (their broadcast)."""
    shapes = [x.shape if isinstance(x, Region) else shape(x) for x in [node] + [n for n, _ in scalars]]
    shapes = [sh for sh in shapes if sh is not None]
    return tuple(torch.broadcast_shapes(*shapes)) if shapes else None


def as_int(x):
    """A size for the report: its value, or its hint under dynamic shapes (read without adding a guard)."""
    if isinstance(x, torch.SymInt):
        return int(x.node.hint) if x.node.has_hint() else str(x)
    return int(x) if isinstance(x, int) else str(x)


def seq_major(t: torch.Tensor) -> bool:
    """Whether a [B, H, S, D] tensor is stored sequence-major (a transposed [B, S, H, D]); no guard added."""
    if t.dim() != 4:
        return False
    h, s, st1, st2 = (hint(x) for x in (t.shape[1], t.shape[2], t.stride(1), t.stride(2)))
    return h > 1 and s > 1 and st1 < st2


_METADATA_ATTRS = {"shape", "dtype", "device", "ndim", "is_cuda", "requires_grad"}
_METADATA_METHODS = {"size", "dim", "numel", "stride", "get_device"}
_METADATA_OPS = {torch.ops.aten.sym_size.int, torch.ops.aten.sym_numel.default, torch.ops.aten.sym_stride.int}


def value_users(x: Node) -> list[Node]:
    """The users of ``x`` that read its values: a shape or dtype read (``x.shape``, ``x.size(1)``,
    ``sym_size``, as tracers record them) does not count, so a scaling whose result is also measured
    still counts as used once."""
    def metadata(u: Node) -> bool:
        if u.op == "call_function" and u.target is getattr:
            return len(u.args) > 1 and u.args[1] in _METADATA_ATTRS
        if u.op == "call_method":
            return u.target in _METADATA_METHODS
        return u.op == "call_function" and u.target in _METADATA_OPS

    return [u for u in x.users if not metadata(u)]


def fold_scalar(x, scale: float) -> tuple:
    """Fold single-use ``x * c`` / ``x / c`` chains into ``scale``; returns (operand, scale)."""
    for _ in range(8):
        op = classify(x)
        if op is None or op.kind not in (MUL, DIV) or len(value_users(x)) != 1 or op.attrs.get("inplace"):
            return x, scale
        a, b = op.inputs
        cb, ca = scalar_value(b), scalar_value(a)
        if op.kind == MUL and cb is not None:
            x, scale = a, scale * cb
        elif op.kind == MUL and ca is not None:
            x, scale = b, scale * ca
        elif op.kind == DIV and cb is not None and cb != 0:
            x, scale = a, scale / cb
        else:
            return x, scale
    return x, scale
