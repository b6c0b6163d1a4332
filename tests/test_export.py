"""attnopt.export: torch.export of rewritten graphs, and the ONNX translation of torch.ops.attnopt.attention."""

import pytest
import torch
from torch import nn

from attnopt import export as E
from attnopt.kernels.exact.reference import CAUSAL_BOTTOM_RIGHT, CAUSAL_NONE, CAUSAL_TOP_LEFT

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxscript")


class OpCall(nn.Module):
    def __init__(self, causal=CAUSAL_NONE, scale=0.3, softcap=0.0, dropout_p=0.0):
        super().__init__()
        self.causal, self.scale, self.softcap, self.dropout_p = causal, scale, softcap, dropout_p

    def forward(self, q, k, v, mask=None):
        seed = torch.zeros((), dtype=torch.int64) if self.dropout_p else None
        return torch.ops.attnopt.attention(q, k, v, mask, self.dropout_p, self.causal, self.scale, seed,
                                           self.softcap)[0]  # fmt: skip


def _mask(kind, b, sq, sk):
    if kind == "none":
        return None
    g = torch.Generator().manual_seed(1)
    if kind == "bool":
        m = torch.rand(b, 1, sq, sk, generator=g) > 0.3
        m[..., 0] = True
        return m
    if kind == "bool-dead-row":  # one query row sees no key at all: zeros, not NaN
        m = torch.rand(b, 1, sq, sk, generator=g) > 0.3
        m[0, 0, 1, :] = False
        return m
    return torch.randn(sq, sk, generator=g)  # additive, broadcast over batch and heads


CASES = [  # (hq, hkv, sq, sk, causal, mask, softcap)
    (4, 4, 5, 5, CAUSAL_NONE, "none", 0.0),
    (4, 2, 5, 5, CAUSAL_TOP_LEFT, "none", 0.0),
    (4, 1, 3, 7, CAUSAL_TOP_LEFT, "bool", 0.0),
    (4, 2, 3, 7, CAUSAL_BOTTOM_RIGHT, "none", 0.0),
    (4, 2, 6, 6, CAUSAL_BOTTOM_RIGHT, "additive", 0.0),
    (4, 2, 6, 6, CAUSAL_NONE, "bool-dead-row", 0.0),
    (2, 2, 5, 5, CAUSAL_TOP_LEFT, "bool", 2.0),
]


class AllCases(nn.Module):
    """Every case of CASES in one module (one export per mode): inputs q, k, v[, mask] per case in order."""

    def __init__(self):
        super().__init__()
        self.calls = nn.ModuleList(OpCall(c[4], 0.3, c[6]) for c in CASES)

    def forward(self, *tensors):
        outs, i = [], 0
        for case, call in zip(CASES, self.calls):
            n = 3 if case[5] == "none" else 4
            outs.append(call(*tensors[i:i + n]))
            i += n
        return tuple(outs)


def _case_inputs():
    inputs = []
    for hq, hkv, sq, sk, _, mask_kind, _ in CASES:
        g = torch.Generator().manual_seed(0)
        q = torch.randn(2, hq, sq, 8, generator=g)
        k, v = torch.randn(2, hkv, sk, 8, generator=g), torch.randn(2, hkv, sk, 8, generator=g)  # distinct k and v
        mask = _mask(mask_kind, 2, sq, sk)
        inputs += [q, k, v] if mask is None else [q, k, v, mask]
    return tuple(inputs)


@pytest.mark.parametrize("mode", ["standard", "decomposed"])
def test_onnx_translation_matches_the_op(tmp_path, mode):
    """GQA, bool/additive masks, causal top-left and bottom-right (Sq != Sk), softcap, a fully masked row."""
    module, inputs = AllCases(), _case_inputs()
    want = module(*inputs)
    assert not any(w.isnan().any() for w in want)
    program = torch.export.export(module, inputs)
    info = E.export_onnx(program, tmp_path / "m.onnx", mode)
    model = onnx.load(str(tmp_path / "m.onnx"))
    onnx.checker.check_model(model, full_check=True)
    if mode == "standard":
        assert info["opset"] == 23 and info["attention_ops"] == {"Attention": len(CASES)} and not info["functions"]
    else:
        assert info["opset"] == 18 and info["functions"] == ["attnopt::DenseAttention"]
        assert info["attention_ops"] == {"attnopt::DenseAttention": len(CASES)}
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(None, {i.name: t.numpy() for i, t in zip(session.get_inputs(), inputs)})
    for case, g, w in zip(CASES, got, want):
        assert float((torch.from_numpy(g) - w).abs().max()) < 1e-5, case


def test_schema_is_not_left_registered(tmp_path):
    q = torch.randn(1, 2, 4, 8)
    E.export_onnx(torch.export.export(OpCall(), (q, q, q)), tmp_path / "m.onnx", "decomposed")
    assert not onnx.defs.has("DenseAttention", "attnopt")


def test_onnx_refuses_dropout(tmp_path):
    q = torch.randn(1, 2, 4, 8)
    program = torch.export.export(OpCall(dropout_p=0.5), (q, q, q))
    with pytest.raises(E.ExportError, match="dropout_p=0.5: export the model in eval mode"):
        E.export_onnx(program, tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()


class Manual(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(16, 48)

    def forward(self, x, scale=0.25):
        q, k, v = self.qkv(x).view(x.shape[0], x.shape[1], 3, 2, 8).permute(2, 0, 3, 1, 4)
        return {"out": torch.softmax(q @ k.transpose(-2, -1) * scale, dim=-1) @ v, "x": x}


def test_export_program_rewrites_and_flattens():
    model = Manual().eval()
    x = torch.randn(2, 5, 16)
    exported = E.export_program(model, "exact", (x,), {"scale": 0.25}, expect={"<top>": "exact"})
    assert [(s.name, s.decision) for s in exported.ctx.sites] == [("<top>", "exact")]
    assert E.count_attnopt_ops(exported.program) == 1
    assert exported.output_names == ["out", "x"] and exported.dynamic == {"args_0": {0: "batch"}}
    out = exported.program.module()(x)  # constants are baked in; outputs are a flat tuple of tensors
    assert isinstance(out, tuple) and len(out) == 2
    torch.testing.assert_close(out[0], model(x)["out"], rtol=1e-5, atol=1e-6)
    exported_keep = E.export_program(model, "keep", (x,), {"scale": 0.25}, dynamic=False)
    assert E.count_attnopt_ops(exported_keep.program) == 0 and exported_keep.dynamic == {}


def test_export_program_checks_expected_decisions():
    with pytest.raises(E.ExportError, match="decided differently"):
        E.export_program(Manual().eval(), "keep", (torch.randn(2, 5, 16),), {}, expect={"<top>": "exact"})


def test_graph_break_is_a_clear_error():
    class Breaks(nn.Module):
        def forward(self, x):
            y = torch.softmax(x, -1)
            print("side effect")  # a graph break
            return y @ x.transpose(-2, -1)

    with pytest.raises(E.ExportError, match="captured as one graph"):
        E.export_program(Breaks(), "exact", (torch.randn(2, 3, 4),), {})
