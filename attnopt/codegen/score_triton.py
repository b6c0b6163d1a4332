"""Triton statements of a :class:`~attnopt.codegen.score_expr.ScoreExpr` over a score tile.

:func:`triton_lines` writes one statement per node (``sm_t3 = ...``), the inputs replaced by the kernel's own
names (``score`` by the scaled dot products of the tile, ``q_idx``/``kv_idx`` by the broadcast row and column
indices, ``b``/``h`` by the program's batch row and query head). A captured tensor ``buf<i>`` is the kernel
argument ``ModBuf<i>`` with strides ``stride_modbuf<i>_<dim>``; a load whose index varies over the tile takes
index 0 where ``load_ok`` is false (rows past ``seq_q``, keys past ``seq_k``), so it never reads out of bounds.

Every float is computed in fp32: integer operands of float ops are converted first, literals are written in
the operation's type. This module imports neither torch nor triton.
"""

from __future__ import annotations

from attnopt.codegen.score_expr import ARITH, COMPARE, FLOATS, UNARY_TL, Buffer, Node, ScoreExpr

TL_TYPES = {"int8": "tl.int8", "int16": "tl.int16", "int32": "tl.int32", "int64": "tl.int64", "uint8": "tl.uint8",
            "bool": "tl.int1", **{f: "tl.float32" for f in FLOATS}}  # fmt: skip


def buffer_pointer(buf: Buffer) -> str:
    return "ModBuf" + buf.name[len("buf"):]


def buffer_strides(buf: Buffer) -> list[str]:
    return [f"stride_mod{buf.name}_{d}" for d in range(buf.ndim)]


def expr_pointers(expr: ScoreExpr) -> list[str]:
    return [buffer_pointer(b) for b in expr.buffers]


def expr_strides(expr: ScoreExpr) -> list[str]:
    return [s for b in expr.buffers for s in buffer_strides(b)]


class _Writer:
    def __init__(self, expr: ScoreExpr, env: dict[str, str], load_ok: str, prefix: str):
        self.expr, self.env, self.load_ok, self.prefix = expr, dict(env), load_ok, prefix
        self.varying = expr.varying()
        self.dtypes = {n.name: n.dtype for n in expr.nodes}

    def kind(self, arg) -> str:
        """``float``, ``int`` or ``bool`` of an argument."""
        dtype = self.dtypes.get(arg) if isinstance(arg, str) and arg in self.dtypes else self.expr.dtype_of(arg)
        return "float" if dtype in FLOATS else ("bool" if dtype == "bool" else "int")

    def src(self, arg, as_kind: str | None = None) -> str:
        """The source of ``arg`` converted to ``as_kind`` (``float``: fp32) when it is of another kind."""
        if not isinstance(arg, str):
            if as_kind == "float" and arg is not None and not isinstance(arg, bool):
                value = float(arg)
                return repr(value) if value == value and abs(value) != float("inf") else f'float("{value!r}")'
            return repr(arg)
        text = self.env[arg]
        if as_kind == "float" and self.kind(arg) != "float":
            return f"{text}.to(tl.float32)"
        return text

    def common(self, *args) -> str:
        return "float" if any(self.kind(a) == "float" for a in args if a is not None) else "int"

    def line(self, node: Node) -> str:
        a, op = node.args, node.op
        out_kind = "float" if node.dtype in FLOATS else ("bool" if node.dtype == "bool" else "int")
        f = (lambda x: self.src(x, "float")) if out_kind == "float" else self.src
        if op in ARITH:
            return f"{f(a[0])} {ARITH[op]} {f(a[1])}"
        if op in COMPARE:
            kind = self.common(*a)
            return f"{self.src(a[0], kind)} {COMPARE[op]} {self.src(a[1], kind)}"
        if op in UNARY_TL:
            return f"{UNARY_TL[op]}({f(a[0])})"
        return getattr(self, f"_{op}")(node, a, f)

    def _neg(self, node, a, f):
        return f"-{f(a[0])}"

    def _div(self, node, a, f):
        return f"{f(a[0])} / {f(a[1])}"

    def _floordiv(self, node, a, f):
        if node.dtype in FLOATS:
            return f"tl.floor({f(a[0])} / {f(a[1])})"
        x, y = self.src(a[0]), self.src(a[1])  # Triton truncates: one less where the signs differ and it is inexact
        return f"{x} // {y} - (({x} % {y} != 0) & (({x} < 0) != ({y} < 0))).to({TL_TYPES[node.dtype]})"

    def _mod(self, node, a, f):
        if node.dtype in FLOATS:
            return f"{f(a[0])} - {f(a[1])} * tl.floor({f(a[0])} / {f(a[1])})"
        x, y = self.src(a[0]), self.src(a[1])
        return f"tl.where(({x} % {y} != 0) & (({x} % {y} < 0) != ({y} < 0)), {x} % {y} + {y}, {x} % {y})"

    def _minimum(self, node, a, f):
        return f"tl.minimum({f(a[0])}, {f(a[1])})"

    def _maximum(self, node, a, f):
        return f"tl.maximum({f(a[0])}, {f(a[1])})"

    def _pow(self, node, a, f):
        x, c = f(a[0]), float(a[1])
        forms = {2.0: f"{x} * {x}", 3.0: f"{x} * {x} * {x}", 1.0: x, 0.5: f"tl.sqrt({x})", -0.5: f"tl.rsqrt({x})",
                 -1.0: f"1.0 / {x}", -2.0: f"1.0 / ({x} * {x})", 0.0: f"({x} * 0.0 + 1.0)"}  # fmt: skip
        return forms[c]

    def _tanh(self, node, a, f):
        return f"1.0 - 2.0 / (tl.exp(2.0 * {f(a[0])}) + 1.0)"  # exact at both infinities

    def _relu(self, node, a, f):
        return f"tl.maximum({f(a[0])}, {'0.0' if node.dtype in FLOATS else '0'})"

    def _gelu(self, node, a, f):
        return f"0.5 * {f(a[0])} * (1.0 + tl.erf({f(a[0])} * 0.7071067811865476))"

    def _not(self, node, a, f):
        return f"{self.src(a[0])} == 0"

    def _and(self, node, a, f):
        return f"({self.src(a[0])}) & ({self.src(a[1])})"

    def _or(self, node, a, f):
        return f"({self.src(a[0])}) | ({self.src(a[1])})"

    def _where(self, node, a, f):
        return f"tl.where({self.src(a[0])}, {f(a[1])}, {f(a[2])})"

    def _clamp(self, node, a, f):
        x = f(a[0])
        if a[1] is not None:
            x = f"tl.maximum({x}, {f(a[1])})"
        return x if a[2] is None else f"tl.minimum({x}, {f(a[2])})"

    def _to(self, node, a, f):
        if node.dtype == "bool":
            return f"{self.src(a[0])} != 0"
        return f"{self.src(a[0])}.to({TL_TYPES[node.dtype]})"

    def _const(self, node, a, f):
        return f(a[0])

    def _load(self, node, a, f):
        buf = next(b for b in self.expr.buffers if b.name == a[0])
        terms = [f"{self.src(i)}.to(tl.int64) * {s}" if isinstance(i, str) else f"{int(i)} * {s}"
                 for i, s in zip(a[1:], buffer_strides(buf))]
        offset = " + ".join(terms) or "0"
        if node.name in self.varying and self.load_ok:
            offset = f"tl.where({self.load_ok}, {offset}, 0)"  # no read past the tensor for rows/keys out of range
        value = f"tl.load({buffer_pointer(buf)} + {offset})"
        return f"{value}.to(tl.float32)" if buf.dtype in FLOATS else value


def triton_lines(expr: ScoreExpr, ind: str, env: dict[str, str], load_ok: str = "", outputs=None,
                 prefix: str = "sm_") -> tuple[list[str], list[str]]:
    """The statements computing ``expr`` (indented by ``ind``) and the fp32 sources of ``outputs`` (names or
    literals; by default the expression's output).

    ``env`` maps each input (``score``, ``b``, ``h``, ``q_idx``, ``kv_idx``) to kernel source; ``load_ok`` is
    the tile's in-range test (``""`` when every row and key of the tile is in range)."""
    writer = _Writer(expr, env, load_ok, prefix)
    lines = []
    for node in expr.nodes:
        lines.append(f"{ind}{prefix}{node.name} = {writer.line(node)}")
        writer.env[node.name] = f"{prefix}{node.name}"
    outputs = (expr.output,) if outputs is None else outputs
    return lines, [writer.src(o if isinstance(o, str) else float(o), "float") for o in outputs]
