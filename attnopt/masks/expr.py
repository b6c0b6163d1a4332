"""One definition of each mask's element predicate, evaluated two ways.

A mask's predicate is written once, as Python arithmetic on its operands (query positions ``q``,
key positions ``k``, query head ``h``, lengths ``sq``/``sk``) plus the few functions of an ``ops``
namespace (``minimum``, ``maximum``). Evaluated with :data:`TORCH` on int64 tensors it gives the
boolean mask (tests, the CPU path, block maps); evaluated with a :class:`TritonOps` on :class:`Expr`
operands it gives the source text of the same predicate for a generated Triton kernel. So the kernel
tests exactly what the reference tests.

``ops.bind(name, value)`` names an intermediate: the kernel computes it once in a line of its own
(``name = value``) and the predicate refers to it by name; on tensors it is the value itself.

Integer ``//`` and ``%`` truncate in Triton and floor in Python and torch; the predicates only
divide non-negative operands, where both agree. Predicates use ``&`` and ``|`` (never ``and``/``or``
or chained comparisons, which Python cannot overload) and no ``~``.
"""

from __future__ import annotations

import torch


def _src(x) -> str:
    if isinstance(x, Expr):
        return x.src
    if isinstance(x, bool):
        return "True" if x else "False"
    if isinstance(x, int):
        return str(x) if x >= 0 else f"({x})"
    raise TypeError(f"a kernel predicate takes ints and expressions; got {type(x).__name__}")


def _binary(op: str):
    def forward(a, b):
        if not isinstance(b, (Expr, int)):
            return NotImplemented
        if isinstance(b, int) and ((op in ("+", "-") and b == 0) or (op in ("*", "//") and b == 1)):
            return a  # x + 0, x - 0, x * 1, x // 1
        return Expr(f"({_src(a)} {op} {_src(b)})")

    def reverse(a, b):
        if not isinstance(b, (Expr, int)):
            return NotImplemented
        return Expr(f"({_src(b)} {op} {_src(a)})")

    return forward, reverse


class Expr:
    """Source text of a Triton expression; arithmetic and comparisons build larger expressions."""

    __slots__ = ("src",)
    __hash__ = None  # == builds an expression, so Expr is not hashable

    def __init__(self, src: str):
        self.src = src

    def __repr__(self) -> str:
        return f"Expr({self.src!r})"

    __add__, __radd__ = _binary("+")
    __sub__, __rsub__ = _binary("-")
    __mul__, __rmul__ = _binary("*")
    __floordiv__, __rfloordiv__ = _binary("//")
    __mod__, __rmod__ = _binary("%")
    __and__, __rand__ = _binary("&")
    __or__, __ror__ = _binary("|")
    __lt__, _ = _binary("<")
    __le__, _ = _binary("<=")
    __gt__, _ = _binary(">")
    __ge__, _ = _binary(">=")
    __eq__, _ = _binary("==")  # type: ignore[assignment]
    __ne__, _ = _binary("!=")  # type: ignore[assignment]


class _TorchOps:
    """``ops`` for tensors (and Python ints, folded)."""

    name = "torch"

    @staticmethod
    def minimum(a, b):
        if isinstance(a, int) and isinstance(b, int):
            return min(a, b)
        if isinstance(b, int):
            return torch.clamp(a, max=b)
        if isinstance(a, int):
            return torch.clamp(b, max=a)
        return torch.minimum(a, b)

    @staticmethod
    def maximum(a, b):
        if isinstance(a, int) and isinstance(b, int):
            return max(a, b)
        if isinstance(b, int):
            return torch.clamp(a, min=b)
        if isinstance(a, int):
            return torch.clamp(b, min=a)
        return torch.maximum(a, b)

    @staticmethod
    def true_like(q, k):
        """All True, broadcast like ``q`` and ``k``."""
        return (q >= 0) & (k >= 0)

    @staticmethod
    def bind(name, value):
        return value

    @staticmethod
    def layout_lookup(mask, h, qb, kb):
        """``mask.layout[h, qb, kb]`` of a :class:`~attnopt.masks.BlockSparse`."""
        return mask.lookup(h, qb, kb)


class TritonOps:
    """``ops`` for :class:`Expr` operands: the result is Triton source text.

    ``layouts`` maps each BlockSparse mask of the predicate to the kernel argument names of its
    layout: ``(pointer, head stride, row stride, number of layout heads)``. ``bindings`` collects the
    named intermediates, ``(name, source)`` in the order the kernel computes them.
    """

    name = "triton"

    def __init__(self, layouts: dict | None = None):
        self.layouts = layouts or {}
        self.bindings: list[tuple[str, str]] = []

    def bind(self, name, value):
        if any(n == name for n, _ in self.bindings):
            raise ValueError(f"the kernel predicate binds {name!r} twice")
        self.bindings.append((name, _src(value)))
        return Expr(name)

    @staticmethod
    def minimum(a, b):
        if isinstance(a, int) and isinstance(b, int):
            return min(a, b)
        return Expr(f"tl.minimum({_src(a)}, {_src(b)})")

    @staticmethod
    def maximum(a, b):
        if isinstance(a, int) and isinstance(b, int):
            return max(a, b)
        return Expr(f"tl.maximum({_src(a)}, {_src(b)})")

    @staticmethod
    def true_like(q, k):
        return (q >= 0) & (k >= 0)

    def layout_lookup(self, mask, h, qb, kb):
        if mask not in self.layouts:
            raise KeyError(f"no kernel argument was assigned to the layout of {mask}")
        ptr, stride_h, stride_m, heads = self.layouts[mask]
        head = _src(h) if heads > 1 else "0"
        return Expr(f"(tl.load({ptr} + {head} * {stride_h} + {_src(qb)} * {stride_m} + {_src(kb)}) != 0)")


TORCH = _TorchOps()
