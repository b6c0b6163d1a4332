"""Dynamic dimensions and output names of exported programs (``.pt2``) and ONNX models.

**Which dims are dynamic.** :func:`infer_dims` reads them off the example inputs: dim 0 of every input
whose leading size is the batch size (that of the first tensor input) is ``batch`` (one symbol shared by
all inputs); dim 1 of a 2-D integer or boolean input (token ids, attention masks, token type and position
ids: ``[B, S]``) and of a 3-D floating ``*embeds`` input (``[B, S, D]``) is ``sequence``. Images and
audio features keep their sizes (their position tables fix them). A dim whose example size is 0 or 1 stays
static: torch.export specializes such sizes, so an example with batch 1 cannot give a dynamic batch.

The capture (dynamo) and ``torch.export`` are given these dims (batch as the named ``Dim("batch")``,
sequences as ``Dim.DYNAMIC``, whose equalities are inferred from the model's code). A model whose code
fixes one of them raises a constraint violation; :func:`violation_reason` says which dims in a sentence.

**Output names.** :func:`named_outputs` pairs each output tensor (in :func:`attnopt.export.flatten_output`
order) with a name: a Hugging Face ``ModelOutput``'s keys (``logits``, ``last_hidden_state``), a dict's
keys, ``output_<i>`` for unnamed positions, joined by ``.`` when nested (``hidden_states.0``).
:func:`flat_module` is the module torch.export traces (the tensors in, that flat tuple out), and
:func:`name_onnx_values` gives the ONNX graph the program's input names, these output names and the dims'
names (``batch``, ``sequence``).
"""

from __future__ import annotations

import inspect
import re
from typing import Any

import torch
import torch.utils._pytree as pytree

BATCH, SEQUENCE = "batch", "sequence"

Dims = dict[str, dict[int, str]]
"""program input name (``args_<i>`` for positional inputs) -> {dim: "batch" | "sequence"}."""


def input_names(args: tuple, tensors: dict) -> list[str]:
    """The exported program's input names for positional ``args`` and tensor keyword arguments."""
    return [*(f"args_{i}" for i in range(len(args))), *tensors]


def infer_dims(args: tuple, tensors: dict) -> tuple[Dims, list[str]]:
    """The batch and sequence dims of the example inputs, and notes on dims left static (example size < 2)."""
    values = dict(zip(input_names(args, tensors), [*args, *tensors.values()]))
    ranked = [t for t in values.values() if t.dim() >= 1]
    if not ranked:
        return {}, []
    batch = ranked[0].shape[0]
    dims: Dims = {}
    for name, t in values.items():
        roles = {}
        if t.dim() >= 1 and t.shape[0] == batch:
            roles[0] = BATCH
        token_like = t.dim() == 2 and (not t.is_floating_point() and not t.is_complex())
        embeds = t.dim() == 3 and t.is_floating_point() and name.endswith("embeds")
        if token_like or embeds:
            roles[1] = SEQUENCE
        if roles:
            dims[name] = roles
    notes, kept = [], {}
    for name, roles in dims.items():
        small = {d: r for d, r in roles.items() if values[name].shape[d] < 2}
        for d, role in small.items():
            notes.append(f"{name} dim {d} ({role}) stays static: its example size is {values[name].shape[d]}; "
                         f"give an example with {role} >= 2 for a dynamic {role}")  # fmt: skip
        if len(small) < len(roles):
            kept[name] = {d: r for d, r in roles.items() if d not in small}
    return kept, notes


def export_spec(dims: Dims) -> dict[str, dict[int, Any]]:
    """``torch.export`` dim specs per input name: one shared ``Dim("batch")``, ``Dim.DYNAMIC`` sequences."""
    from torch.export import Dim

    batch = Dim(BATCH)
    return {name: {d: batch if role == BATCH else Dim.DYNAMIC for d, role in roles.items()}
            for name, roles in dims.items()}  # fmt: skip


def dynamo_spec(model: torch.nn.Module, args: tuple, kwargs: dict, dims: Dims) -> Any:
    """The ``dynamic_shapes`` of ``torch._dynamo.export(model)`` for a call ``model(*args, **kwargs)``."""
    from torch.export import ShapesCollection

    tensors = {k: v for k, v in kwargs.items() if isinstance(v, torch.Tensor)}
    specs = export_spec(dims)
    collection = ShapesCollection()
    for name, t in zip(input_names(args, tensors), [*args, *tensors.values()]):
        if name in specs:
            collection[t] = specs[name]
    return collection.dynamic_shapes(model, args, kwargs)


def program_dims(program: torch.export.ExportedProgram, dims: Dims) -> tuple[Dims, dict[str, str]]:
    """The requested dims that are symbolic in ``program``, and a name per symbol for ONNX dims
    (``batch``, ``sequence``; ``sequence_<input>`` for a second, independent sequence length)."""
    values = {n.name: n.meta.get("val") for n in program.graph.nodes if n.op == "placeholder"}
    got: Dims = {}
    symbols: dict[str, str] = {}
    for name, roles in dims.items():
        shape = getattr(values.get(name), "shape", None)
        for d, role in roles.items():
            size = shape[d] if shape is not None and d < len(shape) else None
            if not isinstance(size, torch.SymInt) or size.node.maybe_as_int() is not None:
                continue
            got.setdefault(name, {})[d] = role
            symbol = str(size)
            if symbol not in symbols:
                symbols[symbol] = role if role not in symbols.values() else f"{role}_{name}"
    return got, symbols


_MARKED = re.compile(r"You marked (.+?) as dynamic but your code specialized it to be a constant \((\d+)\)")
_SOURCE = re.compile(r"L\['(\w+)'\]\.size\(\)\[(\d+)\]")


def violation_reason(exc: BaseException) -> str:
    """A one-sentence reason from a constraint violation (which dims the model's code fixes, and to what)."""
    text = str(exc)
    fixed = [_SOURCE.sub(r"\1 dim \2", m.group(1)) + f" to {m.group(2)}" for m in _MARKED.finditer(text)]
    if fixed:
        return f"the model's code fixes {', '.join(dict.fromkeys(fixed))}"
    first = next((line.strip() for line in text.splitlines() if line.strip()), type(exc).__name__)
    return f"{type(exc).__name__}: {first}"


# ------------------------------------------------------------------------------------------------ output names


def _key_name(key: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def named_outputs(out: Any) -> list[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` for every tensor of a model output, in :func:`attnopt.export.flatten_output` order."""
    if hasattr(out, "to_tuple") and hasattr(out, "keys"):  # a ModelOutput: its set fields, in order
        out = {k: out[k] for k in out.keys()}
    leaves, _ = pytree.tree_flatten_with_path(out)
    named, seen = [], set()
    for path, value in leaves:
        if not isinstance(value, torch.Tensor):
            continue
        parts = [_key_name(k) for k in path]
        if not parts or isinstance(path[0], pytree.SequenceKey):
            parts[:1] = [f"output_{parts[0] if parts else 0}"]
        name = ".".join(parts)
        while name in seen:
            name += "_"
        seen.add(name)
        named.append((name, value))
    return named


class FlatOutputs(torch.nn.Module):
    """Tensors in (constants baked in), a flat tuple of tensors out; the outputs' names go to ``names`` when
    traced (a list outside the module: torch.export restores module attributes assigned while tracing)."""

    def __init__(self, gm: torch.nn.Module, constants: dict, names: list[str]):
        super().__init__()
        self.gm = gm
        self.constants = dict(constants)
        self.names = names

    def forward(self, *args, **kwargs):
        named = named_outputs(self.gm(*args, **kwargs, **self.constants))
        self.names[:] = [name for name, _ in named]
        return tuple(t for _, t in named)


def flat_module(gm: torch.nn.Module, constants: dict, inputs: list[str], names: list[str]) -> FlatOutputs:
    """A :class:`FlatOutputs` whose ``forward`` declares ``inputs`` as its parameters: torch.export matches
    ``dynamic_shapes`` to the signature, and a ``**kwargs`` signature trips it (torch 2.13)."""
    params = [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD) for n in ["self", *inputs]]

    def forward(self, *args, **kwargs):
        return FlatOutputs.forward(self, *args, **kwargs)

    forward.__signature__ = inspect.Signature(params)
    return type("Flat", (FlatOutputs,), {"forward": forward})(gm, constants, names).eval()


def name_onnx_values(model: Any, inputs: list[str], outputs: list[str], symbols: dict[str, str]) -> None:
    """Names an onnx_ir model's graph inputs (the program's) and outputs, and its symbolic dims (in place).

    An output that is also a graph input, or a second output of one value, gets an Identity node (renaming
    it would rename the input); a value already holding a wanted name is renamed out of the way first (the
    exporter renames an input that is also an output to ``<name>_orig``)."""
    import onnx_ir as ir

    graph = model.graph
    if len(outputs) != len(graph.outputs):
        raise ValueError(f"{len(outputs)} output names for the ONNX graph's {len(graph.outputs)} outputs")
    taken = {v.name: v for v in [*graph.inputs, *(o for n in graph.all_nodes() for o in n.outputs)] if v.name}

    def rename(value: Any, name: str) -> None:
        other = taken.get(name)
        if other is not None and other is not value:
            other.name = f"{name}__{len(taken)}"
            taken[other.name] = other
        value.name = name
        taken[name] = value

    if len(inputs) == len(graph.inputs):  # else inputs were dropped or added: keep the exporter's names
        for value, name in zip(graph.inputs, inputs):
            rename(value, name)
    held = set(map(id, graph.inputs))
    for i, name in enumerate(outputs):
        value = graph.outputs[i]
        if id(value) in held:
            node = ir.node("Identity", inputs=[value])
            graph.append(node)
            node.outputs[0].dtype, node.outputs[0].shape = value.dtype, value.shape
            value = graph.outputs[i] = node.outputs[0]
        rename(value, name)
        held.add(id(value))
    for value in [*graph.inputs, *graph.outputs, *(o for n in graph.all_nodes() for o in n.outputs)]:
        if value.shape is not None and any(str(d) in symbols for d in value.shape):
            value.shape = ir.Shape([ir.SymbolicDim(symbols[str(d)]) if str(d) in symbols else d for d in value.shape])


__all__ = ["BATCH", "SEQUENCE", "FlatOutputs", "dynamo_spec", "export_spec", "flat_module", "infer_dims", "input_names", "name_onnx_values",
           "named_outputs",
           "program_dims", "violation_reason"]  # fmt: skip
