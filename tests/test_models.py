"""The bar on real Hugging Face models: gpt2, bert, llama and vit, eager and sdpa attention."""

import pytest
import torch
from torch.profiler import profile

import attnopt
from attnopt import zoo

from conftest import rel_err

MODELS = ["gpt2", "bert", "llama", "vit"]
LAYERS = 2


def _out(o):
    return o.last_hidden_state


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("name", MODELS)
def test_inspect_and_optimize(name, impl):
    z = zoo.build(name, impl)
    report = attnopt.inspect(z.model, z.args, z.kwargs)
    assert len(report.sites) == LAYERS  # one site a layer
    assert all(s.decision == "exact" for s in report.sites), str(report)
    assert len({s.name for s in report.sites}) == LAYERS

    opt = attnopt.optimize(z.model, "exact", z.args, z.kwargs)
    rep = attnopt.report(opt)
    assert [s.decision for s in rep.sites] == ["exact"] * LAYERS, str(rep)
    assert rep.output_deviation < 1e-5
    with torch.no_grad():
        want, got = _out(z.model(*z.args, **z.kwargs)), _out(opt(*z.args, **z.kwargs))
    assert rel_err(got, want) < 1e-5


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("name", MODELS)
def test_compile_backend_runs_attnopt_ops(name, impl):
    z = zoo.build(name, impl)
    with torch.no_grad():
        want = _out(z.model(*z.args, **z.kwargs))
        compiled = torch.compile(z.model, backend="attnopt")
        got = _out(compiled(*z.args, **z.kwargs))
        with profile() as prof:
            compiled(*z.args, **z.kwargs)
    assert rel_err(got, want) < 1e-5
    calls = [e for e in prof.key_averages() if e.key == "attnopt::attention"]
    assert calls and calls[0].count == LAYERS


def test_training_step_matches_original_gradients():
    """In float64, so the comparison measures the rewrite, not fp32 rounding amplified by the backward.

    (sdpa attention: HF's eager path runs its softmax in fp32 even in a float64 model.)
    """
    z = zoo.build("llama", "sdpa")
    z.model.double()
    ref = zoo.build("llama", "sdpa").model.double()
    opt = attnopt.optimize(z.model, "exact", z.args, z.kwargs)
    opt.train()
    ref.train()
    _out(opt(*z.args, **z.kwargs)).pow(2).mean().backward()
    _out(ref(*z.args, **z.kwargs)).pow(2).mean().backward()
    for (n, p), (_, r) in zip(z.model.named_parameters(), ref.named_parameters()):
        assert rel_err(p.grad, r.grad) < 1e-9, n


def test_optimize_without_inputs_captures_at_first_call():
    z = zoo.build("gpt2", "sdpa")
    opt = attnopt.optimize(z.model)
    assert attnopt.report(opt).sites == []
    with torch.no_grad():
        got = _out(opt(*z.args, **z.kwargs))
        want = _out(z.model(*z.args, **z.kwargs))
    assert rel_err(got, want) < 1e-5
    rep = attnopt.report(opt)
    assert [s.decision for s in rep.sites] == ["exact"] * LAYERS
    assert all(s.deviation is not None for s in rep.sites)  # validated at the first call


def test_new_shapes_recapture_and_stay_exact():
    z = zoo.build("bert", "eager")
    opt = attnopt.optimize(z.model, "exact", z.args, z.kwargs)
    ids = torch.randint(0, 256, (3, 21))
    with torch.no_grad():
        assert rel_err(_out(opt(input_ids=ids)), _out(z.model(input_ids=ids))) < 1e-5


def test_optimized_module_delegates_and_keeps_state_dict_keys():
    z = zoo.build("gpt2", "eager")
    opt = attnopt.optimize(z.model, "exact", z.args, z.kwargs)
    assert opt.config is z.model.config
    assert list(opt.state_dict()) == list(z.model.state_dict())
