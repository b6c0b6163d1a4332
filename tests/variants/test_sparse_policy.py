"""attnopt.Sparse in the pipeline: exact-sparse on zoo models, new masks as measured approximations, policy forms."""

import pytest
import torch
from torch.profiler import profile

import attnopt
from attnopt import masks as M
from attnopt import zoo
from attnopt.policy import Policy, parse_variant, variant_from_dict, variant_to_dict

from conftest import rel_err


def _calls(fn, name):
    with profile() as prof:
        fn()
    return sum(e.count for e in prof.key_averages() if e.key == name)


@pytest.mark.parametrize("name, impl", [("mistral", "eager"), ("mistral", "sdpa"), ("gemma2", "eager"), ("llama", "sdpa")])
def test_exact_sparse_on_zoo_models_equals_the_original(name, impl):
    """Mistral's and Gemma 2's sliding windows (with padding) and plain causal run the sparse kernel, same outputs."""
    z = zoo.build(name, impl)
    opt = attnopt.optimize(z.model, Policy(default=attnopt.Sparse()), z.args, z.kwargs)
    rep = attnopt.report(opt)
    assert [s.decision for s in rep.sites] == ["exact-sparse"] * 2, str(rep)
    assert all(s.deviation < 1e-5 for s in rep.sites)
    with torch.no_grad():
        want = z.model(*z.args, **z.kwargs).last_hidden_state
        got = opt(*z.args, **z.kwargs).last_hidden_state
        assert _calls(lambda: opt(*z.args, **z.kwargs), "attnopt::sparse_attention") == 2
    assert rel_err(got, want) < 1e-5


def test_exact_sparse_falls_back_to_exact_for_unstructured_masks():
    """A random mask is not a window: the auto op runs the exact kernel (never a wrong answer)."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 9, 16, generator=g) for _ in range(3))
    mask = torch.rand(2, 1, 9, 9, generator=g) > 0.3
    mask[..., 0] = True
    from attnopt.kernels.exact import reference

    want = reference.attention_forward(q, k, v, mask, scale=0.25)[0]
    f = lambda: torch.ops.attnopt.sparse_attention_auto(q, k, v, mask, 0, 0.25, 0.0)[0]  # noqa: E731
    assert _calls(f, "attnopt::sparse_attention") == 0
    torch.testing.assert_close(f(), want)


def test_new_mask_on_one_layer_is_an_approximation_with_its_deviation():
    z = zoo.build("llama", "eager")
    policy = Policy(default="exact", overrides={"layers.0.*": attnopt.Sparse(M.SlidingWindow(4, 0))})
    opt = attnopt.optimize(z.model, policy, z.args, z.kwargs)
    first, second = attnopt.report(opt).sites
    assert first.decision == "sparse" and "approximate" in first.reason and first.deviation > 1e-3
    assert second.decision == "exact"
    with torch.no_grad():
        assert _calls(lambda: opt(*z.args, **z.kwargs), "attnopt::sparse_attention") == 1
    bounded = attnopt.optimize(z.model, Policy(default="exact", overrides=policy.overrides, max_error=1e-3), z.args, z.kwargs)
    assert attnopt.report(bounded).sites[0].decision == "keep"


def test_sparse_training_step_has_gradients():
    z = zoo.build("mistral", "eager")
    opt = attnopt.optimize(z.model, Policy(default=attnopt.Sparse()), z.args, z.kwargs)
    ref = zoo.build("mistral", "eager").model
    opt.train()
    ref.train()
    opt(*z.args, **z.kwargs).last_hidden_state.pow(2).mean().backward()
    ref(*z.args, **z.kwargs).last_hidden_state.pow(2).mean().backward()
    for (n, p), (_, r) in zip(z.model.named_parameters(), ref.named_parameters()):
        assert rel_err(p.grad, r.grad) < 1e-4, n


def test_site_without_a_mask_is_not_exact_sparse():
    z = zoo.build("bert", "sdpa")
    kwargs = {"input_ids": z.kwargs["input_ids"]}
    rep = attnopt.inspect(z.model, (), kwargs, policy=Policy(default=attnopt.Sparse()))
    assert all(s.decision == "keep" and "no mask" in s.reason for s in rep.sites), str(rep)


@pytest.mark.parametrize("text, mask", [
    ("sparse", "auto"), ("sparse:auto", "auto"), ("sparse:causal", M.causal()),
    ("sliding_window:256", M.SlidingWindow(255, 0)), ("sliding_window:4,2", M.SlidingWindow(4, 2)),
    ("sparse:blocked:64", M.Blocked(64)),
    ('sparse:{"type": "Neighborhood", "kernel_size": [3, 5], "grid": [8, 8]}', M.Neighborhood((3, 5), grid=(8, 8))),
])  # fmt: skip
def test_string_and_dict_forms(text, mask):
    v = parse_variant(text)
    assert isinstance(v, attnopt.Sparse) and v.mask == mask
    if mask != "auto":
        assert variant_from_dict(variant_to_dict(v)) == v
    assert Policy.from_string(text).default == v


@pytest.mark.parametrize("bad, match", [
    (lambda: attnopt.Sparse(3), "mask descriptor"),
    (lambda: parse_variant("sliding_window:0"), "sliding_window takes"),
    (lambda: parse_variant("sparse:wide"), "sparse takes"),
    (lambda: variant_to_dict(attnopt.Sparse(M.BlockSparse(torch.ones(1, 2, 2, dtype=torch.bool), 4))), "no dict form"),
])  # fmt: skip
def test_invalid_sparse_policies_raise_clear_errors(bad, match):
    with pytest.raises((TypeError, ValueError), match=match):
        bad()


def test_names_and_reasons():
    assert attnopt.Sparse().name == "exact-sparse" and attnopt.Sparse(M.causal()).name == "sparse"
    assert attnopt.Sparse.name == "sparse"
    assert "same function" in attnopt.Sparse().describe()
