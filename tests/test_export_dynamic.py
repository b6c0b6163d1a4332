"""Dynamic batch and sequence dims of .pt2 and ONNX exports, and named outputs."""

import json

import pytest
import torch
from click.testing import CliRunner
from torch import nn

from attnopt import export as E
from attnopt import zoo
from attnopt.cli import main
from attnopt.export_dims import infer_dims, named_outputs
from attnopt.passes import TOLERANCE, deviation

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
transformers = pytest.importorskip("transformers")

MODELS = {  # zoo name, class saved (its config's architectures), the output names
    "llama": ("LlamaForCausalLM", ["logits"]),  # causal, with a padding attention mask
    "bert": ("BertModel", ["last_hidden_state", "pooler_output"]),  # bidirectional, with a padding mask
}
TOKEN_DIMS = {"0": "batch", "1": "sequence"}


def _model(name):
    cls, _ = MODELS[name]
    torch.manual_seed(0)
    model = getattr(transformers, cls)._from_config(zoo.config(name, num_hidden_layers=1), attn_implementation="sdpa")
    return model.eval()


def _convert(model, tmp_path, *extra):
    src, out = tmp_path / "src", tmp_path / "out"
    model.save_pretrained(src)  # convert derives batch 2 x 13 tokens (last row padded) from the config
    res = CliRunner().invoke(main, ["convert", str(src), "--policy", "exact", "--out", str(out), "--format", "pt2",
                                    "--format", "onnx", "-q", *extra])  # fmt: skip
    assert res.exit_code == 0, res.output
    return out, json.loads((out / "attnopt.json").read_text()), res.output


def _inputs(model, batch, seq):
    _, kwargs = zoo.example_inputs(model.config, batch=batch, seq=seq)  # the last row padded at the end
    return kwargs


@pytest.mark.parametrize("name", list(MODELS))
def test_exports_written_at_2x13_run_at_other_batches_and_lengths(tmp_path, name):
    model = _model(name)
    validate = ["--validate", "--samples", "1"] if name == "llama" else []
    out, manifest, output = _convert(model, tmp_path, *validate)
    if validate:  # --validate also runs the dynamic exports at a grown batch and length
        assert manifest["validation"]["passed"] and manifest["validation"]["samples"] == 1
        assert manifest["validation"]["reshaped"] == [{"targets": ["module", "onnx", "pt2"],
                                                       "inputs": ["input_ids:3x16:int64", "attention_mask:3x16:int64"]}]
        assert "validated module, onnx, pt2 also at input_ids:3x16:int64" in output
    assert manifest["inputs"]["specs"][0]["shape"] == [2, 13]
    names = MODELS[name][1]
    for fmt in ("pt2", "onnx"):
        entry = manifest["exports"][fmt]
        assert entry["dynamic"] == {"input_ids": TOKEN_DIMS, "attention_mask": TOKEN_DIMS}, fmt
        assert entry["outputs"] == names and entry["shape_notes"] == []
    assert "pt2: model.pt2 (dynamic input_ids[batch, sequence], attention_mask[batch, sequence])" in output
    program = torch.export.load(str(out / "model.pt2")).module()
    session = E.onnx_session(out / "model.onnx")
    assert [o.name for o in session.get_outputs()] == names
    assert [i.shape for i in session.get_inputs()] == [["batch", "sequence"]] * 2
    for batch, seq in [(1, 7), (3, 29)]:
        kwargs = _inputs(model, batch, seq)
        with torch.no_grad():
            want = E.flatten_output(model(**kwargs))
            got = {"pt2": program(**kwargs), "onnx": E.run_onnx(session, (), kwargs)}
        for fmt, outs in got.items():
            assert len(outs) == len(want) and outs[0].shape[:2] == (batch, seq)
            devs = [deviation(g, w) for g, w in zip(outs, want)]
            assert max(devs) <= TOLERANCE[torch.float32], (fmt, batch, seq, devs)


def test_no_dynamic_keeps_the_example_shapes(tmp_path):
    model = _model("bert")
    out, manifest, output = _convert(model, tmp_path, "--no-dynamic")
    assert manifest["exports"]["pt2"]["dynamic"] == {} and manifest["exports"]["onnx"]["dynamic"] == {}
    assert "pt2: model.pt2 (static shapes)" in output
    assert manifest["exports"]["onnx"]["outputs"] == MODELS["bert"][1]  # named outputs either way
    session = E.onnx_session(out / "model.onnx")
    assert [i.shape for i in session.get_inputs()] == [[2, 13]] * 2
    program = torch.export.load(str(out / "model.pt2")).module()
    kwargs = _inputs(model, 3, 13)
    with pytest.raises(Exception, match="input_ids"):
        program(**kwargs)
    with pytest.raises(Exception, match="input_ids"):
        E.run_onnx(session, (), _inputs(model, 2, 7))


class FixedLength(nn.Module):
    """Token embeddings plus a position table of exactly 13 rows: the sequence length is fixed, the batch not."""

    def __init__(self):
        super().__init__()
        self.emb, self.pos, self.qkv = nn.Embedding(32, 16), nn.Parameter(torch.randn(13, 16)), nn.Linear(16, 48)

    def forward(self, ids):
        x = self.emb(ids) + self.pos
        q, k, v = self.qkv(x).view(x.shape[0], x.shape[1], 3, 2, 8).permute(2, 0, 3, 1, 4)
        return torch.softmax(q @ k.transpose(-2, -1) * 0.35, dim=-1) @ v


def test_a_model_that_fixes_the_length_falls_back_with_the_reason(tmp_path):
    model = FixedLength().eval()
    ids = torch.randint(0, 32, (2, 13))
    exported = E.export_program(model, "exact", (ids,), {})
    assert exported.dynamic == {"args_0": {0: "batch"}}  # the batch stays dynamic
    assert exported.notes == ["dynamic batch and sequence refused: the model's code fixes ids dim 1 to 13"]
    assert E.count_attnopt_ops(exported.program) == 1
    other = torch.randint(0, 32, (5, 13))
    torch.testing.assert_close(exported.program.module()(other)[0], model(other), rtol=1e-5, atol=1e-6)
    entry = E.export_onnx(exported.program, tmp_path / "m.onnx", "standard", exported.output_names,
                          exported.dim_symbols)  # fmt: skip
    assert entry["outputs"] == ["output_0"]  # a bare tensor has no name
    session = E.onnx_session(tmp_path / "m.onnx")
    assert session.get_inputs()[0].shape == ["batch", 13]
    assert deviation(E.run_onnx(session, (other,), {})[0], model(other)) <= 1e-4


def test_infer_dims_from_example_inputs():
    ids, mask, pixels = torch.zeros(2, 9, dtype=torch.long), torch.ones(2, 9, dtype=torch.bool), torch.randn(2, 3, 8, 8)
    dims, notes = infer_dims((pixels,), {"input_ids": ids, "attention_mask": mask, "inputs_embeds": torch.randn(2, 9, 4)})
    assert dims == {"args_0": {0: "batch"}, "input_ids": {0: "batch", 1: "sequence"},
                    "attention_mask": {0: "batch", 1: "sequence"}, "inputs_embeds": {0: "batch", 1: "sequence"}}
    assert notes == []
    dims, notes = infer_dims((), {"input_ids": torch.zeros(1, 20, dtype=torch.long)})
    assert dims == {"input_ids": {1: "sequence"}}  # torch.export specializes a size of 1
    assert notes and "input_ids dim 0 (batch) stays static: its example size is 1" in notes[0]


class Outputs(nn.Module):
    def __init__(self, kind):
        super().__init__()
        self.kind = kind

    def forward(self, x):
        y = torch.softmax(x @ x.transpose(-2, -1), dim=-1) @ x
        if self.kind == "dict":
            return {"out": y, "pair": (y + 1, None, y * 2), "x": x}  # x is the input itself: an Identity in ONNX
        return y, y.sum(-1)


@pytest.mark.parametrize("kind,names", [("dict", ["out", "pair.0", "pair.2", "x"]), ("tuple", ["output_0", "output_1"])])
def test_outputs_are_named_by_their_keys(tmp_path, kind, names):
    model, x = Outputs(kind), torch.randn(2, 3, 5, 8)
    assert [n for n, _ in named_outputs(model(x))] == names
    exported = E.export_program(model, "exact", (x,), {})
    assert exported.output_names == names and exported.dynamic == {"args_0": {0: "batch"}}
    entry = E.export_onnx(exported.program, tmp_path / "m.onnx", "decomposed", exported.output_names,
                          exported.dim_symbols)  # fmt: skip
    session = E.onnx_session(tmp_path / "m.onnx")
    assert entry["outputs"] == names and [o.name for o in session.get_outputs()] == names
    assert [i.name for i in session.get_inputs()] == ["args_0"]
    other = torch.randn(4, 3, 5, 8)
    for got, want in zip(E.run_onnx(session, (other,), {}), E.flatten_output(model(other))):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
