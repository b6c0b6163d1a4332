"""ONNX functions of the ``attnopt`` domain: attnopt ops with a body any ONNX runtime can run.

Imported lazily by :mod:`attnopt.export` (it needs onnxscript). An exported model holds ``attnopt::<Op>``
nodes and, in ``ModelProto.functions``, each op's function body, so a runtime without attnopt kernels
inlines the body while one with attnopt kernels may implement the op itself.

How an op gets there: the ONNX translation of an attnopt custom op calls ``OPSET.<Op>(...)`` (a node of
the ``attnopt`` domain; :func:`schemas_registered` gives onnxscript its schema), and after export
:func:`attach` adds the function bodies of the ``attnopt`` ops the graph uses. (torch.onnx inlines
functions recorded during translation when it converts opset versions, so bodies are attached after.)
Sparse and linear variants (issues 5 and 6) add their functions to :data:`FUNCTIONS`, e.g. a
sliding-window attention whose body builds the window's additive bias and calls the dense body.
"""

import contextlib
from typing import Tuple

import onnx
import onnxscript
from onnx.defs import OpSchema
from onnxscript import opset18 as op
from onnxscript.onnx_types import BOOL, FLOAT
from onnxscript.values import Opset

DOMAIN = "attnopt"
VERSION = 1
OPSET = Opset(DOMAIN, VERSION)
_FLOATS = ["tensor(float)", "tensor(float16)", "tensor(bfloat16)", "tensor(double)"]


@onnxscript.script(Opset(DOMAIN, VERSION), default_opset=op)
def DenseAttention(Q, K, V, Bias: FLOAT, scale: float, softcap: float) -> Tuple[FLOAT, FLOAT]:
    """softmax(softcap(scale Q Kᵀ) + Bias) V computed in fp32; returns (Y in Q's type, LSE fp32).

    Q [B, Hq, Sq, D], K [B, Hkv, Sk, D], V [B, Hkv, Sk, Dv] (K and V heads are repeated for GQA); Bias
    broadcasts to [B, Hq, Sq, Sk] (0 / -inf for boolean masks and causality, or an additive mask);
    softcap > 0 maps scaled scores s to softcap · tanh(s / softcap); fully masked rows give zeros.
    """
    qs = op.Shape(Q)
    ks = op.Shape(K)
    vs = op.Shape(V)
    hq = op.Slice(qs, [1], [2])
    groups = op.Div(hq, op.Slice(ks, [1], [2]))
    k5 = op.Expand(op.Unsqueeze(K, [2]), op.Concat(op.Slice(ks, [0], [2]), groups, op.Slice(ks, [2], [4]), axis=0))
    kr = op.Reshape(k5, op.Concat(op.Slice(ks, [0], [1]), hq, op.Slice(ks, [2], [4]), axis=0))
    v5 = op.Expand(op.Unsqueeze(V, [2]), op.Concat(op.Slice(vs, [0], [2]), groups, op.Slice(vs, [2], [4]), axis=0))
    vr = op.Reshape(v5, op.Concat(op.Slice(vs, [0], [1]), hq, op.Slice(vs, [2], [4]), axis=0))
    s = op.MatMul(op.Cast(Q, to=1), op.Transpose(op.Cast(kr, to=1), perm=[0, 1, 3, 2]))
    s = op.Mul(s, op.Constant(value_float=scale))
    zero = op.Constant(value_float=0.0)
    cap = op.Constant(value_float=softcap)
    s = op.Where(op.Greater(cap, zero), op.Mul(op.Tanh(op.Div(s, cap)), cap), s)
    s = op.Add(s, Bias)
    m = op.ReduceMax(s, [-1], keepdims=1)
    dead = op.IsInf(m, detect_positive=0)
    m0 = op.Where(dead, zero, m)
    e = op.Exp(op.Sub(s, m0))
    den = op.ReduceSum(e, [-1], keepdims=1)
    p = op.Div(e, op.Where(dead, op.Constant(value_float=1.0), den))
    y = op.CastLike(op.MatMul(p, op.Cast(vr, to=1)), Q)
    lse = op.Squeeze(op.Add(op.Log(den), m0), [-1])
    return y, lse


@onnxscript.script(Opset(DOMAIN, VERSION), default_opset=op)
def SparseAttention(Q, K, V, Bias: FLOAT, Keep: BOOL, mask: str, scale: float, softcap: float) -> Tuple[FLOAT, FLOAT]:
    """Attention restricted to a mask descriptor: DenseAttention with keys outside ``Keep`` masked out.

    ``mask`` is the descriptor (attnopt.masks canonical JSON): a runtime with attnopt's sparse kernels reads
    it and skips the masked tiles; the body applies ``Keep``, the descriptor's boolean [H or 1, Sq, Sk]
    matrix at the exported sequence lengths. Bias carries the site's own masks (additive, or 0 / -inf).
    """
    zero = op.Constant(value_float=0.0)
    one = op.Constant(value_float=1.0)
    neg_inf = op.Neg(op.Div(one, zero))
    y, lse = DenseAttention(Q, K, V, op.Where(Keep, Bias, neg_inf), scale=scale, softcap=softcap)
    return y, lse


_T = {"Q": _FLOATS, "K": _FLOATS, "V": _FLOATS, "Bias": ["tensor(float)"], "Keep": ["tensor(bool)"], "Y": _FLOATS,
      "LSE": ["tensor(float)"]}  # fmt: skip
_ATTR = {"scale": OpSchema.AttrType.FLOAT, "softcap": OpSchema.AttrType.FLOAT, "mask": OpSchema.AttrType.STRING}
# name -> (function, the functions its body calls)
FUNCTIONS = {
    "DenseAttention": (DenseAttention, ()),
    "SparseAttention": (SparseAttention, ("DenseAttention",)),
}
_OUTPUTS = {"DenseAttention": ("Y", "LSE"), "SparseAttention": ("Y", "LSE")}


def _schema(name: str) -> OpSchema:
    fn, _ = FUNCTIONS[name]
    proto = fn.to_function_proto()
    inputs = [OpSchema.FormalParameter(i, f"T_{i}") for i in proto.input]
    outputs = [OpSchema.FormalParameter(o, f"T_{o}") for o in _OUTPUTS[name]]
    constraints = [(f"T_{n}", _T[n], "") for n in [*proto.input, *_OUTPUTS[name]]]
    attrs = [OpSchema.Attribute(a, _ATTR[a], "") for a in proto.attribute]
    return OpSchema(name, DOMAIN, VERSION, doc=fn.function.__doc__ or "", inputs=inputs, outputs=outputs,
                    type_constraints=constraints, attributes=attrs)  # fmt: skip


@contextlib.contextmanager
def schemas_registered():
    """The ``attnopt`` ops' schemas registered with onnx while exporting (onnxscript needs a schema to emit a
    node); removed after, so onnx's checker and shape inference use the function bodies."""
    added = []
    try:
        for name in FUNCTIONS:
            if not onnx.defs.has(name, DOMAIN):
                onnx.defs.register_schema(_schema(name))
                added.append(name)
        yield
    finally:
        for name in added:
            onnx.defs.deregister_schema(name, VERSION, DOMAIN)


def set_output_types(y, lse, q, v) -> None:
    """Types and shapes of a DenseAttention node's outputs (Y like Q with V's head dim, LSE fp32 [B, Hq, Sq])."""
    import onnx_ir as ir

    if y.dtype is None:
        y.dtype = q.dtype
    if lse.dtype is None:
        lse.dtype = ir.DataType.FLOAT
    if q.shape is not None and v.shape is not None and len(q.shape) == 4 and len(v.shape) == 4:
        if y.shape is None:
            y.shape = ir.Shape([q.shape[0], q.shape[1], q.shape[2], v.shape[3]])
        if lse.shape is None:
            lse.shape = ir.Shape([q.shape[0], q.shape[1], q.shape[2]])


def attach(model) -> list[str]:
    """Adds to ``model`` (an onnx_ir Model) the bodies of the ``attnopt`` ops its graph uses; returns them."""
    import onnx_ir as ir

    nodes = [node for node in model.graph.all_nodes() if node.domain == DOMAIN]
    for node in nodes:  # the exporter leaves custom-domain outputs untyped; checkers need the types
        if node.op_type in _OUTPUTS:
            set_output_types(node.outputs[0], node.outputs[1], node.inputs[0], node.inputs[2])
    used, todo = [], sorted({node.op_type for node in nodes})
    while todo:  # with the functions their bodies call
        name = todo.pop()
        if name not in used:
            used.append(name)
            todo += list(FUNCTIONS.get(name, (None, ()))[1])
    used.sort()
    default = model.opset_imports.get("", 18)
    for name in used:
        if name not in FUNCTIONS:
            raise ValueError(f"the graph uses {DOMAIN}::{name}, which has no function body")
        proto = FUNCTIONS[name][0].to_function_proto()
        for imp in proto.opset_import:
            if imp.domain == "":
                imp.version = default  # the body's ops mean the same in every opset >= 18
        function = ir.serde.deserialize_function(proto)
        model.functions[function.identifier()] = function
    if used:
        model.opset_imports[DOMAIN] = VERSION
    return [f"{DOMAIN}::{n}" for n in used]
