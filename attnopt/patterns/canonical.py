"""A canonical view of torch-level FX nodes, so that patterns match by meaning.

Dynamo graphs spell one operation many ways: ``torch.matmul(a, b)``, ``a @ b`` and ``a.matmul(b)``;
``x.transpose(-1, -2)``, ``x.mT`` and ``x.permute(0, 1, 3, 2)``; ``x.float()``, ``x.to(torch.float32)``
and ``x.type(torch.float32)``. :func:`classify` maps a node to one :class:`Op` of a small vocabulary
(without changing the graph), so a pattern is written once against that vocabulary.
"""

from __future__ import annotations

import inspect
import math
import operator
from dataclasses import dataclass, field
from typing import Any

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


_MATMUL_FNS = _fn_targets("matmul", "bmm") | {operator.matmul}
_EINSUM_FNS = {torch.einsum, torch.functional.einsum}
_BADDBMM_FNS = _fn_targets("baddbmm")
_RESHAPE_FNS = _fn_targets("reshape", "flatten", "unflatten", "unsqueeze", "squeeze")
_RESHAPE_METHODS = {"view", "reshape", "flatten", "unflatten", "unsqueeze", "squeeze", "view_as", "reshape_as"}
_EXPAND_METHODS = {"expand", "expand_as", "broadcast_to"}
_REPEAT_INTERLEAVE_FNS = _fn_targets("repeat_interleave")
_TANH_FNS = _fn_targets("tanh")
_SUB_FNS = _fn_targets("sub", "subtract") | {operator.sub}
_NEG_FNS = _fn_targets("neg", "negative") | {operator.neg}
_ENCODER_LAYER_FNS = {f for f in (getattr(torch, "_transformer_encoder_layer_fwd", None),) if f is not None}
_NATIVE_MHA_FNS = {f for f in (getattr(torch, "_native_multi_head_attention", None),) if f is not None}
_INPLACE_OPERATORS = {operator.itruediv: "div", operator.imul: "mul", operator.iadd: "add", operator.isub: "sub"}
_MAX_FNS = {torch.max, torch.maximum, torch.Tensor.max, torch.Tensor.maximum}
_CLAMP_FNS = _fn_targets("clamp", "clip", "clamp_min")
_INPLACE = {"mul_": "mul", "div_": "div", "add_": "add", "sub_": "sub", "masked_fill_": "masked_fill",
            "tanh_": "tanh"}  # fmt: skip
_MUL_FNS = _fn_targets("mul", "multiply") | {operator.mul}
_DIV_FNS = _fn_targets("div", "divide", "true_divide") | {operator.truediv}
_ADD_FNS = _fn_targets("add") | {operator.add}
_SOFTMAX_FNS = _fn_targets("softmax", "_safe_softmax") | {torch.special.softmax}
_DROPOUT_FNS = {F.dropout, torch.dropout, torch.nn.functional.dropout}
_TRANSPOSE_FNS = _fn_targets("transpose", "swapaxes", "swapdims")
_PERMUTE_FNS = _fn_targets("permute")
_MASKED_FILL_FNS = _fn_targets("masked_fill")
_WHERE_FNS = _fn_targets("where")
_SDPA_FNS = {F.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention}
_MHA_FNS = {F.multi_head_attention_forward}
_IDENTITY_METHODS = {"contiguous", "clone"}
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


def _classify(node: Node, method: str | None, fn: Any) -> Op | None:
    args = node.args
    if method == "matmul" or method == "bmm" or fn in _MATMUL_FNS:
        return Op(MATMUL, (args[0], args[1] if len(args) > 1 else node.kwargs.get("other", node.kwargs.get("mat2"))))
    if fn in _EINSUM_FNS:
        operands = args[1:]
        if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
            operands = tuple(operands[0])
        if not isinstance(args[0], str):
            return None
        return Op(EINSUM, tuple(operands), {"equation": args[0].replace(" ", "")})
    if method == "baddbmm" or fn in _BADDBMM_FNS:
        bias = _arg(node, 0, "input")
        b1 = _arg(node, 1, "batch1")
        b2 = _arg(node, 2, "batch2")
        return Op(BADDBMM, (bias, b1, b2), {"beta": node.kwargs.get("beta", 1), "alpha": node.kwargs.get("alpha", 1)})
    if method in ("mul", "multiply") or fn in _MUL_FNS:
        return Op(MUL, (args[0], args[1] if len(args) > 1 else node.kwargs.get("other")))
    if method in ("div", "divide", "true_divide") or fn in _DIV_FNS:
        if node.kwargs.get("rounding_mode") is not None:
            return None
        a, b = args[0], args[1] if len(args) > 1 else node.kwargs.get("other")
        written = _written_softmax(a, b)
        if written is not None:
            return written
        return Op(DIV, (a, b))
    if method == "add" or fn in _ADD_FNS:
        alpha = node.kwargs.get("alpha", 1)
        if alpha != 1:
            return None
        return Op(ADD, (args[0], args[1] if len(args) > 1 else node.kwargs.get("other")))
    if method in ("sub", "subtract") or fn in _SUB_FNS:
        if node.kwargs.get("alpha", 1) != 1:
            return None
        return Op(SUB, (args[0], args[1] if len(args) > 1 else node.kwargs.get("other")))
    if method in ("neg", "negative") or fn in _NEG_FNS:
        return Op(NEG, (args[0],))
    if (method in ("max", "maximum") or fn in _MAX_FNS) and len(args) == 2 and not isinstance(args[1], int):
        return Op(CLAMP_MIN, (args[0], args[1]))
    if method in ("clamp", "clip", "clamp_min") or fn in _CLAMP_FNS:
        lo = _arg(node, 1, "min")
        hi = node.kwargs.get("max", args[2] if len(args) > 2 and (method or fn.__name__) != "clamp_min" else None)
        if lo is not None and hi is None:
            return Op(CLAMP_MIN, (args[0], lo))
        return None
    if method in ("softmax", "_safe_softmax") or fn in _SOFTMAX_FNS:
        dim = _arg(node, 1, "dim")
        dtype = _arg(node, 2, "dtype") if fn is not F.softmax else node.kwargs.get("dtype", _arg(node, 3, "dtype"))
        return Op(SOFTMAX, (args[0],), {"dim": _norm_dim(dim, ndim(args[0])), "rank": ndim(args[0]), "dtype": dtype})
    if fn in _DROPOUT_FNS:
        p = _arg(node, 1, "p", 0.5)
        training = _arg(node, 2, "training" if fn is not torch.dropout else "train", True)
        return Op(DROPOUT, (args[0],), {"p": p if training else 0.0})
    if method == "transpose" or method in ("swapaxes", "swapdims") or fn in _TRANSPOSE_FNS:
        rank = ndim(args[0])
        d0, d1 = _arg(node, 1, "dim0"), _arg(node, 2, "dim1")
        if _is_last_two_swap(node, args[0], d0, d1):
            return Op(TRANSPOSE, (args[0],))
        if rank is not None and isinstance(d0, int) and isinstance(d1, int):
            perm = list(range(rank))
            a, b = _norm_dim(d0, rank), _norm_dim(d1, rank)
            perm[a], perm[b] = perm[b], perm[a]
            return Op(PERMUTE, (args[0],), {"dims": tuple(perm)})
        return None
    if method == "permute" or fn in _PERMUTE_FNS:
        dims = _arg(node, 1, "dims")
        if method == "permute" and not isinstance(dims, (list, tuple)):
            dims = args[1:]
        rank = ndim(args[0])
        if rank is not None and dims is not None and len(dims) == rank and all(isinstance(d, int) for d in dims):
            perm = [_norm_dim(d, rank) for d in dims]
            if perm == list(range(rank - 2)) + [rank - 1, rank - 2]:
                return Op(TRANSPOSE, (args[0],))
            return Op(PERMUTE, (args[0],), {"dims": tuple(perm)})
        return None
    if node.op == "call_function" and fn is getattr and len(args) == 2:
        if args[1] == "mT" or (args[1] == "T" and ndim(args[0]) == 2):
            return Op(TRANSPOSE, (args[0],))
        return None
    if method in _IDENTITY_METHODS:
        return Op(CAST, (args[0],), {"dtype": None})
    if method in _CAST_METHODS:
        return Op(CAST, (args[0],), {"dtype": _CAST_METHODS[method]})
    if method in ("to", "type"):
        targets = [a for a in list(args[1:]) + list(node.kwargs.values()) if isinstance(a, torch.dtype)]
        if len(targets) == 1 or (method == "to" and not targets and "dtype" not in node.kwargs):
            return Op(CAST, (args[0],), {"dtype": targets[0] if targets else None})
        return None
    if method == "type_as":
        return Op(CAST, (args[0],), {"dtype": tensor_meta(args[1]).dtype if tensor_meta(args[1]) is not None else None})
    if method == "masked_fill" or fn in _MASKED_FILL_FNS:
        return Op(MASKED_FILL, (args[0], _arg(node, 1, "mask"), _arg(node, 2, "value")))
    if fn in _WHERE_FNS and len(args) == 3:
        return Op(WHERE, tuple(args))
    if method in ("tanh",) or fn in _TANH_FNS:
        return Op(TANH, (args[0],))
    if method in _RESHAPE_METHODS or fn in _RESHAPE_FNS:
        return Op(RESHAPE, (args[0] if args else node.kwargs.get("input"),))
    if fn is operator.getitem and len(args) == 2 and isinstance(tensor_meta(args[0]), torch.Tensor):
        if _is_unsqueeze_index(args[1]):
            return Op(RESHAPE, (args[0],))
        return None
    if method in _EXPAND_METHODS or fn is torch.broadcast_to:
        return Op(EXPAND, (args[0],))
    if method == "repeat_interleave" or fn in _REPEAT_INTERLEAVE_FNS:
        repeats, dim = _arg(node, 1, "repeats"), _arg(node, 2, "dim")
        if isinstance(repeats, int) and isinstance(dim, int) and ndim(args[0]) is not None:
            return Op(REPEAT_INTERLEAVE, (args[0],), {"repeats": repeats, "dim": _norm_dim(dim, ndim(args[0]))})
        return None
    if fn in _SDPA_FNS:
        return Op(SDPA, tuple(args), dict(node.kwargs))
    if fn in _MHA_FNS:
        return Op(MHA, tuple(args), dict(node.kwargs))
    if fn in _ENCODER_LAYER_FNS:
        return Op(ENCODER_LAYER, tuple(args), dict(node.kwargs))
    if fn in _NATIVE_MHA_FNS:
        return Op(NATIVE_MHA, tuple(args), dict(node.kwargs))
    return None


def scalar_value(x: Any) -> float | None:
    """A Python number for a constant scalar operand, else None."""
    if isinstance(x, bool):
        return None
    if isinstance(x, (int, float)):
        return float(x)
    return None


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


def is_large_negative(x: Any) -> bool:
    """True for -inf and for the 'finfo.min'-style fill values models use as 'masked out'."""
    v = scalar_value(x)
    return v is not None and (v == -math.inf or v <= -1e4)


def shape(x: Any) -> tuple | None:
    t = tensor_meta(x)
    return tuple(t.shape) if t is not None else None


def is_symbolic_scalar(x: Any) -> bool:
    """A node whose value is a Python number (e.g. ``q.size(-1) ** -0.5`` under dynamic shapes), not a tensor."""
    if not isinstance(x, Node):
        return False
    val = meta_value(x)
    return isinstance(val, (int, float, torch.SymInt, torch.SymFloat)) and not isinstance(val, bool)


def is_static_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)
