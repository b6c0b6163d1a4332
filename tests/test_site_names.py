"""Site names are module paths relative to the model the user passed, whatever dynamo calls the graph's
inputs: the same in inspect, optimize, convert, the compile backend and attn_implementation="attnopt"."""

import functools
import json

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from torch import nn

import attnopt
from attnopt import zoo
from attnopt.cli import main

transformers = pytest.importorskip("transformers")
import attnopt.hf  # noqa: E402

LLAMA = ["model.layers.0.self_attn", "model.layers.1.self_attn"]


def _causal_lm(attn: str):
    torch.manual_seed(0)
    z = zoo.build("llama", attn)
    return transformers.LlamaForCausalLM._from_config(z.model.config, attn_implementation=attn).eval(), z


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_llama_sites_are_module_paths_that_resolve(attn):
    model, z = _causal_lm(attn)
    names = [s.name for s in attnopt.inspect(model, z.args, z.kwargs).sites]
    assert names == LLAMA
    assert all(type(model.get_submodule(n)).__name__ == "LlamaAttention" for n in names)
    base = [s.name for s in attnopt.inspect(z.model, z.args, z.kwargs).sites]
    assert base == ["layers.0.self_attn", "layers.1.self_attn"]
    policy = attnopt.Policy(overrides={"model.layers.0.*": "keep"})
    assert policy.for_site("model.layers.10.self_attn") == attnopt.Exact()  # the glob is not a prefix match
    opt = attnopt.optimize(model, policy, z.args, z.kwargs)
    assert [(s.name, s.decision) for s in attnopt.report(opt).sites] == [(LLAMA[0], "keep"), (LLAMA[1], "exact")]


class Attn(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(16, 48)

    def forward(self, x):
        q, k, v = self.qkv(x).unflatten(-1, (3, 2, 8)).permute(2, 0, 3, 1, 4)  # [B, H, S, D] each
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)


class Block(nn.Module):
    def __init__(self, graph_break: bool):
        super().__init__()
        self.attn1, self.graph_break = Attn(), graph_break

    def forward(self, x):
        if self.graph_break:  # the rest of this block compiles as its own frame (L['self'] is the block)
            torch._dynamo.graph_break()
        return x + self.attn1(x)


def _passes_self_as_an_argument(fn):
    """What Hugging Face and diffusers decorators do: the compiled frame sees the module as args[0]."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return fn(*args, **kwargs)

    return wrapper


class UNet(nn.Module):
    def __init__(self, graph_break: bool = False):
        super().__init__()
        self.transformer_blocks = nn.ModuleList([Block(graph_break), Block(graph_break)])

    @_passes_self_as_an_argument
    def forward(self, x):
        for block in self.transformer_blocks:
            x = block(x)
        return x


BLOCKS = ["transformer_blocks.0.attn1", "transformer_blocks.1.attn1"]


def _names(backend):
    return sorted(s.name for s in backend.report.sites)


@pytest.mark.parametrize("graph_break", [False, True], ids=["one-graph", "graph-break"])
def test_module_passed_to_a_compiled_function_and_graph_breaks_keep_full_paths(graph_break):
    torch._dynamo.reset()
    net, x = UNet(graph_break).eval(), torch.randn(2, 5, 16)
    assert sorted(s.name for s in attnopt.inspect(net, (x,)).sites) == BLOCKS
    for name in BLOCKS:
        assert isinstance(net.get_submodule(name), Attn)
    compiled = attnopt.make_backend("exact", then="eager")  # no model given: the module torch.compile got
    with torch.no_grad():
        torch.compile(net, backend=compiled)(x)
    assert _names(compiled) == BLOCKS
    as_argument = attnopt.make_backend("exact", then="eager", model=net)
    with torch.no_grad():
        torch.compile(lambda m, t: m(t), backend=as_argument)(net, x)
    assert _names(as_argument) == BLOCKS


def test_a_graph_serving_several_blocks_follows_each_blocks_policy():
    """After a graph break, one compiled frame runs both blocks: each block is named and rewritten for itself."""
    torch._dynamo.reset()
    net, x = UNet(graph_break=True).eval(), torch.randn(2, 5, 16)
    opt = attnopt.optimize(net, attnopt.Policy(overrides={"transformer_blocks.1.*": "keep"}), (x,))
    decisions = sorted((s.name, s.decision) for s in attnopt.report(opt).sites)
    assert decisions == [(BLOCKS[0], "exact"), (BLOCKS[1], "keep")]
    with torch.no_grad(), torch.profiler.profile() as prof:
        got = opt(x)
    assert sum(e.count for e in prof.key_averages() if e.key == "attnopt::attention") == 1  # block 0 only
    with torch.no_grad():
        torch.testing.assert_close(got, net(x), rtol=1e-5, atol=1e-5)


def test_a_glob_matching_no_site_is_an_error_everywhere():
    torch._dynamo.reset()
    net, x = UNet().eval(), torch.randn(2, 5, 16)
    policy = attnopt.Policy(overrides={"blocks.*": "keep"})
    listing = r"\['blocks\.\*'\] match no .*transformer_blocks\.0\.attn1"
    with pytest.raises(ValueError, match=listing):
        attnopt.inspect(net, (x,), policy=policy)
    with pytest.raises(ValueError, match=listing):
        attnopt.optimize(net, policy, (x,))
    lazy = attnopt.optimize(net, policy)  # no example inputs: checked once the first call is captured
    with pytest.raises(ValueError, match=listing), torch.no_grad():
        lazy(x)
    with pytest.raises(Exception, match=listing), torch.no_grad():  # dynamo wraps it in BackendCompilerFailed
        torch.compile(net, backend=attnopt.make_backend(policy, then="eager"))(x)


def test_inspect_convert_and_attn_implementation_agree(tmp_path):
    model, z = _causal_lm("sdpa")
    model.save_pretrained(tmp_path / "src")
    res = CliRunner().invoke(main, ["inspect", str(tmp_path / "src")])
    assert res.exit_code == 0, res.output
    assert "built LlamaForCausalLM" in res.output
    res = CliRunner().invoke(main, ["inspect", str(tmp_path / "src"), "--json"])
    assert [s["name"] for s in json.loads(res.stdout)["sites"]] == LLAMA
    res = CliRunner().invoke(main, ["convert", str(tmp_path / "src"), "--policy", "exact",
                                    "--out", str(tmp_path / "out"), "-q", "--json"])  # fmt: skip
    assert res.exit_code == 0, res.output
    manifest = json.loads(res.stdout)
    assert manifest["model"]["class"] == "LlamaForCausalLM" and [s["name"] for s in manifest["sites"]] == LLAMA
    res = CliRunner().invoke(main, ["inspect", str(tmp_path / "src"), "--json", "--model-class", "base"])
    assert [s["name"] for s in json.loads(res.stdout)["sites"]] == ["layers.0.self_attn", "layers.1.self_attn"]
    loaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "src", attn_implementation="attnopt").eval()
    with attnopt.hf.use(attnopt.Policy(overrides={"model.layers.0.*": "keep"})), torch.no_grad():
        loaded(*z.args, **z.kwargs)
    assert [attnopt.hf.site_name(layer.self_attn) for layer in loaded.model.layers] == LLAMA


def test_an_unknown_model_class_is_refused(tmp_path):
    zoo.config("llama").save_pretrained(tmp_path)
    res = CliRunner().invoke(main, ["inspect", str(tmp_path), "--model-class", "NoSuchModel"])
    assert res.exit_code != 0 and "NoSuchModel" in res.output and "LlamaForCausalLM" in res.output


def _attention_function(x, w_qkv, b_qkv, w_out):
    torch._dynamo.graph_break()  # what follows compiles as this function's own frame, passed the weights
    q, k, v = F.linear(x, w_qkv, b_qkv).unflatten(-1, (3, 2, 8)).permute(2, 0, 3, 1, 4)
    return F.linear(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2), w_out)


class FunctionalAttn(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv, self.out = nn.Linear(16, 48), nn.Linear(16, 16, bias=False)

    def forward(self, x):
        return _attention_function(x, self.qkv.weight, self.qkv.bias, self.out.weight)


def test_an_attention_function_compiled_on_its_own_is_named_by_the_module_holding_its_weights():
    torch._dynamo.reset()
    net, x = nn.Sequential(FunctionalAttn(), FunctionalAttn()).eval(), torch.randn(2, 5, 16)
    assert sorted(s.name for s in attnopt.inspect(net, (x,)).sites) == ["0", "1"]  # not <top>, once per module
