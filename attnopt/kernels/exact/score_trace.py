"""Traces a FlexAttention-style ``score_mod`` into a :class:`~attnopt.codegen.score_expr.ScoreExpr`, and
evaluates one on tensors.

:func:`trace` runs ``score_mod(score, b, h, q_idx, kv_idx)`` once under ``make_fx`` on fake one-element
inputs (``score`` fp32, the indices int32, as FlexAttention passes them), with the core ATen decompositions, and
maps each ATen op of the graph to an expression op (:data:`ATEN_OPS`). Tensors the function captures become
the expression's buffers (one-element constants that need no gradient become literals), so a table indexed by
``table[h, bucket]`` is a kernel argument read at that index. A mask descriptor's predicate (except plain
causal, which the kernels skip tile by tile) is traced into the same expression: ``where(predicate, score_mod,
-inf)``. A function the tracer cannot follow (a Python ``if`` on a tensor, ``.item()``) or an op outside the
table raises :class:`ScoreModError` naming the op and the fix.

:func:`evaluate` computes an expression with torch ops on broadcast tensors (the CPU path, blockwise).
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import unset_fake_temporarily
from torch.fx.experimental.proxy_tensor import make_fx

from attnopt.codegen.score_expr import ARITY, POW_EXPONENTS, Buffer, Node, ScoreExpr
from attnopt.masks.expr import TORCH

aten = torch.ops.aten


class ScoreModError(ValueError):
    """A score_mod attnopt cannot compile into its kernels."""


_SAME = ("neg", "abs", "exp", "exp2", "log", "log2", "sqrt", "rsqrt", "sin", "cos", "tanh", "sigmoid", "erf",
         "floor", "ceil", "relu", "minimum", "maximum")  # fmt: skip
ATEN_OPS = {getattr(aten, name).default: name for name in _SAME}
ATEN_OPS.update({
    aten.add.Tensor: "add", aten.add.Scalar: "add", aten.sub.Tensor: "sub", aten.sub.Scalar: "sub",
    aten.mul.Tensor: "mul", aten.mul.Scalar: "mul", aten.div.Tensor: "div", aten.div.Scalar: "div",
    aten.remainder.Tensor: "mod", aten.remainder.Scalar: "mod", aten.floor_divide.default: "floordiv",
    aten.pow.Tensor_Scalar: "pow", aten.logical_and.default: "and", aten.logical_or.default: "or",
    aten.logical_not.default: "not", aten.bitwise_and.Tensor: "and", aten.bitwise_or.Tensor: "or",
    aten.bitwise_not.default: "not", aten.gelu.default: "gelu", aten.index.Tensor: "load",
    aten.clamp.default: "clamp", aten._to_copy.default: "to", aten.full_like.default: "const",
    aten.scalar_tensor.default: "const", aten.where.self: "where",
    # in-place forms (``x += y`` on a value the function computed): make_fx refers later uses to their result
    aten.add_.Tensor: "add", aten.sub_.Tensor: "sub", aten.mul_.Tensor: "mul", aten.div_.Tensor: "div",
    **{getattr(aten, c).Tensor: c for c in ("lt", "le", "gt", "ge", "eq", "ne")},
    **{getattr(aten, c).Scalar: c for c in ("lt", "le", "gt", "ge", "eq", "ne")},
})  # fmt: skip
_PASS = {aten.lift_fresh_copy.default, aten.clone.default, aten.alias.default, aten.detach.default,
         aten.view.default, aten.expand.default, aten.unsqueeze.default, aten.squeeze.dim, aten.squeeze.default}
_FIX = ("write it with elementwise torch ops (+ - * /, exp, log, tanh, sigmoid, abs, minimum, maximum, clamp, "
        "where, comparisons, .to(dtype)) and tensor[index] lookups with one index per dimension")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


@dataclass(frozen=True)
class Traced:
    """A traced score_mod: its expression and the tensors bound to its buffers, in order."""

    expr: ScoreExpr
    buffers: tuple[torch.Tensor, ...]


class _Converter:
    """Walks a make_fx graph into expression nodes."""

    def __init__(self, gm: torch.fx.GraphModule, originals: list[torch.Tensor]):
        self.gm, self.originals = gm, originals
        self.env: dict[torch.fx.Node, object] = {}
        self.nodes: list[Node] = []
        self.buffers: list[Buffer] = []
        self.tensors: list[torch.Tensor] = []

    def run(self) -> Traced:
        placeholders = iter(("score", "b", "h", "q_idx", "kv_idx"))
        for node in self.gm.graph.nodes:
            if node.op == "placeholder":
                self.env[node] = next(placeholders)
            elif node.op == "get_attr":
                self.env[node] = self.constant(getattr(self.gm, node.target))
            elif node.op == "call_function":
                self.env[node] = self.call(node)
            elif node.op == "output":
                out = self.arg(node.args[0])
                out = out[0] if isinstance(out, (list, tuple)) else out
                return Traced(ScoreExpr(tuple(self.buffers), tuple(self.nodes), out), tuple(self.tensors))
        raise ScoreModError("score_mod's traced graph has no output")

    def constant(self, t: torch.Tensor):
        t = next((o for o in self.originals if o is t or _same_storage(o, t)), t)
        if t.numel() == 1 and t.dim() == 0 and not t.requires_grad:
            return t.item()
        for i, known in enumerate(self.tensors):
            if known is t:
                return self.buffers[i].name
        self.buffers.append(Buffer(f"buf{len(self.buffers)}", _dtype_name(t.dtype), t.dim()))
        self.tensors.append(t)
        return self.buffers[-1].name

    def arg(self, a):
        if isinstance(a, torch.fx.Node):
            return self.env[a]
        if isinstance(a, (list, tuple)):
            return [self.arg(x) for x in a]
        return a

    def emit(self, op: str, args: tuple, node: torch.fx.Node):
        val = node.meta.get("val")
        if not isinstance(val, torch.Tensor) or val.numel() != 1:
            shape = tuple(val.shape) if isinstance(val, torch.Tensor) else val
            raise ScoreModError(f"score_mod's {node.target} gives {shape} from one score element; a score_mod must "
                                f"be elementwise: {_FIX}")
        name = f"t{len(self.nodes)}"
        self.nodes.append(Node(name, op, tuple(args), _dtype_name(val.dtype)))
        return name

    def call(self, node: torch.fx.Node):
        target, args, kw = node.target, [self.arg(a) for a in node.args], node.kwargs
        if target in _PASS:
            return args[0]
        if target is aten.select.int and isinstance(args[0], (str, _Selection)):
            return self.select(args[0], args[1], args[2])
        if target is not aten.index.Tensor and any(isinstance(a, _Selection) for a in args):
            args = [self.load_selection(a, node) if isinstance(a, _Selection) else a for a in args]
        op = ATEN_OPS.get(target)
        if op is None and target is aten.div.Tensor_mode:
            op = {None: "div", "floor": "floordiv"}.get(kw.get("rounding_mode"))
        if op is None:
            raise ScoreModError(f"score_mod uses {target}, which attnopt cannot compile into its kernels; {_FIX}")
        if kw.get("alpha", 1) != 1 or (op == "gelu" and kw.get("approximate", "none") != "none"):
            raise ScoreModError(f"score_mod uses {target} with {dict(kw)}; {_FIX}")
        return self.emit(op, self.operands(op, args, kw, node), node)

    def select(self, base, dim: int, index: int):
        """``buffer[..., index, ...]`` with a constant index (a slice of a captured table): kept as a pending
        :class:`_Selection`, folded into the load that indexes it."""
        sel = base if isinstance(base, _Selection) else _Selection(base, ())
        if not isinstance(base, _Selection) and base not in [b.name for b in self.buffers]:
            raise ScoreModError(f"score_mod selects index {index} of a per-element value; {_FIX}")
        tensor = self.tensors[int(sel.buffer[len("buf"):])]
        free = [d for d in range(tensor.dim()) if d not in dict(sel.fixed)]
        dim = free[dim]
        return _Selection(sel.buffer, sel.fixed + ((dim, index % tensor.shape[dim]),))

    def load_selection(self, sel: "_Selection", node):
        index = self.full_index(sel, [])
        name = f"t{len(self.nodes)}"
        dtype = next(b.dtype for b in self.buffers if b.name == sel.buffer)
        self.nodes.append(Node(name, "load", (sel.buffer, *index), dtype))
        return name

    def full_index(self, sel, index: list) -> list:
        buf = next((b for b in self.buffers if b.name == (sel.buffer if isinstance(sel, _Selection) else sel)), None)
        fixed = dict(sel.fixed) if isinstance(sel, _Selection) else {}
        rest = iter(index)
        full = [fixed[d] if d in fixed else next(rest, None) for d in range(buf.ndim)] if buf else [None]
        if buf is None or any(i is None for i in full) or next(rest, None) is not None:
            raise ScoreModError(f"score_mod indexes a captured tensor by {index}; index a tensor captured by "
                                "the function with one index per dimension (table[h, bucket], not table[:, i])")
        return full

    def operands(self, op: str, args: list, kw, node) -> tuple:
        if op == "load":
            table, index = args
            if any(i is None for i in index):
                self.full_index(None, index)
            full = self.full_index(table, list(index))
            return (table.buffer if isinstance(table, _Selection) else table, *full)
        if op == "to":
            return (args[0],)
        if op == "const":
            return (args[1] if node.target is aten.full_like.default else args[0],)
        if op == "clamp":
            lo = args[1] if len(args) > 1 else kw.get("min")
            return (args[0], lo, args[2] if len(args) > 2 else kw.get("max"))
        if op == "pow" and float(args[1]) not in POW_EXPONENTS:
            raise ScoreModError(f"score_mod raises to the power {args[1]}; attnopt compiles the exponents "
                                f"{POW_EXPONENTS} (write x ** c as exp(c * log(x)) for x > 0)")
        return tuple(args[: ARITY[op]])


@dataclass(frozen=True)
class _Selection:
    """A captured tensor with some dimensions fixed by constant indices: ``((dim, index), ...)``."""

    buffer: str
    fixed: tuple


def _same_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a.dtype == b.dtype and a.shape == b.shape and a.stride() == b.stride() and a.device == b.device
            and a.data_ptr() == b.data_ptr())


def captured(fn, path: tuple = (), depth: int = 0) -> list[tuple[tuple, torch.Tensor]]:
    """``(path, tensor)`` of each tensor in ``fn``'s closure (and nested functions' closures, and lists or tuples
    there): the originals of the graph's constants, so gradients reach them (make_fx may hold a detached alias).
    A path is ``(cell number, item number or None, cell number, ...)``, read back by :func:`resolve`."""
    out = []
    for i, cell in enumerate(getattr(fn, "__closure__", None) or ()):
        try:
            value = cell.cell_contents
        except ValueError:
            continue
        if isinstance(value, torch.Tensor):
            out.append(((*path, i, None), value))
        elif isinstance(value, (list, tuple)):
            out += [((*path, i, j), v) for j, v in enumerate(value) if isinstance(v, torch.Tensor)]
        elif callable(value) and depth < 4:
            out += captured(value, (*path, i, None), depth + 1)
    return out


def resolve(fn, path: tuple) -> torch.Tensor:
    """The tensor at ``path`` (see :func:`captured`) in ``fn``'s closure: plain attribute reads, which
    ``torch.compile`` follows (the tensors become graph inputs)."""
    value = fn
    for i in range(0, len(path), 2):
        value = value.__closure__[path[i]].cell_contents
        if path[i + 1] is not None:
            value = value[path[i + 1]]
    return value


def closure_values(fn, depth: int = 0) -> tuple:
    """The plain values (numbers, strings) ``fn`` and the functions it closes over capture: the expression
    depends on them besides the tensors (they are traced in as literals)."""
    out = []
    for cell in getattr(fn, "__closure__", None) or ():
        value = cell.cell_contents
        if isinstance(value, (bool, int, float, str)):
            out.append(value)
        elif callable(value) and not isinstance(value, torch.Tensor) and depth < 4:
            out += closure_values(value, depth + 1)
    return tuple(out)


def buffer_paths(score_mod, traced: Traced) -> tuple | None:
    """The closure path of each of ``traced``'s buffers in ``score_mod``, or None if one is not in its closure."""
    found = captured(score_mod)
    paths = []
    for buf in traced.buffers:
        path = next((p for p, t in found if t is buf), None)
        if path is None:
            return None
        paths.append(path)
    return tuple(paths)


_CACHE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def trace(score_mod, mask=None, seq_q: int = 0, seq_k: int = 0) -> Traced:
    """``score_mod`` (with ``mask``'s predicate, see the module docstring) as an expression; cached per function."""
    key = (mask, seq_q, seq_k) if mask is not None else None
    try:
        per_fn = _CACHE.setdefault(score_mod, {})
    except TypeError:  # not weakly referenceable: trace every call
        per_fn = {}
    if key not in per_fn:
        per_fn[key] = _trace(score_mod, mask, seq_q, seq_k)
    return per_fn[key]


def _trace(score_mod, mask, seq_q: int, seq_k: int) -> Traced:
    inner = score_mod if score_mod is not None else (lambda score, b, h, q_idx, kv_idx: score)
    fn = inner
    if mask is not None:

        def fn(score, b, h, q_idx, kv_idx):
            keep = mask.predicate(q_idx, kv_idx, h, seq_q, seq_k, TORCH)
            return torch.where(keep, inner(score, b, h, q_idx, kv_idx), -math.inf)

    inputs = [torch.zeros(1)] + [torch.zeros(1, dtype=torch.int32) for _ in range(4)]
    try:
        # Its own fake mode: inside a compiler backend the ambient tracing context's mode refuses real tensors.
        with torch._guards.tracing(None), unset_fake_temporarily():
            gm = make_fx(fn, tracing_mode="fake", decomposition_table=torch._decomp.core_aten_decompositions(),
                         _allow_non_fake_inputs=True)(*inputs)
    except ScoreModError:
        raise
    except Exception as e:
        if "data-dependent" in str(e) or "DataDependent" in type(e).__name__:
            raise ScoreModError(
                "score_mod branches on a tensor value (a Python if/and/or/bool()/.item() on score or an index), "
                "which no kernel can compile; write the branch as torch.where(condition, a, b)") from e
        raise ScoreModError(f"tracing score_mod failed ({type(e).__name__}: {e}); {_FIX}") from e
    originals = [t for _, t in captured(score_mod)]
    return _Converter(gm, originals).run()


_TORCH = {
    "add": torch.add, "sub": torch.sub, "mul": torch.mul, "div": torch.div, "mod": torch.remainder,
    "floordiv": lambda a, b: torch.div(a, b, rounding_mode="floor"), "neg": torch.neg, "abs": torch.abs,
    "exp": torch.exp, "exp2": torch.exp2, "log": torch.log, "log2": torch.log2, "sqrt": torch.sqrt,
    "rsqrt": torch.rsqrt, "sin": torch.sin, "cos": torch.cos, "tanh": torch.tanh, "sigmoid": torch.sigmoid,
    "erf": torch.erf, "floor": torch.floor, "ceil": torch.ceil, "relu": torch.relu, "gelu": F.gelu,
    "minimum": torch.minimum, "maximum": torch.maximum, "and": torch.logical_and, "or": torch.logical_or,
    "not": torch.logical_not, "where": torch.where,
    **{c: getattr(torch, c) for c in ("lt", "le", "gt", "ge", "eq", "ne")},
}  # fmt: skip


def evaluate(expr: ScoreExpr, inputs: dict[str, torch.Tensor], buffers, extra=None):
    """``expr`` on broadcast tensors ``inputs`` (``score``, ``b``, ``h``, ``q_idx``, ``kv_idx``), in torch ops,
    broadcast to ``score``'s shape and dtype; with ``extra`` (names or literals), ``(value, [their values])``
    with the extra values broadcast to ``score``'s shape in their own dtypes."""
    env = dict(inputs, **{b.name: t for b, t in zip(expr.buffers, buffers)})
    device = inputs["score"].device

    def val(a):
        if isinstance(a, str):
            return env[a]
        return a if a is None else torch.as_tensor(a, device=device)

    for node in expr.nodes:
        a = node.args
        if node.op == "load":
            env[node.name] = env[a[0]][tuple(env[i].long() if isinstance(i, str) else i for i in a[1:])]
        elif node.op in ("to", "const"):
            env[node.name] = val(a[0]).to(getattr(torch, node.dtype))
        elif node.op == "pow":
            env[node.name] = torch.pow(val(a[0]), float(a[1]))
        elif node.op == "clamp":
            env[node.name] = torch.clamp(val(a[0]), a[1], a[2])
        else:
            env[node.name] = _TORCH[node.op](*(val(x) for x in a))
    score = inputs["score"]
    out = val(expr.output).to(score.dtype).expand(score.shape)
    return out if extra is None else (out, [val(a).expand(score.shape) for a in extra])
