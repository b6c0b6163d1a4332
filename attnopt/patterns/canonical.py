"""A canonical view of torch-level FX nodes, so that patterns match by meaning.

Dynamo graphs spell one operation many ways: ``torch.matmul(a, b)``, ``a @ b`` and ``a.matmul(b)``;
``x.transpose(-1, -2)``, ``x.mT`` and ``x.permute(0, 1, 3, 2)``; ``x.float()``, ``x.to(torch.float32)``
and ``x.type(torch.float32)``. :func:`classify` maps a node to one :class:`Op` of a small vocabulary
(without changing the graph), so a pattern is written once against that vocabulary.
"""

from __future__ import annotations

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
_INPLACE = {"mul_": "mul", "div_": "div", "add_": "add", "sub_": "sub", "masked_fill_": "masked_fill",
            "tanh_": "tanh"}  # fmt: skip
_MUL_FNS = _fn_targets("mul", "multiply") | {operator.mul}
_DIV_FNS = _fn_targets("div", "divide", "true_divide") | {operator.truediv}
_ADD_FNS = _fn_targets("add") | {operator.add}
_SOFTMAX_FNS = _fn_targets("softmax", "_safe_softmax")
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


def classify(node: Any) -> Op | None:
    """The canonical :class:`Op` for ``node``, or None when it is outside the vocabulary."""
    if not isinstance(node, Node):
        return None
    method, fn = _method_or_fn(node)
    if method is None and fn is None:
        return None
    args = node.args
    if method == "matmul" or method == "bmm" or fn in _MATMUL_FNS:
        return Op(MATMUL, (args[0], args[1] if len(args) > 1 else node.kwargs.get("other", node.kwargs.get("mat2"))))
    if method in ("mul", "multiply") or fn in _MUL_FNS:
        return Op(MUL, (args[0], args[1] if len(args) > 1 else node.kwargs.get("other")))
    if method in ("div", "divide", "true_divide") or fn in _DIV_FNS:
        if node.kwargs.get("rounding_mode") is not None:
            return None
        return Op(DIV, (args[0], args[1] if len(args) > 1 else node.kwargs.get("other")))
    if method == "add" or fn in _ADD_FNS:
        alpha = node.kwargs.get("alpha", 1)
        if alpha != 1:
            return None
        return Op(ADD, (args[0], args[1] if len(args) > 1 else node.kwargs.get("other")))
    if method in ("softmax", "_safe_softmax") or fn in _SOFTMAX_FNS:
        dim = _arg(node, 1, "dim")
        dtype = _arg(node, 2, "dtype") if fn is not F.softmax else node.kwargs.get("dtype", _arg(node, 3, "dtype"))
        return Op(SOFTMAX, (args[0],), {"dim": _norm_dim(dim, ndim(args[0])), "rank": ndim(args[0]), "dtype": dtype})
    if fn in _DROPOUT_FNS:
        p = _arg(node, 1, "p", 0.5)
        training = _arg(node, 2, "training", True)
        return Op(DROPOUT, (args[0],), {"p": p if training else 0.0})
    if method == "transpose" or method in ("swapaxes", "swapdims") or fn in _TRANSPOSE_FNS:
        if _is_last_two_swap(node, args[0], _arg(node, 1, "dim0"), _arg(node, 2, "dim1")):
            return Op(TRANSPOSE, (args[0],))
        return None
    if method == "permute" or fn in _PERMUTE_FNS:
        dims = args[1:] if method == "permute" and not isinstance(_arg(node, 1, "dims"), (list, tuple)) else _arg(node, 1, "dims")
        rank = ndim(args[0])
        if rank is not None and dims is not None and len(dims) == rank:
            perm = [_norm_dim(d, rank) for d in dims]
            if perm == list(range(rank - 2)) + [rank - 1, rank - 2]:
                return Op(TRANSPOSE, (args[0],))
        return None
    if node.op == "call_function" and fn is getattr and len(args) == 2 and args[1] == "mT":
        return Op(TRANSPOSE, (args[0],))
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
    if fn in _SDPA_FNS:
        return Op(SDPA, tuple(args), dict(node.kwargs))
    if fn in _MHA_FNS:
        return Op(MHA, tuple(args), dict(node.kwargs))
    return None


def scalar_value(x: Any) -> float | None:
    """A Python number for a constant scalar operand, else None."""
    if isinstance(x, bool):
        return None
    if isinstance(x, (int, float)):
        return float(x)
    return None


def is_large_negative(x: Any) -> bool:
    """True for -inf and for the 'finfo.min'-style fill values models use as 'masked out'."""
    v = scalar_value(x)
    return v is not None and (v == -math.inf or v <= -1e4)
