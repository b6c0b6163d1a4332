"""A score modification as a small expression: its canonical text, its derivative, its Triton source.

A FlexAttention-style ``score_mod(score, b, h, q_idx, kv_idx)`` is traced once (``kernels/exact/score_trace``)
into a :class:`ScoreExpr`: straight-line SSA nodes over the five inputs, literals and the tensors it captured
(:class:`Buffer`, read by ``load(buf, index, ...)``, one index per dimension). The expression's canonical text
(:meth:`ScoreExpr.text`, parsed back by :func:`parse`) is what a kernel spec records, so it names and caches the
generated kernel and shows in its source, e.g. ALiBi::

    buf0: float32[1]; t0 = load(buf0, h): float32; t1 = sub(kv_idx, q_idx): int32;
    t2 = mul(t1, t0): float32; t3 = add(score, t2): float32; return t3

:meth:`ScoreExpr.gradient` appends the nodes of ``d out / d score`` (forward-mode chain rule, exact for these
ops), and :func:`triton_lines` writes either as Triton statements over a score tile.

Semantics follow torch: integer ``floordiv`` and ``mod`` floor (Triton's ``//`` and ``%`` truncate, so they are
rewritten), ``div`` is true division, float-to-int ``to`` truncates. Kernels compute every float in fp32.

This module imports neither torch nor triton.
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass

INPUTS = ("score", "b", "h", "q_idx", "kv_idx")
VARYING = ("score", "q_idx", "kv_idx")  # inputs that differ between the elements of one head's score tile
FLOATS = ("float16", "bfloat16", "float32", "float64")
INTS = ("int8", "int16", "int32", "int64", "uint8")
VALUE_DTYPES = FLOATS + INTS + ("bool",)  # the dtypes an expression node may have

# op -> number of arguments (None: any, for load)
ARITY = {
    "neg": 1, "abs": 1, "exp": 1, "exp2": 1, "log": 1, "log2": 1, "sqrt": 1, "rsqrt": 1, "sin": 1, "cos": 1,
    "tanh": 1, "sigmoid": 1, "erf": 1, "floor": 1, "ceil": 1, "relu": 1, "gelu": 1, "not": 1, "to": 1, "const": 1,
    "add": 2, "sub": 2, "mul": 2, "div": 2, "floordiv": 2, "mod": 2, "minimum": 2, "maximum": 2, "pow": 2,
    "lt": 2, "le": 2, "gt": 2, "ge": 2, "eq": 2, "ne": 2, "and": 2, "or": 2,
    "where": 3, "clamp": 3, "load": None,
}  # fmt: skip
POW_EXPONENTS = (-2.0, -1.0, -0.5, 0.5, 1.0, 2.0, 3.0)
UNARY_TL = {"exp": "tl.exp", "exp2": "tl.exp2", "log": "tl.log", "log2": "tl.log2", "sqrt": "tl.sqrt",
             "rsqrt": "tl.rsqrt", "sin": "tl.sin", "cos": "tl.cos", "sigmoid": "tl.sigmoid", "erf": "tl.erf",
             "floor": "tl.floor", "ceil": "tl.ceil", "abs": "tl.abs"}  # fmt: skip
COMPARE = {"lt": "<", "le": "<=", "gt": ">", "ge": ">=", "eq": "==", "ne": "!="}
ARITH = {"add": "+", "sub": "-", "mul": "*"}
_NAME = re.compile(r"^(t\d+|buf\d+|score|b|h|q_idx|kv_idx)$")


@dataclass(frozen=True)
class Buffer:
    """A captured tensor: ``buf<i>`` of ``dtype`` with ``ndim`` dimensions (its sizes and strides are runtime)."""

    name: str
    dtype: str
    ndim: int


@dataclass(frozen=True)
class Node:
    """``name = op(args): dtype``; an arg is a name (str) or a literal (int, float, bool, None)."""

    name: str
    op: str
    args: tuple
    dtype: str


@dataclass(frozen=True)
class ScoreExpr:
    buffers: tuple[Buffer, ...]
    nodes: tuple[Node, ...]
    output: str | float  # a node or input name, or a literal

    def __post_init__(self):
        known = set(INPUTS) | {b.name for b in self.buffers}
        for node in self.nodes:
            if node.op not in ARITY or (ARITY[node.op] is not None and len(node.args) != ARITY[node.op]):
                raise ValueError(f"score expression node {node} has an unknown op or the wrong number of arguments")
            if node.dtype not in VALUE_DTYPES:
                raise ValueError(f"score expression node {node.name} has unknown dtype {node.dtype!r}")
            missing = [a for a in node.args if isinstance(a, str) and a not in known]
            if missing:
                raise ValueError(f"score expression node {node.name} reads undefined {missing}")
            known.add(node.name)
        if isinstance(self.output, str) and self.output not in known:
            raise ValueError(f"score expression returns undefined {self.output!r}")

    def text(self) -> str:
        """The canonical text: buffer declarations, one ``name = op(args): dtype`` per node, ``return out``."""
        parts = [f"{b.name}: {b.dtype}[{b.ndim}]" for b in self.buffers]
        parts += [f"{n.name} = {n.op}({', '.join(_lit(a) for a in n.args)}): {n.dtype}" for n in self.nodes]
        return "; ".join(parts + [f"return {_lit(self.output)}"])

    def dtype_of(self, arg) -> str:
        if isinstance(arg, bool):
            return "bool"
        if isinstance(arg, int):
            return "int64"
        if isinstance(arg, float):
            return "float32"
        if arg == "score":
            return "float32"
        if arg in INPUTS:
            return "int32"
        return next(n.dtype for n in self.nodes if n.name == arg)

    def varying(self) -> set[str]:
        """The names whose value differs across one head's score tile (they read score, q_idx or kv_idx)."""
        out = set(VARYING)
        for node in self.nodes:
            if any(isinstance(a, str) and a in out for a in node.args):
                out.add(node.name)
        return out

    def gradient(self, wrt: str = "score") -> ScoreExpr:
        """This expression's nodes plus those of ``d out / d wrt``, which it returns (0.0 if constant); ``wrt``
        is ``score`` or a node (a ``load``: the gradient of the captured tensor's element it reads)."""
        return _Gradient(self, wrt).run()


def _lit(value) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)  # inf, -inf, nan
    return repr(value)


def _parse_arg(token: str):
    token = token.strip()
    if _NAME.match(token):
        return token
    if token in ("None", "True", "False"):
        return {"None": None, "True": True, "False": False}[token]
    try:
        return int(token)
    except ValueError:
        return float(token)


_DECL = re.compile(r"^(buf\d+): (\w+)\[(\d+)\]$")
_NODE = re.compile(r"^(t\d+) = (\w+)\((.*)\): (\w+)$")


@functools.lru_cache(maxsize=512)
def parse(text: str) -> ScoreExpr:
    """The expression whose :meth:`ScoreExpr.text` is ``text``; ValueError for text it did not write."""
    buffers, nodes, output = [], [], None
    for part in text.split("; "):
        if m := _DECL.match(part):
            buffers.append(Buffer(m[1], m[2], int(m[3])))
        elif m := _NODE.match(part):
            args = tuple(_parse_arg(a) for a in m[3].split(", ")) if m[3] else ()
            nodes.append(Node(m[1], m[2], args, m[4]))
        elif part.startswith("return "):
            output = _parse_arg(part[len("return "):])
        else:
            raise ValueError(f"not a score expression part: {part!r} (in {text!r})")
    if output is None:
        raise ValueError(f"score expression text without 'return': {text!r}")
    return ScoreExpr(tuple(buffers), tuple(nodes), output)


class _Gradient:
    """Forward-mode differentiation with respect to ``score``: ``d[name]`` is the derivative's name, or None
    where it is zero (integer, boolean and score-independent values)."""

    def __init__(self, expr: ScoreExpr, wrt: str):
        self.expr, self.wrt = expr, wrt
        self.nodes = list(expr.nodes)
        self.d: dict[str, str | None] = {wrt: 1.0}

    def emit(self, op: str, *args, dtype: str = "float32") -> str:
        name = f"t{len(self.nodes)}"
        self.nodes.append(Node(name, op, tuple(args), dtype))
        return name

    def mul(self, a, b):
        if a is None or b is None:
            return None
        if not isinstance(a, str) and a == 1.0:
            return b
        return a if not isinstance(b, str) and b == 1.0 else self.emit("mul", a, b)

    def add(self, a, b):
        if a is None or b is None:
            return b if a is None else a
        return self.emit("add", a, b)

    def run(self) -> ScoreExpr:
        for node in self.expr.nodes:
            if node.name != self.wrt:
                self.d[node.name] = self.rule(node) if node.dtype in FLOATS else None
        out = self.d.get(self.expr.output) if isinstance(self.expr.output, str) else None
        return ScoreExpr(self.expr.buffers, tuple(self.nodes), 0.0 if out is None else out)

    def rule(self, node: Node):
        a = node.args
        da = [self.d.get(x) if isinstance(x, str) else None for x in a]
        if all(x is None for x in da) or node.op in ("floor", "ceil", "load", "const"):
            return None
        return getattr(self, f"_d_{node.op}")(node, a, da)

    def _d_add(self, node, a, da):
        return self.add(da[0], da[1])

    def _d_sub(self, node, a, da):
        return self.add(da[0], self.mul(-1.0, da[1]) if da[1] is not None else None)

    def _d_neg(self, node, a, da):
        return self.mul(-1.0, da[0])

    def _d_mul(self, node, a, da):
        return self.add(self.mul(da[0], a[1]), self.mul(a[0], da[1]))

    def _d_div(self, node, a, da):
        first = self.emit("div", da[0], a[1]) if da[0] is not None else None
        second = None
        if da[1] is not None:  # -a db / b² = -out db / b
            second = self.mul(-1.0, self.emit("div", self.mul(node.name, da[1]), a[1]))
        return self.add(first, second)

    def _d_to(self, node, a, da):
        return da[0]

    def _chain(self, da, *factor):
        return self.mul(da[0], factor[0] if len(factor) == 1 else self.emit(*factor))

    def _d_exp(self, node, a, da):
        return self._chain(da, node.name)

    def _d_exp2(self, node, a, da):
        return self._chain(da, "mul", node.name, math.log(2.0))

    def _d_log(self, node, a, da):
        return self._chain(da, "div", 1.0, a[0])

    def _d_log2(self, node, a, da):
        return self._chain(da, "div", 1.0 / math.log(2.0), a[0])

    def _d_sqrt(self, node, a, da):
        return self._chain(da, "div", 0.5, node.name)

    def _d_rsqrt(self, node, a, da):
        return self._chain(da, "mul", -0.5, self.emit("div", node.name, a[0]))

    def _d_sin(self, node, a, da):
        return self._chain(da, "cos", a[0])

    def _d_cos(self, node, a, da):
        return self._chain(da, "neg", self.emit("sin", a[0]))

    def _d_tanh(self, node, a, da):
        return self._chain(da, "sub", 1.0, self.emit("mul", node.name, node.name))

    def _d_sigmoid(self, node, a, da):
        return self._chain(da, "mul", node.name, self.emit("sub", 1.0, node.name))

    def _d_erf(self, node, a, da):
        gauss = self.emit("exp", self.emit("neg", self.emit("mul", a[0], a[0])))
        return self._chain(da, "mul", 2.0 / math.sqrt(math.pi), gauss)

    def _d_gelu(self, node, a, da):
        cdf = self.emit("mul", 0.5, self.emit("add", 1.0, self.emit("erf", self.emit("mul", a[0], 0.5**0.5))))
        pdf = self.emit("mul", 1.0 / math.sqrt(2.0 * math.pi),
                        self.emit("exp", self.emit("mul", -0.5, self.emit("mul", a[0], a[0]))))
        return self._chain(da, "add", cdf, self.emit("mul", a[0], pdf))

    def _d_abs(self, node, a, da):
        return self.emit("where", self.emit("lt", a[0], 0.0, dtype="bool"), self.mul(-1.0, da[0]), da[0])

    def _d_relu(self, node, a, da):
        return self.emit("where", self.emit("gt", a[0], 0.0, dtype="bool"), da[0], 0.0)

    def _d_pow(self, node, a, da):
        c = float(a[1])
        factor = self.emit("pow", a[0], c - 1.0) if c - 1.0 in POW_EXPONENTS + (0.0,) else self.emit(
            "div", node.name, a[0])
        return self._chain(da, "mul", c, factor) if c - 1.0 != 0.0 else self.mul(c, da[0])

    def _d_where(self, node, a, da):
        return self.emit("where", a[0], 0.0 if da[1] is None else da[1], 0.0 if da[2] is None else da[2])

    def _d_clamp(self, node, a, da):
        inside = None
        for bound, op in ((a[1], "ge"), (a[2], "le")):
            if bound is not None:
                test = self.emit(op, a[0], bound, dtype="bool")
                inside = test if inside is None else self.emit("and", inside, test, dtype="bool")
        return da[0] if inside is None else self.emit("where", inside, da[0], 0.0)

    def _minmax(self, node, a, da, op):
        zero = [0.0 if x is None else x for x in da]
        tie = self.emit("mul", 0.5, self.emit("add", zero[0], zero[1]))
        pick = self.emit("where", self.emit(op, a[0], a[1], dtype="bool"), zero[0], zero[1])
        return self.emit("where", self.emit("eq", a[0], a[1], dtype="bool"), tie, pick)

    def _d_minimum(self, node, a, da):
        return self._minmax(node, a, da, "lt")

    def _d_maximum(self, node, a, da):
        return self._minmax(node, a, da, "gt")
