"""``torch.compile(model, backend="attnopt")`` trains.

The registered backend runs attnopt's passes, then Inductor. A training step (forward, backward,
optimizer step) on tiny Hugging Face models (eager and sdpa attention) and on a hand-written
attention module gives the gradients of the uncompiled original (same weights, dropout 0), and the
profiler shows attnopt's ops in both directions. Before the fix the backward op's fake kernel promised
the strides of q (a transposed view in every model here) and Inductor's stride assertion failed.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import profile

import attnopt
from attnopt import zoo

SEQ = 16

# Tiny task models, dropout off so the compiled and the original model compute the same function.
LLAMA = dict(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, hidden_size=32,
             intermediate_size=64, vocab_size=128, max_position_embeddings=64)  # fmt: skip
BERT = dict(num_hidden_layers=2, num_attention_heads=4, hidden_size=32, intermediate_size=64, vocab_size=128,
            max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)  # fmt: skip


@pytest.fixture(autouse=True)
def _fresh_inductor():
    """No Inductor/FX cache across runs: a graph compiled by an older attnopt would replay its stale strides."""
    with torch._inductor.config.patch(force_disable_caches=True):
        yield


class SelfAttention(nn.Module):
    """Hand-written causal self-attention: fused qkv projection, heads as a permuted view (non-contiguous q, k, v)."""

    def __init__(self, dim: int = 32, heads: int = 4):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):  # x [B, S, D]
        b, s, d = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)  # [B, H, S, Dh]
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, s, d))


def _hf(name: str, model_class: str, impl: str, overrides: dict):
    import transformers

    cfg = zoo.config(name, **overrides)
    torch.manual_seed(0)
    model = getattr(transformers, model_class)._from_config(cfg, attn_implementation=impl)
    (), kwargs = zoo.example_inputs(cfg, batch=2, seq=SEQ)
    kwargs["labels"] = kwargs["input_ids"]
    return model, kwargs


def _case(kind: str, impl: str = ""):
    """(model, kwargs, loss_of_output) for one case."""
    if kind == "llama":
        model, kwargs = _hf("llama", "LlamaForCausalLM", impl, LLAMA)
        return model, kwargs, lambda o: o.loss
    if kind == "bert":
        model, kwargs = _hf("bert", "BertForMaskedLM", impl, BERT)
        return model, kwargs, lambda o: o.loss
    torch.manual_seed(0)
    return SelfAttention(), {"x": torch.randn(2, SEQ, 32)}, lambda o: o.pow(2).mean()


def _step(model, run, kwargs, loss_of):
    """One training step of ``model`` through ``run`` (the model or its compiled form); returns the gradients
    it computed (before the optimizer consumed them)."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    opt.zero_grad()
    loss_of(run(**kwargs)).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    opt.step()
    return grads


def _worst(got: dict, want: dict) -> tuple[float, str]:
    """The largest per-parameter ``max |g - g0| / max |g0|`` and its parameter. A gradient that is zero in exact
    arithmetic (a key bias: softmax ignores a per-row shift of the scores; ~1e-12 of rounding here) is measured
    against a floor of 1e-6 of the model's largest gradient, not against its own rounding noise."""
    floor = 1e-6 * max(float(g0.abs().max()) for g0 in want.values())
    return max((float((got[n] - g0).abs().max()) / max(float(g0.abs().max()), floor), n) for n, g0 in want.items())


@pytest.mark.parametrize("kind,impl", [("llama", "eager"), ("llama", "sdpa"), ("bert", "eager"), ("bert", "sdpa"),
                                       ("module", "")])  # fmt: skip
def test_compiled_training_step_matches_the_original(kind, impl):
    model, kwargs, loss_of = _case(kind, impl)
    original = copy.deepcopy(model).train()
    compiled = torch.compile(model.train(), backend="attnopt")

    want = _step(original, original, kwargs, loss_of)
    with profile() as prof:
        got = _step(model, compiled, kwargs, loss_of)
    assert got.keys() == want.keys()
    worst = _worst(got, want)
    assert worst[0] < 1e-5, worst
    for (n, p), p0 in zip(model.named_parameters(), original.parameters()):  # the optimizer step applied them
        assert torch.allclose(p, p0, rtol=1e-5, atol=1e-6), n

    names = {e.key for e in prof.key_averages() if e.key.startswith("attnopt::")}
    forward = {n for n in names if not n.endswith("_backward")}
    assert forward and {f"{n}_backward" for n in forward} <= names, names


@pytest.mark.parametrize("policy", [attnopt.Linear(causal=True), "sigmoid", "sparse:causal"],
                         ids=["linear", "sigmoid", "sparse"])
def test_rewritten_variants_train_through_inductor(policy):
    """The linear, sigmoid and sparse ops through Inductor give the gradients of the same rewrite run eagerly."""
    model, kwargs, loss_of = _case("module")
    eager_model = copy.deepcopy(model).train()
    inductor = attnopt.make_backend(policy)
    compiled = torch.compile(model.train(), backend=inductor)
    eager = torch.compile(eager_model, backend=attnopt.make_backend(policy, then="eager"))

    want = _step(eager_model, eager, kwargs, loss_of)
    with profile() as prof:
        got = _step(model, compiled, kwargs, loss_of)
    decision = inductor.report.sites[0].decision
    assert decision != "exact" and _worst(got, want)[0] < 1e-5
    names = {e.key for e in prof.key_averages()}
    assert {f"attnopt::{decision}_attention", f"attnopt::{decision}_attention_backward"} <= names, names
