"""A canonical view of torch-level FX nodes, so that patterns match by meaning.

Dynamo graphs spell one operation many ways: ``torch.matmul(a, b)``, ``a @ b`` and ``a.matmul(b)``;
``x.transpose(-1, -2)``, ``x.mT`` and ``x.permute(0, 1, 3, 2)``; ``x.float()``, ``x.to(torch.float32)``
and ``x.type(torch.float32)``. :func:`classify` maps a node to one :class:`Op` of a small vocabulary
(without changing the graph), so a pattern is written once against that vocabulary.

The spellings are a table, :data:`SPELLINGS`: each :class:`Spelling` row names the methods and functions
that spell an op and the small builder that reads one call into an :class:`Op`. A new spelling is one
row and one builder (:func:`register_spelling` adds a row from outside the module).
"""

from __future__ import annotations

import inspect
import operator
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch.fx import Node

MATMUL = "matmul"
TRANSPOSE = "transpose"  # swap of the last two dims
MUL = "mul"
DIV = "div"
ADD = "add"
SOFTMAX = "softmax"
CAST = "cast"  # dtype change or identity (contiguous, clone)
DROPOUT = "dropout"
MASKED_FILL = "masked_fill"
WHERE = "where"
SDPA = "sdpa"
MHA = "mha"
EINSUM = "einsum"  # inputs: operands; attrs: equation (no spaces)
BADDBMM = "baddbmm"  # inputs: (bias, batch1, batch2); attrs: beta, alpha
RESHAPE = "reshape"  # view/reshape/flatten/unflatten/unsqueeze/squeeze: a row-major regrouping of dims
EXPAND = "expand"  # broadcast view (expand / expand_as)
PERMUTE = "permute"  # any permutation; attrs: dims (normalized, non-negative)
REPEAT_INTERLEAVE = "repeat_interleave"  # attrs: repeats (int), dim (normalized)
TANH = "tanh"
SUB = "sub"
NEG = "neg"
CLAMP_MIN = "clamp_min"  # inputs: (x, lower bound): torch.max(x, c), torch.maximum, clamp(min=c), clamp_min
ENCODER_LAYER = "encoder_layer"  # torch._transformer_encoder_layer_fwd (nn.TransformerEncoderLayer fast path)
NATIVE_MHA = "native_mha"  # torch._native_multi_head_attention (nn.MultiheadAttention fast path)


@dataclass(frozen=True)
class Op:
    kind: str
    inputs: tuple[Any, ...]  # positional operands (Nodes or constants) in canonical order
    attrs: dict = field(default_factory=dict)


def _fn_targets(*names: str) -> set:
    """The callables named ``torch.<name>``, ``torch.Tensor.<name>`` and ``F.<name>`` that exist."""
    out = set()
    for name in names:
        for owner in (torch, torch.Tensor, F, torch._C._nn, operator):
            fn = getattr(owner, name, None)
            if fn is not None:
                out.add(fn)
    return out


def _optional_fns(name: str) -> set:
    """``torch.<name>`` when this PyTorch has it (private fast paths come and go)."""
    fn = getattr(torch, name, None)
    return {fn} if fn is not None else set()


_INPLACE_OPERATORS = {operator.itruediv: "div", operator.imul: "mul", operator.iadd: "add", operator.isub: "sub"}
_INPLACE = {"mul_": "mul", "div_": "div", "add_": "add", "sub_": "sub", "masked_fill_": "masked_fill",
            "tanh_": "tanh"}  # fmt: skip
_CAST_METHODS = {"float": torch.float32, "half": torch.float16, "bfloat16": torch.bfloat16, "double": torch.float64}


def meta_value(node: Any) -> Any:
    """The example value dynamo (``example_value``) or make_fx/export (``val``) recorded for ``node``."""
    if not isinstance(node, Node):
        return node
    return node.meta.get("example_value", node.meta.get("val"))


def tensor_meta(node: Any) -> torch.Tensor | None:
    val = meta_value(node)
    return val if isinstance(val, torch.Tensor) else None


def ndim(node: Any) -> int | None:
    t = tensor_meta(node)
    return t.dim() if t is not None else None


def _norm_dim(d: Any, rank: int | None) -> Any:
    if isinstance(d, int) and rank is not None and d < 0:
        return d + rank
    return d


def _is_last_two_swap(node: Node, x: Any, d0: Any, d1: Any) -> bool:
    rank = ndim(x)
    if rank is None or rank < 2:
        return False
    return {_norm_dim(d0, rank), _norm_dim(d1, rank)} == {rank - 1, rank - 2}


def _arg(node: Node, i: int, name: str, default: Any = None) -> Any:
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


def _method_or_fn(node: Node) -> tuple[str | None, Any]:
    if node.op == "call_method":
        return node.target, None
    if node.op == "call_function":
        return None, node.target
    return None, None


def _submodule(node: Node) -> Any:
    gm = node.graph.owning_module
    try:
        return gm.get_submodule(node.target) if gm is not None else None
    except AttributeError:
        return None


def _classify_module(node: Node) -> Op | None:
    """``call_module`` nodes of symbolically traced graphs (dynamo inlines modules into functions)."""
    mod = _submodule(node)
    if mod is None or not node.args:
        return None
    x = node.args[0]
    if isinstance(mod, (torch.nn.Softmax,)):
        return Op(SOFTMAX, (x,), {"dim": _norm_dim(mod.dim, ndim(x)), "rank": ndim(x), "dtype": None})
    if isinstance(mod, torch.nn.Dropout):
        return Op(DROPOUT, (x,), {"p": float(mod.p) if mod.training else 0.0})
    if isinstance(mod, torch.nn.Identity):
        return Op(CAST, (x,), {"dtype": None})
    if isinstance(mod, torch.nn.Tanh):
        return Op(TANH, (x,))
    return None


def _is_unsqueeze_index(idx: Any) -> bool:
    """``x[:, :, None]``-style indexing: only full slices, ``None`` and at most one Ellipsis."""
    idx = idx if isinstance(idx, tuple) else (idx,)
    if not any(i is None for i in idx) or sum(i is Ellipsis for i in idx) > 1:
        return False
    return all(i is None or i is Ellipsis or (isinstance(i, slice) and i == slice(None)) for i in idx)


_EXP_FNS = _fn_targets("exp")
_SUM_FNS = _fn_targets("sum")


def _written_softmax(e: Any, total: Any) -> Op | None:
    """``exp(x) / exp(x).sum(-1, keepdim=True)``: softmax written out (the same ``exp`` node both times)."""
    if not isinstance(e, Node) or not isinstance(total, Node) or e.op not in ("call_function", "call_method"):
        return None
    if not (e.target == "exp" or e.target in _EXP_FNS) or len(e.args) != 1:
        return None
    if not (total.target == "sum" or total.target in _SUM_FNS) or not total.args or total.args[0] is not e:
        return None
    dim, keepdim = _arg(total, 1, "dim"), _arg(total, 2, "keepdim", False)
    rank = ndim(e)
    if isinstance(dim, (list, tuple)) and len(dim) == 1:
        dim = dim[0]
    if rank is None or not isinstance(dim, int) or not keepdim or _norm_dim(dim, rank) != rank - 1:
        return None
    x = e.args[0]
    return Op(SOFTMAX, (x,), {"dim": rank - 1, "rank": rank, "dtype": None, "written": True})


def classify(node: Any) -> Op | None:
    """The canonical :class:`Op` for ``node``, or None when it is outside the vocabulary.

    In-place methods (``mul_``, ``masked_fill_``, ...) classify as their out-of-place kind with
    ``attrs["inplace"] = True``; a matcher may read them as out-of-place only when nothing else reads
    the mutated tensor.
    """
    if not isinstance(node, Node):
        return None
    if node.op == "call_module":
        return _classify_module(node)
    method, fn = _method_or_fn(node)
    if method is None and fn is None:
        return None
    if method in _INPLACE:
        op = _classify(node, _INPLACE[method], None)
        return Op(op.kind, op.inputs, {**op.attrs, "inplace": True}) if op is not None else None
    if fn in _INPLACE_OPERATORS:
        op = _classify(node, _INPLACE_OPERATORS[fn], None)
        return Op(op.kind, op.inputs, {**op.attrs, "inplace": True}) if op is not None else None
    return _classify(node, method, fn)


def bind_call(node: Any, kind: str, signature: inspect.Signature, what: str) -> dict | str | None:
    """The arguments of ``node``, a call of op ``kind``, bound by name to ``signature`` with its
    defaults applied; None when ``node`` is not such a call, a reason string when its arguments do
    not fit ``signature`` (``what`` names the callee in it)."""
    op = classify(node)
    if op is None or op.kind != kind:
        return None
    try:
        bound = signature.bind(*node.args, **node.kwargs)
    except TypeError as exc:
        return f"unrecognized {what} arguments: {exc}"
    bound.apply_defaults()
    return bound.arguments


def _other(node: Node) -> Any:
    """The second operand of a binary op, positional or ``other=``."""
    return node.args[1] if len(node.args) > 1 else node.kwargs.get("other")


def _matmul(node: Node, method: str | None, fn: Any) -> Op:
    args = node.args
    return Op(MATMUL, (args[0], args[1] if len(args) > 1 else node.kwargs.get("other", node.kwargs.get("mat2"))))


def _einsum(node: Node, method: str | None, fn: Any) -> Op | None:
    args = node.args
    operands = args[1:]
    if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
        operands = tuple(operands[0])
    if not isinstance(args[0], str):
        return None
    return Op(EINSUM, tuple(operands), {"equation": args[0].replace(" ", "")})


def _baddbmm(node: Node, method: str | None, fn: Any) -> Op:
    bias, b1, b2 = _arg(node, 0, "input"), _arg(node, 1, "batch1"), _arg(node, 2, "batch2")
    return Op(BADDBMM, (bias, b1, b2), {"beta": node.kwargs.get("beta", 1), "alpha": node.kwargs.get("alpha", 1)})


def _mul(node: Node, method: str | None, fn: Any) -> Op:
    return Op(MUL, (node.args[0], _other(node)))


def _div(node: Node, method: str | None, fn: Any) -> Op | None:
    if node.kwargs.get("rounding_mode") is not None:
        return None
    a, b = node.args[0], _other(node)
    written = _written_softmax(a, b)
    return written if written is not None else Op(DIV, (a, b))


def _add_or_sub(kind: str):
    def build(node: Node, method: str | None, fn: Any) -> Op | None:
        if node.kwargs.get("alpha", 1) != 1:
            return None
        return Op(kind, (node.args[0], _other(node)))

    return build


def _max(node: Node, method: str | None, fn: Any) -> Op | None:
    args = node.args
    if len(args) == 2 and not isinstance(args[1], int):
        return Op(CLAMP_MIN, (args[0], args[1]))
    return None


def _clamp(node: Node, method: str | None, fn: Any) -> Op | None:
    args = node.args
    lo = _arg(node, 1, "min")
    hi = node.kwargs.get("max", args[2] if len(args) > 2 and (method or fn.__name__) != "clamp_min" else None)
    return Op(CLAMP_MIN, (args[0], lo)) if lo is not None and hi is None else None


def _softmax(node: Node, method: str | None, fn: Any) -> Op:
    x, dim = node.args[0], _arg(node, 1, "dim")
    dtype = _arg(node, 2, "dtype") if fn is not F.softmax else node.kwargs.get("dtype", _arg(node, 3, "dtype"))
    return Op(SOFTMAX, (x,), {"dim": _norm_dim(dim, ndim(x)), "rank": ndim(x), "dtype": dtype})


def _dropout(node: Node, method: str | None, fn: Any) -> Op:
    p = _arg(node, 1, "p", 0.5)
    training = _arg(node, 2, "training" if fn is not torch.dropout else "train", True)
    return Op(DROPOUT, (node.args[0],), {"p": p if training else 0.0})


def _transpose(node: Node, method: str | None, fn: Any) -> Op | None:
    x = node.args[0]
    rank = ndim(x)
    d0, d1 = _arg(node, 1, "dim0"), _arg(node, 2, "dim1")
    if _is_last_two_swap(node, x, d0, d1):
        return Op(TRANSPOSE, (x,))
    if rank is not None and isinstance(d0, int) and isinstance(d1, int):
        perm = list(range(rank))
        a, b = _norm_dim(d0, rank), _norm_dim(d1, rank)
        perm[a], perm[b] = perm[b], perm[a]
        return Op(PERMUTE, (x,), {"dims": tuple(perm)})
    return None


def _permute(node: Node, method: str | None, fn: Any) -> Op | None:
    x, dims = node.args[0], _arg(node, 1, "dims")
    if method == "permute" and not isinstance(dims, (list, tuple)):
        dims = node.args[1:]
    rank = ndim(x)
    if rank is None or dims is None or len(dims) != rank or not all(isinstance(d, int) for d in dims):
        return None
    perm = [_norm_dim(d, rank) for d in dims]
    if perm == list(range(rank - 2)) + [rank - 1, rank - 2]:
        return Op(TRANSPOSE, (x,))
    return Op(PERMUTE, (x,), {"dims": tuple(perm)})


def _getattr(node: Node, method: str | None, fn: Any) -> Op | None:
    args = node.args
    if len(args) == 2 and (args[1] == "mT" or (args[1] == "T" and ndim(args[0]) == 2)):
        return Op(TRANSPOSE, (args[0],))
    return None


def _cast_method(node: Node, method: str | None, fn: Any) -> Op:
    return Op(CAST, (node.args[0],), {"dtype": _CAST_METHODS[method]})


def _to(node: Node, method: str | None, fn: Any) -> Op | None:
    args = node.args
    targets = [a for a in list(args[1:]) + list(node.kwargs.values()) if isinstance(a, torch.dtype)]
    if len(targets) == 1 or (method == "to" and not targets and "dtype" not in node.kwargs):
        return Op(CAST, (args[0],), {"dtype": targets[0] if targets else None})
    return None


def _type_as(node: Node, method: str | None, fn: Any) -> Op:
    other = tensor_meta(node.args[1])
    return Op(CAST, (node.args[0],), {"dtype": other.dtype if other is not None else None})


def _masked_fill(node: Node, method: str | None, fn: Any) -> Op:
    return Op(MASKED_FILL, (node.args[0], _arg(node, 1, "mask"), _arg(node, 2, "value")))


def _where(node: Node, method: str | None, fn: Any) -> Op | None:
    return Op(WHERE, tuple(node.args)) if len(node.args) == 3 else None


def _reshape(node: Node, method: str | None, fn: Any) -> Op:
    return Op(RESHAPE, (node.args[0] if node.args else node.kwargs.get("input"),))


def _getitem(node: Node, method: str | None, fn: Any) -> Op | None:
    args = node.args
    if len(args) == 2 and isinstance(tensor_meta(args[0]), torch.Tensor) and _is_unsqueeze_index(args[1]):
        return Op(RESHAPE, (args[0],))
    return None


def _repeat_interleave(node: Node, method: str | None, fn: Any) -> Op | None:
    x, repeats, dim = node.args[0], _arg(node, 1, "repeats"), _arg(node, 2, "dim")
    if isinstance(repeats, int) and isinstance(dim, int) and ndim(x) is not None:
        return Op(REPEAT_INTERLEAVE, (x,), {"repeats": repeats, "dim": _norm_dim(dim, ndim(x))})
    return None


def _unary(kind: str, **attrs: Any):
    """A row builder for ``kind(x)``: the first argument is the only operand."""

    def build(node: Node, method: str | None, fn: Any) -> Op:
        return Op(kind, (node.args[0],), dict(attrs))

    return build


def _whole_call(kind: str):
    def build(node: Node, method: str | None, fn: Any) -> Op:
        return Op(kind, tuple(node.args), dict(node.kwargs))

    return build


@dataclass(frozen=True)
class Spelling:
    """One row of the spelling table: the methods and functions that spell an op, and how to read one.

    ``build(node, method, fn)`` (``method``: the method name of a ``call_method`` node, else None;
    ``fn``: the target of a ``call_function`` node, else None) returns the :class:`Op`, or None when
    this call is not in the vocabulary after all (e.g. ``div`` with a rounding mode).
    """

    build: Callable[[Node, str | None, Any], Op | None]
    methods: frozenset = frozenset()
    fns: frozenset = frozenset()


def _row(build, methods=(), fns=()) -> Spelling:
    return Spelling(build, frozenset(methods), frozenset(fns))


# The op spellings, first row first (a name in two rows is read by the first).
SPELLINGS: tuple[Spelling, ...] = (
    _row(_matmul, {"matmul", "bmm"}, _fn_targets("matmul", "bmm") | {operator.matmul}),
    _row(_einsum, (), {torch.einsum, torch.functional.einsum}),
    _row(_baddbmm, {"baddbmm"}, _fn_targets("baddbmm")),
    _row(_mul, {"mul", "multiply"}, _fn_targets("mul", "multiply") | {operator.mul}),
    _row(_div, {"div", "divide", "true_divide"}, _fn_targets("div", "divide", "true_divide") | {operator.truediv}),
    _row(_add_or_sub(ADD), {"add"}, _fn_targets("add") | {operator.add}),
    _row(_add_or_sub(SUB), {"sub", "subtract"}, _fn_targets("sub", "subtract") | {operator.sub}),
    _row(_unary(NEG), {"neg", "negative"}, _fn_targets("neg", "negative") | {operator.neg}),
    _row(_max, {"max", "maximum"}, {torch.max, torch.maximum, torch.Tensor.max, torch.Tensor.maximum}),
    _row(_clamp, {"clamp", "clip", "clamp_min"}, _fn_targets("clamp", "clip", "clamp_min")),
    _row(_softmax, {"softmax", "_safe_softmax"}, _fn_targets("softmax", "_safe_softmax") | {torch.special.softmax}),
    _row(_dropout, (), {F.dropout, torch.dropout, torch.nn.functional.dropout}),
    _row(_transpose, {"transpose", "swapaxes", "swapdims"}, _fn_targets("transpose", "swapaxes", "swapdims")),
    _row(_permute, {"permute"}, _fn_targets("permute")),
    _row(_getattr, (), {getattr}),
    _row(_unary(CAST, dtype=None), {"contiguous", "clone"}),
    _row(_cast_method, _CAST_METHODS),
    _row(_to, {"to", "type"}),
    _row(_type_as, {"type_as"}),
    _row(_masked_fill, {"masked_fill"}, _fn_targets("masked_fill")),
    _row(_where, (), _fn_targets("where")),
    _row(_unary(TANH), {"tanh"}, _fn_targets("tanh")),
    _row(_reshape, {"view", "reshape", "flatten", "unflatten", "unsqueeze", "squeeze", "view_as", "reshape_as"},
         _fn_targets("reshape", "flatten", "unflatten", "unsqueeze", "squeeze")),
    _row(_getitem, (), {operator.getitem}),
    _row(_unary(EXPAND), {"expand", "expand_as", "broadcast_to"}, {torch.broadcast_to}),
    _row(_repeat_interleave, {"repeat_interleave"}, _fn_targets("repeat_interleave")),
    _row(_whole_call(SDPA), (), {F.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention}),
    _row(_whole_call(MHA), (), {F.multi_head_attention_forward}),
    _row(_whole_call(ENCODER_LAYER), (), _optional_fns("_transformer_encoder_layer_fwd")),
    _row(_whole_call(NATIVE_MHA), (), _optional_fns("_native_multi_head_attention")),
)  # fmt: skip
_registered: list[Spelling] = list(SPELLINGS)
_index: dict[tuple[str, Any], Spelling] = {}


def _reindex() -> None:
    _index.clear()
    for row in _registered:
        for name in row.methods:
            _index.setdefault(("method", name), row)
        for fn in row.fns:
            _index.setdefault(("fn", fn), row)


def register_spelling(row: Spelling) -> None:
    """Adds ``row`` to the spelling table (after the built-in rows: a name they spell stays theirs)."""
    _registered.append(row)
    _reindex()


def unregister_spelling(row: Spelling) -> None:
    """Removes a row :func:`register_spelling` added."""
    _registered.remove(row)
    _reindex()


_reindex()


def _classify(node: Node, method: str | None, fn: Any) -> Op | None:
    row = _index.get(("method", method)) if method is not None else _index.get(("fn", fn))
    return row.build(node, method, fn) if row is not None else None


def scalar_value(x: Any) -> float | None:
    """A Python number for a constant scalar operand, else None."""
    if isinstance(x, bool):
        return None
    if isinstance(x, (int, float)):
        return float(x)
    return None


def shape(x: Any) -> tuple | None:
    t = tensor_meta(x)
    return tuple(t.shape) if t is not None else None


def is_symbolic_scalar(x: Any) -> bool:
    """A node whose value is a Python number (e.g. ``q.size(-1) ** -0.5`` under dynamic shapes), not a tensor."""
    if not isinstance(x, Node):
        return False
    val = meta_value(x)
    return isinstance(val, (int, float, torch.SymInt, torch.SymFloat)) and not isinstance(val, bool)
