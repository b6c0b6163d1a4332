"""Sites whose additive terms run as a traced score_mod: Bloom's ALiBi and T5's relative position bias in the zoo."""

import pytest
import torch
from conftest import rel_err
from torch.profiler import profile

import attnopt
from attnopt import zoo

HEADS = {"bloom": dict(n_head=8), "t5": dict(num_heads=8, d_kv=8)}


def _out(o):
    return o.last_hidden_state


def _ops(model, args, kwargs) -> dict:
    with torch.no_grad(), profile() as prof:
        model(*args, **kwargs)
    return {e.key: e.count for e in prof.key_averages() if e.key.startswith("attnopt::")}


@pytest.mark.parametrize("name", ["bloom", "t5"])
def test_zoo_sites_run_the_score_mod_and_match(name):
    z = zoo.build(name, "eager")
    with torch.no_grad():
        want = _out(z.model(*z.args, **z.kwargs))
        opt = attnopt.optimize(z.model, "exact", z.args, z.kwargs)
        got = _out(opt(*z.args, **z.kwargs))
    assert rel_err(got, want) < 1e-5
    sites = attnopt.report(opt).sites
    assert sites and all(s.decision == "exact" for s in sites)
    assert _ops(opt, z.args, z.kwargs) == {"attnopt::score_mod_attention": len(sites)}


def test_other_sites_keep_the_plain_emission():
    """Swin's relative position bias beside its window mask is neither form: the plain op, open to every variant."""
    z = zoo.build("swin", "eager")
    with torch.no_grad():
        opt = attnopt.optimize(z.model, "exact", z.args, z.kwargs)
    assert set(_ops(opt, z.args, z.kwargs)) == {"attnopt::attention"}


def test_t5_bias_table_gets_its_gradient():
    """The relative attention bias table is read in the kernel: its gradient still reaches it. In float64: the
    table's gradient is small (about 1e-9 here), so fp32 rounding of the forward would dominate it."""
    z = zoo.build("t5", "eager")
    z.model.double()
    ref = zoo.build("t5", "eager").model.double()
    opt = attnopt.optimize(z.model, "exact", z.args, z.kwargs)
    _out(opt(*z.args, **z.kwargs)).pow(2).mean().backward()
    _out(ref(*z.args, **z.kwargs)).pow(2).mean().backward()
    name = "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
    got, want = z.model.get_parameter(name).grad, ref.get_parameter(name).grad
    assert want.abs().sum() > 0 and rel_err(got, want) < 1e-6  # HF T5 runs its softmax in fp32


def _largest_allocation(model, kwargs) -> int:
    """The largest block one op allocated in a forward (bytes): the profiler's per-op memory, op by op."""
    with torch.no_grad(), profile(profile_memory=True) as prof:
        model(**kwargs)
    return max(e.self_cpu_memory_usage for e in prof.events())


@pytest.mark.parametrize("name", ["bloom", "t5"])
def test_no_score_sized_bias_is_allocated(name):
    """At 8 heads and 512 tokens the [1, H, Sq, Sk] fp32 bias is 8 MiB: the original model allocates it (T5's
    gathered table, Bloom's ALiBi added to the scores), the optimized one nothing that large (its largest blocks
    are its score tiles and the [1, 1, Sq, Sk] padding mask the model builds anyway)."""
    seq = 512
    z = zoo.build(name, "eager", batch=1, seq=seq, **HEADS[name])
    kwargs = dict(z.kwargs)
    if "decoder_input_ids" in kwargs:
        kwargs["decoder_input_ids"] = kwargs["decoder_input_ids"][:, :64]  # the encoder's self-attention is measured
    bias_bytes = 8 * seq * seq * 4
    with torch.no_grad():
        want = _out(z.model(**kwargs))
        opt = attnopt.optimize(z.model, "exact", (), kwargs)
        got = _out(opt(**kwargs))
    assert rel_err(got, want) < 1e-5
    assert _largest_allocation(z.model, kwargs) >= bias_bytes  # the original builds a bias that large
    assert _largest_allocation(opt, kwargs) < bias_bytes
