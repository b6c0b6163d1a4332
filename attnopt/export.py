"""Export of optimized models: ``torch.export`` programs (``.pt2``) and ONNX.

**torch.export.** The model is captured whole by dynamo (``torch._dynamo.export``: one graph, no graph
breaks), attnopt's pass pipeline rewrites it under the policy (the same detection, decisions and per-site
validation as :func:`attnopt.optimize`; site names are the same), and the rewritten graph is exported
with ``torch.export.export``. Rewritten sites stay ``torch.ops.attnopt.attention`` custom-op calls. The
program takes the tensor inputs (positional, then keyword by name; constant keyword arguments such as
``use_cache=False`` are baked in) and returns a flat tuple of tensors (the leaves of the model's output,
in order: ``ModelOutput.to_tuple()`` for Hugging Face models; :attr:`Exported.output_names` names them),
so loading it needs neither transformers nor the model's code. By default the batch and sequence dims
read off the example inputs are dynamic (captured and exported symbolically; :mod:`attnopt.export_dims`),
falling back to a dynamic batch only, then to the example shapes, with the reason in :attr:`Exported.notes`::

    import attnopt   # registers torch.ops.attnopt.*: torch.export.load fails on the custom op without it
    program = torch.export.load("out/model.pt2")
    outputs = program.module()(input_ids=..., attention_mask=...)

**ONNX.** The exported program goes through ``torch.onnx.export(..., dynamo=True)`` with a custom
translation per attnopt op (:data:`ONNX_TRANSLATIONS`); the program's dynamic dims stay symbolic (the
translations read sizes with ``Shape``, never as constants, except a sparse site's mask matrix), named
``batch`` and ``sequence``, and the outputs carry the model's output names:

* ``attention="standard"`` (default, opset 23): an exact site becomes the standard ``Attention`` operator
  (GQA native, boolean or additive mask, ``is_causal``, ``scale``, ``softcap``, fp32 softmax).
* ``attention="decomposed"`` (opset 18): an exact site becomes ``attnopt.DenseAttention``, an op in the
  ``attnopt`` domain whose ONNX function body (MatMul, Softmax with fully masked rows giving zeros) is
  stored in the model, so runtimes without opset-23 ``Attention`` run it.

Variants that change the function export as ``attnopt``-domain ops whose ONNX function bodies
decompose them (:mod:`attnopt.onnx_functions`), so a runtime without attnopt kernels still runs the model:
a sparse site (``attnopt::sparse_attention``) becomes ``attnopt::SparseAttention`` (the mask descriptor as
an attribute; the body applies its boolean matrix at the exported lengths, then ``DenseAttention``); an
exact-sparse site (``sparse_attention_auto``) computes exact attention and exports as an exact site.
Linear and sigmoid sites slot in the same way: a translation registered for their op with
:func:`register_onnx_translation` that emits their ``attnopt`` function; until then their export fails
with the op's name.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.utils._pytree as pytree
from torch import nn

from attnopt.capture import dynamo_limits
from attnopt.errors import AttnoptError
from attnopt.inputs import split_constants
from attnopt.kernels.exact.reference import CAUSAL_BOTTOM_RIGHT, CAUSAL_NONE, CAUSAL_TOP_LEFT
from attnopt.kernels.sparse import ops as sparse_ops  # noqa: F401  (registers torch.ops.attnopt.sparse_*)
from attnopt.masks import lookup
from attnopt.naming import SiteNamer
from attnopt.passes import FULL, UNCHECKED, Context, run_pipeline
from attnopt.export_dims import (BATCH, SEQUENCE, Dims, dynamo_spec, export_spec, flat_module, infer_dims,
                                 input_names, name_onnx_values, program_dims, violation_reason)
from attnopt.policy import as_policy

ONNX_ATTENTION_MODES = ("standard", "decomposed")
ONNX_OPSET = {"standard": 23, "decomposed": 18}


class ExportError(AttnoptError):
    """The model cannot be exported (graph breaks, an op without translation, a runtime failure)."""


# ------------------------------------------------------------------------------------------------ torch.export


def _flat_inputs(gm: torch.fx.GraphModule, args: tuple, kwargs: dict) -> list:
    """The graph's placeholder values for a call ``gm(*args, **kwargs)`` (its pytree codegen flattens)."""
    info = getattr(gm._graph._codegen, "pytree_info", None)
    if info is not None and info.in_spec is not None:
        import torch.fx._pytree as fx_pytree

        return list(fx_pytree.tree_flatten_spec((args, kwargs), info.in_spec))
    return pytree.tree_leaves((args, kwargs))


def capture(model: nn.Module, policy: Any, args: tuple, kwargs: dict, validate: bool = True,
            dynamic_shapes: Any = None) -> tuple[torch.fx.GraphModule, Context]:  # fmt: skip
    """``model`` as one dynamo graph, rewritten by attnopt's pipeline under ``policy``; and the pipeline's context.

    ``validate=False`` skips the per-site and whole-graph checks (for decisions that were validated already);
    ``dynamic_shapes`` (torch.export's form) captures those dims symbolically."""
    policy = as_policy(policy)
    try:
        with dynamo_limits(), torch.no_grad(), _quiet_guards():
            gm, _ = torch._dynamo.export(model, aten_graph=False, dynamic_shapes=dynamic_shapes)(*args, **kwargs)
    except Exception as exc:
        if dynamic_shapes is not None:
            raise _DynamicRefused(violation_reason(exc)) from exc
        raise ExportError(
            f"exporting needs {type(model).__name__} captured as one graph, and dynamo could not: "
            f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        ) from exc
    flat = _flat_inputs(gm, args, kwargs)
    ctx = Context(policy, example_inputs=flat, name_of=SiteNamer(model).for_graph(gm, flat))
    passes = FULL if validate else UNCHECKED
    with torch.no_grad():
        if dynamic_shapes is None:
            return run_pipeline(gm, ctx, passes), ctx
        try:
            return run_pipeline(gm, ctx, passes), ctx
        except Exception as exc:  # noqa: BLE001 - reported as the reason, then the static capture runs
            raise _DynamicRefused(f"attnopt's passes failed on the symbolic graph: {type(exc).__name__}: "
                                  f"{str(exc).splitlines()[0] if str(exc) else ''}") from exc  # fmt: skip


class _DynamicRefused(ExportError):
    """The model cannot be exported with the requested dynamic dims (the message is the reason)."""


@contextlib.contextmanager
def _quiet_guards():
    """A refused dynamic dim is reported once, as the fallback's reason: not also as dynamo's guard log."""
    loggers = [logging.getLogger(n) for n in ("torch._guards", "torch.fx.experimental.symbolic_shapes")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def flatten_output(out: Any) -> tuple[torch.Tensor, ...]:
    """The tensors of a model output, in order (``to_tuple()`` first for Hugging Face outputs)."""
    if hasattr(out, "to_tuple"):
        out = out.to_tuple()
    return tuple(x for x in pytree.tree_leaves(out) if isinstance(x, torch.Tensor))


@dataclass
class Exported:
    """A ``torch.export`` program of a rewritten model and what it accepts.

    ``dynamic``: per program input, its dims that take any size (``{"input_ids": {0: "batch", 1: "sequence"}}``);
    ``notes``: why requested or inferred dims are static (a constraint violation, an example size of 1)."""

    program: torch.export.ExportedProgram
    ctx: Context
    output_names: list[str]
    dynamic: Dims = field(default_factory=dict)
    dim_symbols: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def entry(self) -> dict:
        """The manifest's description of the program's inputs and outputs."""
        return {"outputs": self.output_names, "dynamic": {n: {str(d): r for d, r in dims.items()}
                for n, dims in self.dynamic.items()}, "shape_notes": self.notes}  # fmt: skip


def export_program(model: nn.Module, policy: Any, args: tuple, kwargs: dict, expect: dict[str, str] | None = None,
                   dynamic: bool | Dims = True) -> Exported:  # fmt: skip
    """A ``torch.export`` program of ``model`` with its sites rewritten per ``policy``.

    ``expect`` (site name -> decision), when given, must be exactly what the pipeline decides: an artifact's
    program computes what its manifest says. Those decisions were validated when they were made, so the
    capture then skips the per-site validation pass.

    ``dynamic``: ``True`` makes the batch and sequence dims read off the example inputs dynamic
    (:func:`attnopt.export_dims.infer_dims`), a dict names the dims itself (``{"args_0": {0: "batch"}}``),
    ``False`` exports at the example shapes. A model whose code fixes a requested dim is exported with a
    dynamic batch only, else at the example shapes, with the reasons in ``Exported.notes``.
    """
    args, tensors, constants = split_constants(args, kwargs)
    notes: list[str] = []
    dims = dynamic if isinstance(dynamic, dict) else {}
    if dynamic is True:
        dims, notes = infer_dims(args, tensors)
    batch_only = {n: {d: r for d, r in rs.items() if r == BATCH} for n, rs in dims.items()}
    batch_only = {n: rs for n, rs in batch_only.items() if rs}
    for attempt in [dims, batch_only if batch_only != dims else {}]:
        if not attempt:
            continue
        try:
            return _export(model, policy, (args, tensors, constants), expect, attempt, notes)
        except _DynamicRefused as exc:
            notes.append(f"dynamic {_describe(attempt)} refused: {exc}")
    if notes and dims:
        notes.append("exported with static shapes (the example inputs' shapes)")
    return _export(model, policy, (args, tensors, constants), expect, {}, notes)


def _describe(dims: Dims) -> str:
    roles = sorted({r for rs in dims.values() for r in rs.values()}, key=[BATCH, SEQUENCE].index)
    return " and ".join(roles)


def _export(model: nn.Module, policy: Any, inputs: tuple, expect: dict | None, dims: Dims, notes: list) -> Exported:
    args, tensors, constants = inputs
    spec = dynamo_spec(model, args, {**tensors, **constants}, dims) if dims else None
    gm, ctx = capture(model, policy, args, {**tensors, **constants}, validate=expect is None, dynamic_shapes=spec)
    if expect is not None:
        got = {s.name: s.decision for s in ctx.sites}
        if got != expect:
            diff = {n: (expect.get(n), got.get(n)) for n in set(got) | set(expect) if expect.get(n) != got.get(n)}
            message = ("the whole-model capture decided differently from the optimized module "
                       f"(site: (recorded, exported)) {diff}")  # fmt: skip
            raise (_DynamicRefused(f"under dynamic shapes {message}") if dims else ExportError(message))
    names: list[str] = []
    flat = flat_module(gm, constants, input_names(args, tensors), names)
    try:
        with _quiet_guards():
            program = torch.export.export(flat, args, tensors, dynamic_shapes=export_spec(dims) if dims else None)
    except Exception as exc:
        if dims:
            raise _DynamicRefused(violation_reason(exc)) from exc
        raise ExportError(f"torch.export failed on the rewritten graph: {type(exc).__name__}: {exc}") from exc
    got, symbols = program_dims(program, dims)
    return Exported(program, ctx, list(names), got, symbols, list(notes))


def count_attnopt_ops(program: torch.export.ExportedProgram) -> int:
    return sum(1 for n in program.graph.nodes if n.op == "call_function" and "attnopt" in str(n.target))


# --------------------------------------------------------------------------------------------------------- ONNX


def _onnxscript():
    try:
        import onnxscript
    except ImportError as exc:
        raise ExportError("ONNX export needs onnxscript: pip install onnxscript") from exc
    return onnxscript


ONNX_TRANSLATIONS: dict[Any, Callable[[str], Callable]] = {}
"""attnopt op overload -> factory(mode) returning the onnxscript translation of that op for ``mode``."""


def register_onnx_translation(op: Any, factory: Callable[[str], Callable]) -> None:
    """Registers how ``op`` exports: ``factory(mode)`` returns a function building it with ONNX Script."""
    ONNX_TRANSLATIONS[op] = factory


def _is_bool(value: Any) -> bool:
    dtype = getattr(value, "dtype", None)
    return dtype is not None and "BOOL" in str(dtype).upper()


def _static_len(value: Any, axis: int) -> int | None:
    shape = getattr(value, "shape", None)
    try:
        dim = shape[axis] if shape is not None else None
    except (IndexError, TypeError):
        return None
    return dim if isinstance(dim, int) else None


def _same_len(q: Any, k: Any) -> bool:
    """Sq == Sk known at export: equal sizes, or the same named symbolic dim (dynamic shapes)."""
    a, b = (getattr(x, "shape", None) for x in (q, k))
    if a is None or b is None or len(a) < 2 or len(b) < 2:
        return False
    sq, sk = a[-2], b[-2]
    if isinstance(sq, int) or isinstance(sk, int):
        return sq == sk
    return getattr(sq, "value", None) is not None and getattr(sq, "value", None) == getattr(sk, "value", None)


def causal_keep(op: Any, q: Any, k: Any, bottom_right: bool) -> Any:
    """Boolean [Sq, Sk] ONNX value: key j visible to query i (j <= i, or j <= i + Sk - Sq bottom-right)."""
    sq = op.Squeeze(op.Shape(q, start=-2, end=-1), [0])
    sk = op.Squeeze(op.Shape(k, start=-2, end=-1), [0])
    zero, one = op.Constant(value_int=0), op.Constant(value_int=1)
    i = op.Range(zero, sq, one)
    if bottom_right:
        i = op.Add(i, op.Sub(sk, sq))
    j = op.Range(zero, sk, one)
    return op.LessOrEqual(op.Unsqueeze(j, [0]), op.Unsqueeze(i, [1]))


def additive_bias(op: Any, q: Any, k: Any, attn_mask: Any, causal: int) -> Any:
    """One additive fp32 bias (0 / -inf, or the additive mask) from a site's mask and causal mode."""
    neg_inf = op.Constant(value_float=-math.inf)
    zero = op.Constant(value_float=0.0)
    keep = None if causal == CAUSAL_NONE else causal_keep(op, q, k, causal == CAUSAL_BOTTOM_RIGHT)
    if attn_mask is None:
        bias = zero
    elif _is_bool(attn_mask):
        keep = attn_mask if keep is None else op.And(attn_mask, keep)
        bias = zero
    else:
        bias = op.Cast(attn_mask, to=1)
    return bias if keep is None else op.Where(keep, bias, neg_inf)


def _exact_translation(mode: str) -> Callable:
    from onnxscript import opset18, opset23

    def standard(q, k, v, attn_mask=None, dropout_p: float = 0.0, causal: int = 0, scale: float = 1.0, seed=None,
                 softcap: float = 0.0):  # fmt: skip
        _check_inference(dropout_p)
        op = opset23
        mask, is_causal = attn_mask, 0
        is_bool = attn_mask is not None and _is_bool(attn_mask)  # values built here have no dtype yet
        square = _same_len(q, k)
        if causal == CAUSAL_TOP_LEFT or (causal == CAUSAL_BOTTOM_RIGHT and square):
            is_causal = 1  # ONNX's is_causal (no past keys): key j visible to query i iff j <= i
        elif causal == CAUSAL_BOTTOM_RIGHT:
            keep = causal_keep(op, q, k, bottom_right=True)
            if mask is None:
                mask, is_bool = keep, True
            elif is_bool:
                mask = op.And(mask, keep)
            else:
                mask = op.Where(keep, mask, op.CastLike(op.Constant(value_float=-math.inf), mask))
        if mask is not None and not is_bool:
            mask = op.CastLike(mask, q)
        y, _, _, scores = op.Attention(q, k, v, mask, is_causal=is_causal, scale=float(scale),
                                       softcap=float(softcap), softmax_precision=1,
                                       qk_matmul_output_mode=2)  # fmt: skip
        # The log-sum-exp output (unused in inference graphs, so removed by the exporter's optimizer).
        lse = op.ReduceLogSumExp(op.Cast(scores, to=1), op.Constant(value_ints=[-1]), keepdims=0)
        return y, lse

    def decomposed(q, k, v, attn_mask=None, dropout_p: float = 0.0, causal: int = 0, scale: float = 1.0, seed=None,
                   softcap: float = 0.0):  # fmt: skip
        _check_inference(dropout_p)
        from attnopt.onnx_functions import OPSET, set_output_types

        bias = additive_bias(opset18, q, k, attn_mask, causal)
        y, lse = OPSET.DenseAttention(q, k, v, bias, scale=float(scale), softcap=float(softcap))
        set_output_types(y, lse, q, v)
        return y, lse

    return standard if mode == "standard" else decomposed


def _check_inference(dropout_p: float) -> None:
    if dropout_p > 0.0:
        raise ExportError(f"an attention site has dropout_p={dropout_p}: export the model in eval mode")


def _sparse_translation(mode: str) -> Callable:
    """``attnopt::sparse_attention`` -> ``attnopt::SparseAttention`` (both modes): the descriptor rides along as
    the ``mask`` attribute, and the body applies its boolean matrix at the exported sequence lengths."""
    from onnxscript import opset18

    def sparse(q, k, v, attn_mask=None, kv_valid=None, mask: str = "", scale: float = 1.0, softcap: float = 0.0):
        import onnx_ir as ir

        from attnopt.onnx_functions import OPSET, set_output_types

        op = opset18
        sq, sk, hq = _static_len(q, -2), _static_len(k, -2), _static_len(q, 1)
        if None in (sq, sk, hq):
            raise ExportError("a sparse attention site exports at static sequence lengths and head counts")
        keep = lookup(mask).dense(sq, sk, hq).numpy()  # [H or 1, Sq, Sk]
        bias = additive_bias(op, q, k, attn_mask, CAUSAL_NONE)
        if kv_valid is not None:  # key padding [B, Sk]
            bias = op.Where(op.Unsqueeze(kv_valid, [1, 2]), bias, op.Constant(value_float=-math.inf))
        y, lse = OPSET.SparseAttention(q, k, v, bias, op.Constant(value=ir.tensor(keep)), mask=mask,
                                       scale=float(scale), softcap=float(softcap))  # fmt: skip
        set_output_types(y, lse, q, v)
        return y, lse

    return sparse


def _exact_sparse_translation(mode: str) -> Callable:
    """``attnopt::sparse_attention_auto`` computes exact attention: it exports as the exact op does."""
    exact = _exact_translation(mode)

    def exact_sparse(q, k, v, attn_mask=None, causal: int = 0, scale: float = 1.0, softcap: float = 0.0):
        return exact(q, k, v, attn_mask, 0.0, causal, scale, None, softcap)

    return exact_sparse


register_onnx_translation(torch.ops.attnopt.attention.default, _exact_translation)
register_onnx_translation(torch.ops.attnopt.sparse_attention.default, _sparse_translation)
register_onnx_translation(torch.ops.attnopt.sparse_attention_auto.default, _exact_sparse_translation)


def _translation_table(mode: str) -> dict:
    """The translation of every attnopt op that is registered in this process."""
    return {op: factory(mode) for op, factory in ONNX_TRANSLATIONS.items()}


@contextlib.contextmanager
def _quiet():
    """The ONNX exporter prints progress and optimizer notes; keep them out of attnopt's output."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "onnxscript", "onnx_ir", "torch.export", "torch._export")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def export_onnx(program: torch.export.ExportedProgram, path: Any, attention: str = "standard",
                output_names: list[str] | None = None, dim_symbols: dict[str, str] | None = None) -> dict:  # fmt: skip
    """Writes ``program`` as ONNX to ``path``; returns the manifest entry (opset, inputs, outputs, op counts).

    Outputs are named ``output_names`` (default ``output_<i>``); the program's dynamic dims stay symbolic,
    named per ``dim_symbols`` (program symbol -> ``batch``, ``sequence``: :attr:`Exported.dim_symbols`)."""
    if attention not in ONNX_ATTENTION_MODES:
        raise ExportError(f"unknown ONNX attention mode {attention!r}; use one of {ONNX_ATTENTION_MODES}")
    _onnxscript()
    from attnopt import onnx_functions

    table = _translation_table(attention)
    user_inputs = [s.arg.name for s in program.graph_signature.input_specs if s.kind.name == "USER_INPUT"]
    missing = sorted({str(n.target) for n in program.graph.nodes if n.op == "call_function"
                      and str(getattr(n.target, "namespace", "")) == "attnopt" and n.target not in table})  # fmt: skip
    if missing:
        raise ExportError(f"no ONNX translation for {missing} yet (linear and sigmoid sites export to .pt2 only); "
                          "drop --format onnx or use another policy for those sites")  # fmt: skip
    try:
        with _quiet(), onnx_functions.schemas_registered():
            onnx_program = torch.onnx.export(program, dynamo=True, opset_version=ONNX_OPSET[attention],
                                             custom_translation_table=table, optimize=False, verbose=False)  # fmt: skip
            # Constant folding and dead-code removal, keeping attnopt-domain ops as function calls.
            from onnxscript import optimizer

            onnx_program.model = optimizer.optimize(onnx_program.model, inline=False)
            onnx_functions.attach(onnx_program.model)
            outputs = output_names or [f"output_{i}" for i in range(len(onnx_program.model.graph.outputs))]
            name_onnx_values(onnx_program.model, user_inputs, list(outputs), dim_symbols or {})
            onnx_program.save(str(path))
    except ExportError:
        raise
    except Exception as exc:
        cause = exc
        while cause.__cause__ is not None and not isinstance(cause, ExportError):
            cause = cause.__cause__
        if isinstance(cause, ExportError):
            raise cause from exc
        raise ExportError(f"ONNX export failed: {type(exc).__name__}: {str(exc).splitlines()[0]}") from exc
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    ops: dict[str, int] = {}
    for node in model.graph.node:
        key = f"{node.domain}::{node.op_type}" if node.domain else node.op_type
        ops[key] = ops.get(key, 0) + 1
    return {
        "opset": ONNX_OPSET[attention],
        "attention": attention,
        "inputs": [i.name for i in model.graph.input],
        "program_inputs": user_inputs,
        "outputs": [o.name for o in model.graph.output],
        "functions": [f"{f.domain}::{f.name}" for f in model.functions],
        "attention_ops": {k: v for k, v in ops.items() if "Attention" in k},
    }


def onnx_session(path: Any):
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise ExportError("running ONNX needs onnxruntime: pip install onnxruntime") from exc
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def onnx_feed(session: Any, args: tuple, kwargs: dict) -> dict:
    """ONNX Runtime inputs for a call ``(args, tensor kwargs)``: by name, positional ones in order."""
    args, tensors, _ = split_constants(args, kwargs)
    values = {**{f"args_{i}": a for i, a in enumerate(args)}, **tensors}
    flat = [*args, *tensors.values()]
    names = [i.name for i in session.get_inputs()]
    if all(n in values for n in names):
        return {n: values[n].detach().cpu().numpy() for n in names}
    if len(names) == len(flat):
        return {n: t.detach().cpu().numpy() for n, t in zip(names, flat)}
    raise ExportError(f"cannot match the ONNX inputs {names} to the example inputs {list(values)}")


def run_onnx(session: Any, args: tuple, kwargs: dict) -> tuple[torch.Tensor, ...]:
    return tuple(torch.from_numpy(x) for x in session.run(None, onnx_feed(session, args, kwargs)))


__all__ = ["ExportError", "Exported", "ONNX_TRANSLATIONS", "additive_bias", "capture", "causal_keep", "count_attnopt_ops",
           "export_onnx", "export_program", "flatten_output", "onnx_session", "register_onnx_translation",
           "run_onnx"]  # fmt: skip
