"""Escape analysis, the misses report and rollback, each with positive and negative tests.

* Escape: when the scores or probabilities feed anything but the ``@ V`` (``output_attentions=True``,
  an attention map kept by the module), the site is kept as it was and the report says why; the same
  model without that consumer is rewritten.
* Misses: every softmax that is not rewritable attention appears in ``report.misses`` with its place
  and the reason; a model made only of attention has none.
* Rollback: a site whose replacement deviates beyond tolerance on the example inputs is rolled back
  (decision "keep", reason "rolled back: ..."), and the model computes what it computed before; a
  correct site is never rolled back.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import attnopt
from attnopt import passes, zoo

from conftest import rel_err

pytestmark = pytest.mark.usefixtures("one_thread")


def _qkv(sq=7, sk=7):
    g = torch.Generator().manual_seed(0)
    return tuple(torch.randn(2, 4, s, 16, generator=g) for s in (sq, sk, sk))


class Attention(nn.Module):
    """Hand-written attention; optionally keeps its attention map (as a visualization hook would)."""

    def __init__(self, keep_map: bool = False):
        super().__init__()
        self.keep_map = keep_map
        self.attn_map = None

    def forward(self, q, k, v):
        p = F.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.size(-1)), dim=-1)
        if self.keep_map:
            self.attn_map = p.detach()
        return p @ v


# ------------------------------------------------------------------------------------------- escape
@pytest.mark.parametrize("output_attentions", [True, False])
def test_output_attentions_keeps_every_site(output_attentions):
    z = zoo.build("bert", "eager")
    kwargs = {**z.kwargs, "output_attentions": output_attentions}
    opt = attnopt.optimize(z.model, "exact", z.args, kwargs)
    rep = attnopt.report(opt)
    assert len(rep.sites) == 2 and not rep.misses
    if output_attentions:
        assert all(s.decision == "keep" and "probabilities" in s.reason and "used by" in s.reason
                   for s in rep.sites), str(rep)  # fmt: skip
        assert rep.output_deviation == 0.0  # the original code runs
    else:
        assert all(s.decision == "exact" for s in rep.sites), str(rep)
    with torch.no_grad():
        got, want = opt(*z.args, **kwargs), z.model(*z.args, **kwargs)
    assert rel_err(got.last_hidden_state, want.last_hidden_state) < 1e-5
    if output_attentions:
        for a, b in zip(got.attentions, want.attentions):
            torch.testing.assert_close(a, b)


@pytest.mark.parametrize("keep_map", [True, False])
def test_a_kept_attention_map_keeps_the_site(keep_map):
    module = Attention(keep_map)
    q, k, v = _qkv()
    opt = attnopt.optimize(module, "exact", (q, k, v))
    (site,) = attnopt.report(opt).sites
    if keep_map:
        assert site.decision == "keep" and "probabilities" in site.reason, site.reason
        assert module.attn_map is not None and module.attn_map.shape == (2, 4, 7, 7)
    else:
        assert site.decision == "exact"
    assert rel_err(opt(q, k, v), Attention()(q, k, v)) < 1e-5


@pytest.mark.parametrize("change", ["masked_fill_", "mul_"])
def test_an_in_place_mutation_of_the_scores_is_read_or_keeps_the_site(change):
    """The statement form (``s`` read after the mutation): a masked_fill_ with -inf is a mask and the site is
    rewritten; a scaling by a tensor that varies along the keys is neither a bias nor a mask: kept, saying so."""

    class InPlace(nn.Module):
        def forward(self, q, k, v, mask):
            s = q @ k.transpose(-2, -1)
            if change == "masked_fill_":
                s.masked_fill_(~mask, float("-inf"))
            else:
                s.mul_(mask.float() + 0.5)
            return s.softmax(-1) @ v

    q, k, v = _qkv()
    mask = torch.ones(2, 1, 7, 7, dtype=torch.bool).tril()
    opt = attnopt.optimize(InPlace(), "exact", (q, k, v, mask))
    (site,) = attnopt.report(opt).sites
    if change == "masked_fill_":
        assert site.decision == "exact", site.reason
    else:
        assert site.decision == "keep" and "mul_" in site.reason and "neither" in site.reason, site.reason
    assert rel_err(opt(q, k, v, mask), InPlace()(q, k, v, mask)) < 1e-6


# ------------------------------------------------------------------------------------------- misses
class NotAttention(nn.Module):
    """Softmaxes that are not attention: a mixture-of-experts router, a classifier head, a softmax
    over the queries, and probabilities reweighted by a tensor before the ``@ V``."""

    def __init__(self):
        super().__init__()
        self.router = nn.Linear(16, 4)

    def forward(self, x, q, k, v):
        weights, experts = torch.topk(F.softmax(self.router(x), dim=-1), 2)
        labels = F.softmax(x.mean(1), dim=-1)
        over_queries = torch.softmax(q @ k.transpose(-2, -1), dim=-2) @ v
        head_mask = torch.linspace(0.5, 1.0, 4)[None, :, None, None]
        reweighted = (torch.softmax(q @ k.transpose(-2, -1), dim=-1) * head_mask) @ v
        return weights, experts, labels, over_queries, reweighted


def test_every_softmax_that_is_not_attention_is_a_miss_with_its_reason():
    q, k, v = _qkv()
    x = torch.randn(2, 5, 16)
    opt = attnopt.optimize(NotAttention(), "exact", (x, q, k, v))
    rep = attnopt.report(opt)
    assert not rep.sites
    assert len(rep.misses) == 4, str(rep)
    reasons = " | ".join(m.reason for m in rep.misses)
    assert "topk" in reasons  # the router's probabilities feed topk, not a product with V
    assert "not over the keys" in reasons  # softmax over dim -2
    assert reasons.count("not multiplied by V") >= 2
    for m in rep.misses:
        assert m.node and m.reason and m.graph == 0
    text = str(rep)
    assert "softmax(es) not rewritten" in text and "topk" in text


def test_a_model_made_of_attention_has_no_misses():
    z = zoo.build("llama", "eager")
    rep = attnopt.inspect(z.model, z.args, z.kwargs)
    assert not rep.misses and len(rep.sites) == 2


def test_a_matcher_failure_is_reported_not_raised(monkeypatch):
    """A bug in a matcher must not take the model down: the softmax is reported with the error."""
    from attnopt import patterns
    from attnopt.patterns.canonical import SOFTMAX

    def broken(node, dag):
        raise RuntimeError("boom")

    monkeypatch.setitem(patterns.MATCHERS, SOFTMAX, broken)
    q, k, v = _qkv()
    opt = attnopt.optimize(Attention(), "exact", (q, k, v))
    (miss,) = attnopt.report(opt).misses
    assert "RuntimeError: boom" in miss.reason and "please report it" in miss.reason
    assert rel_err(opt(q, k, v), Attention()(q, k, v)) == 0.0


# ----------------------------------------------------------------------------------------- rollback
def test_a_deviating_kernel_is_rolled_back(monkeypatch):
    from attnopt.kernels.exact import cpu

    real = cpu.forward

    def off_by_one_percent(*args, **kwargs):
        out, lse = real(*args, **kwargs)
        return out * 1.01, lse

    monkeypatch.setattr(cpu, "forward", off_by_one_percent)  # the CPU implementation the exact op runs
    z = zoo.build("gpt2", "eager")
    opt = attnopt.optimize(z.model, "exact", z.args, z.kwargs)
    rep = attnopt.report(opt)
    assert len(rep.sites) == 2
    for s in rep.sites:
        assert s.decision == "keep" and s.reason.startswith("rolled back: deviation"), s.reason
        assert s.deviation == pytest.approx(0.01, rel=0.05)
    assert rep.output_deviation < 1e-6  # the original attention runs
    profile = [n for c in opt._attnopt_backend.contexts for n in c.log if n[0] == "validate"]
    assert profile and profile[0][1]  # the validate pass changed the graph (rolled back)


def test_a_zero_tolerance_rolls_back_and_says_so(monkeypatch):
    monkeypatch.setitem(passes.TOLERANCE, torch.float32, 0.0)
    q, k, v = _qkv()
    opt = attnopt.optimize(Attention(), "exact", (q, k, v))
    (site,) = attnopt.report(opt).sites
    if site.deviation == 0.0:  # pragma: no cover - bit-identical on this platform: nothing to roll back
        assert site.decision == "exact"
    else:
        assert site.decision == "keep" and "exceeds the torch.float32 tolerance" in site.reason


@pytest.mark.parametrize("name", ["gpt2", "bloom", "gemma2"])
def test_correct_sites_are_not_rolled_back(name):
    z = zoo.build(name, "eager")
    opt = attnopt.optimize(z.model, "exact", z.args, z.kwargs)
    rep = attnopt.report(opt)
    assert rep.sites and all(s.decision == "exact" and "rolled back" not in s.reason for s in rep.sites)
    assert all(s.deviation is not None and s.deviation < 1e-5 for s in rep.sites)


def test_a_rolled_back_site_keeps_its_in_place_writes(monkeypatch):
    """The writes a site reads into its bias and mask go only with its rewrite: rolled back, they all run."""

    class Updated(nn.Module):
        def forward(self, q, k, v, rel):
            s = q @ k.transpose(-2, -1)
            s[..., 1:, 1:] += rel
            s[..., :2] = float("-inf")
            return s.softmax(-1) @ v

    q, k, v = _qkv()
    rel = torch.randn(4, 6, 6)
    monkeypatch.setitem(passes.TOLERANCE, torch.float32, -1.0)  # every site deviates: all are rolled back
    opt = attnopt.optimize(Updated(), "exact", (q, k, v, rel))
    (site,) = attnopt.report(opt).sites
    assert site.decision == "keep" and site.reason.startswith("rolled back"), site.reason
    assert torch.equal(opt(q, k, v, rel), Updated()(q, k, v, rel))
