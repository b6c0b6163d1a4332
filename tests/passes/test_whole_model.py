"""The whole-graph check. A rewritten graph whose outputs deviate from the original's on the example
inputs is never returned silently: it falls back to the original graph (the report says why) or raises, as
``Policy.on_deviation`` says."""

import operator

import pytest
import torch
from torch import nn

import attnopt
from _purity_models import make
from attnopt import passes
from attnopt.backend import Backend
from attnopt.patterns.match import replacement_graph
from attnopt.policy import Policy


@pytest.fixture
def faulty_rewrite(monkeypatch):
    """Every rewritten site is written as ten times its replacement, while per-site validation checks the
    correct replacement: a fault only the whole-graph check can see."""
    emitter_of = passes._emitter

    def faulty(record):
        def tenfold(graph, m, lookup):
            return graph.call_function(operator.mul, (right(graph, m, lookup), 10.0))

        right = emitter_of(record)
        tenfold.right = right
        return tenfold

    monkeypatch.setattr(passes, "_emitter", faulty)
    monkeypatch.setattr(passes, "replacement_graph", lambda m, emitter: replacement_graph(m, emitter.right))


def _assert_fell_back(report):
    (site,) = report.sites
    assert site.decision == "keep"
    assert site.reason.startswith("whole-graph check: rewritten graph deviates ")
    assert site.reason.endswith("> 1e-04 on the example inputs; graph kept as written")


def test_fallback_through_optimize(faulty_rewrite):
    model, args = make("cumsum_out", True)
    with torch.no_grad():
        optimized = attnopt.optimize(model, "exact", args)
        assert torch.equal(optimized(*args), model(*args))
    _assert_fell_back(optimized.attnopt_report)
    assert optimized.attnopt_report.output_deviation == 0.0


def test_fallback_through_the_backend(faulty_rewrite):
    model, args = make("add_out", True)
    backend = Backend("exact", then="eager")
    with torch.no_grad():
        assert torch.equal(torch.compile(model, backend=backend)(*args), model(*args))
    _assert_fell_back(backend.report)


def test_raise_on_deviation(faulty_rewrite):
    model, args = make("cumsum_out", True)
    with pytest.raises(attnopt.GraphDeviationError, match=r"rewritten graph deviates \S+ > 1e-04") as info:
        attnopt.optimize(model, Policy(on_deviation="raise"), args)
    assert isinstance(info.value, attnopt.AttnoptError)


def test_approximate_rewrites_held_to_max_error(faulty_rewrite):
    model, args = make("add_out", True)
    optimized = attnopt.optimize(model, Policy("linear", max_error=2.0), args)
    (site,) = optimized.attnopt_report.sites
    assert site.decision == "keep"
    assert site.reason.startswith("whole-graph check: rewritten graph deviates ") and "> 2e+00" in site.reason
    with torch.no_grad():
        assert torch.equal(optimized(*args), model(*args))


def test_without_a_fault_the_rewrite_stays():
    model, args = make("cumsum_out", True)
    optimized = attnopt.optimize(model, Policy(on_deviation="raise"), args)
    assert [s.decision for s in optimized.attnopt_report.sites] == ["exact"]


def test_on_deviation_round_trips():
    policy = Policy("exact", on_deviation="raise")
    assert policy.to_dict()["on_deviation"] == "raise"
    assert Policy.from_dict(policy.to_dict()) == policy
    assert Policy.from_yaml(policy.to_yaml()) == policy
    assert "on_deviation" not in Policy().to_dict()  # the default leaves existing dicts and files as they were
    with pytest.raises(ValueError, match=r"Policy.on_deviation must be one of \('fallback', 'raise'\), got 'ignore'"):
        Policy(on_deviation="ignore")


class MaskedMHA(nn.Module):
    """nn.MultiheadAttention given a float attn_mask and a boolean key_padding_mask: torch warns that the mismatch
    is deprecated, and dynamo cannot trace the warning, so the attention runs outside every captured graph."""

    def __init__(self):
        super().__init__()
        self.inp, self.mha, self.out = nn.Linear(8, 8), nn.MultiheadAttention(8, 2, batch_first=True), nn.Linear(8, 8)

    def forward(self, x, attn_mask, key_padding_mask):
        h = self.inp(x)
        return self.out(self.mha(h, h, h, attn_mask=attn_mask, key_padding_mask=key_padding_mask)[0])


def _mha_inputs():
    torch.manual_seed(0)
    padding = torch.zeros(2, 5, dtype=torch.bool)
    padding[:, -1] = True
    return MaskedMHA().eval(), (torch.randn(2, 5, 8), torch.randn(5, 5), padding)


def _assert_not_captured(report, name):
    (entry,) = report.not_captured
    assert entry.name == name and "_warnings.warn" in entry.reason
    assert report.to_dict()["not_captured"][0]["name"] == name
    assert "1 attention call(s) not captured" in str(report)


@pytest.mark.filterwarnings("ignore:Support for mismatched key_padding_mask")
def test_attention_behind_a_graph_break_is_reported_not_captured():
    model, args = _mha_inputs()
    with torch.no_grad():
        optimized = attnopt.optimize(model, "exact", args)
        assert torch.equal(optimized(*args), model(*args))
    assert optimized.attnopt_report.sites == []  # it ran eagerly: no site to rewrite
    _assert_not_captured(optimized.attnopt_report, "mha")  # named by its module path
    torch._dynamo.reset()
    backend = Backend("exact", then="eager")  # no model: named by the attention code the break happened in
    with torch.no_grad():
        torch.compile(model, backend=backend)(*args)
    _assert_not_captured(backend.report, "MultiheadAttention")
