"""Which FX nodes may be deleted or moved: purity read from the op's schema, not guessed from names.

A node is impure when its op writes through an argument (a schema argument with ``alias_info.is_write``:
``out=`` overloads, in-place ``*_`` ops, ``copy_``, ``index_put_``, a custom op declaring ``Tensor(a!)``),
when torch.fx knows it has side effects (``Node.is_impure``: placeholders, outputs, asserts, random ops,
grad-mode switches), or when attnopt cannot read a schema for it. Unknown means impure: keeping a dead
node costs a little time, deleting a live one returns a module that computes something else.
"""

from __future__ import annotations

import builtins
import inspect
import operator
from functools import lru_cache
from typing import Any

import torch
from torch.fx import Node

# Python-level functions dynamo records that compute a value and touch nothing else.
_PURE_BUILTINS = frozenset(
    getattr(builtins, name)
    for name in ("abs", "all", "any", "bool", "divmod", "float", "getattr", "int", "isinstance", "len", "list",
                 "max", "min", "pow", "range", "round", "slice", "sum", "tuple")  # fmt: skip
)
# operator's in-place forms (iadd, imul, ...) write into their first argument; setitem/delitem mutate it.
_INPLACE = ("iadd", "iand", "iconcat", "ifloordiv", "ilshift", "imatmul", "imod", "imul", "ior", "ipow", "irshift",
            "isub", "itruediv", "ixor")  # fmt: skip
_MUTATING_OPERATORS = frozenset(getattr(operator, name) for name in ("setitem", "delitem", *_INPLACE))
_MUTATING_DUNDERS = frozenset({"__setitem__", "__delitem__", "setitem", *(f"__{name}__" for name in _INPLACE)})
_PURE_MODULES = ("math", "_operator", "operator")


def _writes(schema: torch.FunctionSchema) -> list[tuple[int, torch.Argument]]:
    """The (position, argument) pairs of ``schema`` that the op writes through."""
    return [(i, a) for i, a in enumerate(schema.arguments) if a.alias_info is not None and a.alias_info.is_write]


def _call_writes(schemas: list, n_args: int, kwargs: dict) -> bool:
    """Whether a call with ``n_args`` positional arguments and ``kwargs`` supplies an argument that one of
    its candidate ``schemas`` writes to (``out=`` given, or a positional ``Tensor(a!)`` reached)."""
    for schema in schemas:
        for i, arg in _writes(schema):
            if arg.name in kwargs or (not arg.kwarg_only and i < n_args):
                return True
    return False


@lru_cache(maxsize=None)
def _aten_schemas(name: str) -> tuple | None:
    """The schemas of ``aten::name`` (every overload), or None when aten has no such op."""
    schemas = torch._C._jit_get_schemas_for_operator(f"aten::{name}")
    return tuple(schemas) if schemas else None


def _packet_schemas(packet: torch._ops.OpOverloadPacket) -> list:
    return [getattr(packet, name)._schema for name in packet.overloads()]


def _is_torch_function(target: Any) -> bool:
    module = getattr(target, "__module__", None) or ""
    return module == "torch" or module.startswith(("torch.nn.functional", "torch._C", "torch.functional"))


def _passes_inplace(target: Any, args: tuple, kwargs: dict) -> bool:
    """``F.relu(x, inplace=True)`` and friends: a Python-level ``inplace`` flag that is set."""
    if kwargs.get("inplace") is True:
        return True
    try:
        bound = inspect.signature(target).bind_partial(*args, **kwargs)
    except (TypeError, ValueError):  # builtins without a signature take no inplace flag
        return False
    return bound.arguments.get("inplace") is True


def _function_impure(target: Any, args: tuple, kwargs: dict) -> bool:
    if isinstance(target, torch._ops.OpOverload):
        return bool(_writes(target._schema))
    if isinstance(target, torch._ops.OpOverloadPacket):
        return _call_writes(_packet_schemas(target), len(args), kwargs)
    if target in _MUTATING_OPERATORS:
        return True
    if target in _PURE_BUILTINS or getattr(target, "__module__", None) in _PURE_MODULES:
        return False
    name = getattr(target, "__name__", "")
    if _is_torch_function(target) and name.startswith("sym_"):
        return False  # torch.sym_max, sym_int, ...: arithmetic on sizes
    schemas = _aten_schemas(name) if _is_torch_function(target) and name else None
    if schemas is None:
        return True  # no schema attnopt can read: unknown, so impure
    return "out" in kwargs or _passes_inplace(target, args, kwargs) or _call_writes(list(schemas), len(args), kwargs)


def _method_impure(name: str, args: tuple, kwargs: dict) -> bool:
    if name in _MUTATING_DUNDERS:
        return True
    if name.endswith("_") and not name.startswith("__"):
        return True  # Tensor.add_, copy_, index_put_, masked_fill_, ...
    schemas = _aten_schemas(name)
    if schemas is None:
        return not hasattr(torch.Tensor, name) or name in ("tolist", "numpy", "register_hook", "backward")
    return "out" in kwargs or _call_writes(list(schemas), len(args), kwargs)


def is_impure(node: Node) -> bool:
    """Whether ``node`` must stay where it is even when nothing reads its value (see the module docstring)."""
    if node.op in ("placeholder", "output"):
        return True
    if node.op == "get_attr":
        return False
    if node.is_impure():
        return True
    if node.op == "call_function":
        return _function_impure(node.target, node.args, node.kwargs)
    if node.op == "call_method":
        return _method_impure(str(node.target), node.args, node.kwargs)
    return True  # call_module and anything else: its body is not read here


__all__ = ["is_impure"]

