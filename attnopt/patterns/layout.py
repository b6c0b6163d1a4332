"""Layouts: how a tensor laid out as the model wrote it becomes the canonical ``[B, H, S, D]``.

A *lead* is the tuple of leading dims of a tensor (all but the last two). Attention written by hand
moves between leads that regroup the same row-major order of batch and heads: ``[B*H]`` (merged,
``bmm``), ``[B, H]``, ``[B, Hkv, G]`` (grouped queries by broadcasting). :func:`convert` returns the
view program (see :mod:`attnopt.patterns.match`) that takes a tensor living in one lead (possibly
broadcast, i.e. with size-1 dims) to the canonical lead ``(B, H)``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch.fx.experimental.symbolic_shapes import statically_known_true


class LayoutError(Exception):
    """The layouts cannot be related by a regrouping of dims; the message is the reason."""


def is_sym(x: Any) -> bool:
    """A symbolic size (a SymInt that is not a known constant)."""
    if isinstance(x, torch.SymInt):
        return x.node.maybe_as_int() is None
    return isinstance(x, torch.SymFloat)


def as_static(x: Any) -> Any:
    """``x`` as a Python int when it is one (or a SymInt known to be a constant), else ``x``."""
    if isinstance(x, torch.SymInt) and x.node.maybe_as_int() is not None:
        return int(x.node.maybe_as_int())
    return x


def eq(a: Any, b: Any) -> bool:
    """``a == b`` when it holds for every value of the symbols involved (no guard is added)."""
    if not is_sym(a) and not is_sym(b):
        return a == b
    try:
        return bool(statically_known_true(a == b))
    except Exception:  # pragma: no cover - defensive: an undecidable comparison is 'not equal'
        return False


def is_one(x: Any) -> bool:
    return not is_sym(x) and x == 1


def hint(x: Any) -> int:
    if is_sym(x):
        return int(x.node.hint) if x.node.has_hint() else 2
    return int(x)


def prod(xs) -> Any:
    out: Any = 1
    for x in xs:
        out = out * x
    return out


def groups(src: tuple, dst: tuple) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """Pairs of half-open ranges ``((a0, a1), (b0, b1))`` such that ``src[a0:a1]`` and ``dst[b0:b1]``
    hold the same row-major block of elements. Raises :class:`LayoutError` when there are none."""
    if not eq(prod(src), prod(dst)):
        raise LayoutError(f"{tuple(src)} and {tuple(dst)} hold different numbers of elements")
    out = []
    i = j = 0
    while i < len(src) or j < len(dst):
        if i < len(src) and j < len(dst) and is_one(src[i]) and is_one(dst[j]):
            out.append(((i, i + 1), (j, j + 1)))
            i, j = i + 1, j + 1
            continue
        if i < len(src) and is_one(src[i]) and (j >= len(dst) or not is_one(dst[j])):
            out.append(((i, i + 1), (j, j)))
            i += 1
            continue
        if j < len(dst) and is_one(dst[j]) and (i >= len(src) or not is_one(src[i])):
            out.append(((i, i), (j, j + 1)))
            j += 1
            continue
        a0, b0 = i, j
        ps, pd = src[i], dst[j]
        i, j = i + 1, j + 1
        while not eq(ps, pd):
            if hint(ps) <= hint(pd) and i < len(src):
                ps, i = ps * src[i], i + 1
            elif j < len(dst):
                pd, j = pd * dst[j], j + 1
            elif i < len(src):
                ps, i = ps * src[i], i + 1
            else:
                raise LayoutError(f"cannot regroup {tuple(src)} into {tuple(dst)}")
        out.append(((a0, i), (b0, j)))
    return out


def _sizes(xs: tuple, refs: tuple) -> tuple:
    """Sizes for ``unflatten``: the first symbolic size written -1, others read at run time (``refs``)."""
    out, free = [], True
    for x, ref in zip(xs, refs):
        if not is_sym(x):
            out.append(int(as_static(x)))
        elif free:
            out.append(-1)
            free = False
        elif ref is not None:
            out.append(ref)
        else:
            raise LayoutError(f"more than one dynamic size in {tuple(xs)}")
    return tuple(out)


def convert(x_lead: tuple, ctx: tuple, dst: tuple, kind: str, refs: tuple | None = None) -> tuple[tuple, tuple]:
    """The view program taking a tensor with lead ``x_lead`` that broadcasts against the lead ``ctx``
    to the lead ``dst`` (a regrouping of ``ctx``), and the resulting lead.

    ``kind`` says what broadcasting may stay broadcast: ``"term"`` (masks, biases: any size-1 dim
    stays 1 where a whole group is 1), ``"kv"`` (keys/values: the same but along the heads only, and
    a group ``[Hkv, G]`` with only the trailing dims broadcast merges into ``Hkv`` heads, the GQA grouping), ``"full"`` (q and
    outputs: everything is expanded). A group that is partly broadcast otherwise is expanded.
    ``refs`` (one per ``dst`` dim, or None) are run-time sizes (``SizeOf``) for the symbolic sizes a
    view needs beyond the one it can write -1.
    """
    refs = tuple(refs) if refs is not None else (None,) * len(dst)
    ops: list = []
    x_lead = tuple(x_lead)
    if len(x_lead) > len(ctx):
        raise LayoutError(f"lead {x_lead} has more dims than its context {tuple(ctx)}")
    for _ in range(len(ctx) - len(x_lead)):
        ops.append(("unsqueeze", (0,)))
    x_lead = (1,) * (len(ctx) - len(x_lead)) + x_lead
    for a, c in zip(x_lead, ctx):
        if not (is_one(a) or eq(a, c)):
            raise LayoutError(f"lead {x_lead} does not broadcast against {tuple(ctx)}")
    gs = groups(tuple(ctx), tuple(dst))
    out_lead: list = [None] * len(dst)
    expand: list = [-1] * len(ctx)
    must_expand = False
    plan = []
    for (a0, a1), (b0, b1) in gs:
        xs, cs, ds = x_lead[a0:a1], ctx[a0:a1], dst[b0:b1]
        full = [not is_one(x) or is_one(c) for x, c in zip(xs, cs)]
        ones = all(is_one(x) for x in xs)
        if all(full):
            new = ds
        elif ones and kind != "full" and not (kind == "kv" and b0 == 0 and b1 > b0):
            new = (1,) * (b1 - b0)  # (keys and values are expanded along the batch: the kernel takes no broadcast)
        elif kind == "kv" and b1 - b0 == 1 and b0 > 0 and full == sorted(full, reverse=True):
            new = (prod(xs),)  # GQA: [Hkv, G] with G broadcast is Hkv heads, each shared by G queries
        else:
            for k in range(a0, a1):
                if is_one(x_lead[k]) and not is_one(ctx[k]):
                    if is_sym(ctx[k]):
                        raise LayoutError(f"a broadcast over a dynamic size {ctx[k]} would need its value")
                    expand[k] = int(ctx[k])
                    must_expand = True
            new = ds
        plan.append(((a0, a1), (b0, b1), new))
        out_lead[b0:b1] = list(new)
    if must_expand:
        ops.append(("expand", tuple(expand) + (-1, -1)))
    return tuple(ops) + _regroup_ops(plan, refs), tuple(out_lead)


def _regroup_ops(plan: list, refs: tuple) -> tuple:
    """The views regrouping each ``((a0, a1), (b0, b1), new sizes)`` of ``plan``, last group first (so the
    earlier groups' dim indices stay valid)."""
    ops: list = []
    for (a0, a1), (b0, b1), new in reversed(plan):
        if a1 - a0 == 1 and b1 - b0 == 1:
            continue
        if a1 == a0:  # a size-1 dim appears
            ops.append(("unsqueeze", (a0,)))
            continue
        if b1 == b0:  # a size-1 dim disappears
            ops.append(("squeeze", (a0,)))
            continue
        if a1 - a0 > 1:
            ops.append(("flatten", (a0, a1 - 1)))
        if b1 - b0 > 1:
            group_refs = refs[b0:b1] if len(new) == b1 - b0 else (None,) * len(new)
            ops.append(("unflatten", (a0, _sizes(tuple(new), group_refs))))
    return tuple(ops)


def permutation_ops(perm: list[int]) -> tuple:
    return () if list(perm) == list(range(len(perm))) else (("permute", tuple(perm)),)


def is_finite_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
