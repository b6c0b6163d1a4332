"""attn_implementation="attnopt": transformers' attention-function registry, per-layer policies."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import attnopt
from attnopt import zoo

transformers = pytest.importorskip("transformers")
import attnopt.hf  # noqa: E402  (registers "attnopt" with transformers)


class CountAttnopt(TorchDispatchMode):
    """Counts torch.ops.attnopt.attention calls."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.attnopt.attention.default:
            self.calls += 1
        return func(*args, **(kwargs or {}))


def _pair(name, **overrides):
    """The zoo model with attnopt's implementation and the same weights with eager attention."""
    ours = zoo.build(name, "attnopt", **overrides)
    eager = zoo.build(name, "eager", **overrides)
    eager.model.load_state_dict(ours.model.state_dict())
    return ours, eager


def _outputs(z, **extra):
    with torch.no_grad():
        return z.model(*z.args, **z.kwargs, **extra).to_tuple()


@pytest.mark.parametrize("name", ["llama", "bert", "gemma2", "t5", "mistral"])
def test_matches_eager(name):
    ours, eager = _pair(name)
    with attnopt.hf.use("exact"), CountAttnopt() as counter:
        got = _outputs(ours)
    want = _outputs(eager)
    assert counter.calls == {"t5": 6}.get(name, 2)  # every attention layer ran attnopt's kernel
    for g, w in zip(got, want):
        if isinstance(w, torch.Tensor) and w.is_floating_point():
            torch.testing.assert_close(g, w, rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("name", ["llama", "bert"])
def test_from_pretrained(tmp_path, name):
    src = zoo.build(name, "eager")
    src.model.save_pretrained(tmp_path)
    cls = type(src.model)
    model = cls.from_pretrained(tmp_path, attn_implementation="attnopt").eval()
    assert model.config._attn_implementation == "attnopt"
    with CountAttnopt() as counter, torch.no_grad():
        got = model(*src.args, **src.kwargs).last_hidden_state
    with torch.no_grad():
        want = src.model(*src.args, **src.kwargs).last_hidden_state
    assert counter.calls == 2
    torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-5)


def test_use_is_a_setter_and_a_context_manager():
    assert attnopt.hf.current_policy() == attnopt.Policy()
    before = attnopt.hf.current_policy()
    with attnopt.hf.use("keep") as policy:
        assert policy == attnopt.hf.current_policy() == attnopt.Policy(default="keep")
        with attnopt.hf.use("exact"):
            assert attnopt.hf.current_policy().default == attnopt.Exact()
        assert attnopt.hf.current_policy().default == attnopt.Keep()
    assert attnopt.hf.current_policy() == before
    try:
        attnopt.hf.use("keep")  # a plain call sets the policy until changed
        assert attnopt.hf.current_policy().default == attnopt.Keep()
    finally:
        attnopt.hf.use(before)
    assert attnopt.hf.CURRENT.policy == before
    with pytest.raises((NotImplementedError, ValueError)):  # a sparse policy needs the graph passes
        attnopt.hf.use("sliding_window:1024")
    assert attnopt.hf.current_policy() == before


def test_per_layer_policy_and_keep_fallback():
    ours, eager = _pair("llama")
    names = attnopt.hf.name_sites(ours.model)
    assert names == ["layers.0.self_attn", "layers.1.self_attn"]
    policy = attnopt.Policy(default="exact", overrides={"layers.0.*": "keep"})
    with attnopt.hf.use(policy), CountAttnopt() as counter:
        got = _outputs(ours)
    assert counter.calls == 1  # layer 0 kept (transformers' SDPA), layer 1 through attnopt
    torch.testing.assert_close(got[0], _outputs(eager)[0], rtol=1e-5, atol=2e-5)
    with attnopt.hf.use("keep"), CountAttnopt() as counter:
        _outputs(ours)
    assert counter.calls == 0


def test_layers_are_named_by_module_path_on_the_first_call():
    """No name_sites call: the first eager call names every layer by its path in the model the user holds."""
    ours, eager = _pair("llama")
    causal = transformers.LlamaForCausalLM(ours.model.config).eval()
    layer = causal.model.layers[1].self_attn
    assert attnopt.hf.site_name(layer) == "LlamaAttention.1"  # outside any model call: no owner to ask
    with attnopt.hf.use(attnopt.Policy(default="keep", overrides={"model.layers.1.*": "exact"})), \
            CountAttnopt() as counter:  # fmt: skip
        with torch.no_grad():
            causal(*ours.args, **ours.kwargs)
    assert counter.calls == 1
    assert attnopt.hf.site_name(layer) == "model.layers.1.self_attn"
    assert causal.get_submodule(attnopt.hf.site_name(layer)) is layer
    with attnopt.hf.use(attnopt.Policy(default="keep", overrides={"layers.1.*": "exact"})), \
            CountAttnopt() as counter:  # fmt: skip
        _outputs(ours)  # the base model's own paths
    assert counter.calls == 1
    assert attnopt.hf.site_name(ours.model.layers[1].self_attn) == "layers.1.self_attn"


def test_layers_traced_by_torch_compile_are_named_too():
    torch._dynamo.reset()
    ours, eager = _pair("llama")
    with attnopt.hf.use(attnopt.Policy(overrides={"layers.0.*": "keep"})), torch.no_grad():
        got = torch.compile(ours.model, backend="eager")(*ours.args, **ours.kwargs).last_hidden_state
    assert [attnopt.hf.site_name(layer.self_attn) for layer in ours.model.layers] == ["layers.0.self_attn",
                                                                                      "layers.1.self_attn"]
    torch.testing.assert_close(got, _outputs(eager)[0], rtol=1e-5, atol=2e-5)


def test_a_glob_matching_no_layer_is_an_error():
    ours, _ = _pair("llama")
    with attnopt.hf.use(attnopt.Policy(overrides={"LlamaAttention.1": "keep"})):
        with pytest.raises(ValueError, match=r"\['LlamaAttention\.1'\] match no attention layer.*layers\.0\.self_attn"):
            _outputs(ours)


def test_torch_export_keeps_attnopt_ops():
    ours, _ = _pair("llama")
    kwargs = {**ours.kwargs, "use_cache": False}
    with attnopt.hf.use("exact"):
        program = torch.export.export(ours.model, ours.args, kwargs)
    assert sum(n.target is torch.ops.attnopt.attention.default for n in program.graph.nodes) == 2


def test_training_dropout_runs():
    ours = zoo.build("bert", "attnopt", attention_probs_dropout_prob=0.5)
    ours.model.train()
    with CountAttnopt() as counter:
        out = ours.model(*ours.args, **ours.kwargs).last_hidden_state
    out.sum().backward()
    assert counter.calls == 2 and ours.model.embeddings.word_embeddings.weight.grad is not None
