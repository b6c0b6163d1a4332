"""The pass pipeline on small modules: each pass lints, each first-form pattern has a positive and a negative."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import attnopt
from attnopt import passes

from _detect_helpers import capture
from conftest import rel_err


class Manual(nn.Module):
    def __init__(self, form="mul", mask=None, escape=False):
        super().__init__()
        self.form, self.mask, self.escape = form, mask, escape

    def forward(self, q, k, v, m=None):
        if self.form == "mul":
            s = torch.matmul(q, k.transpose(-2, -1)) * (1 / math.sqrt(q.size(-1)))
        elif self.form == "div":
            s = (q @ k.transpose(-1, -2)) / math.sqrt(q.size(-1))
        else:  # scale folded into q, k pre-transposed by permute
            s = torch.matmul(q * 0.25, k.permute(0, 1, 3, 2))
        if self.mask == "additive":
            s = s + m
        elif self.mask == "bool":
            s = s.masked_fill(~m, float("-inf"))
        elif self.mask == "where":
            s = torch.where(m, s, torch.finfo(s.dtype).min)
        p = torch.softmax(s.float(), dim=-1).to(q.dtype)
        out = p @ v
        return (out, p) if self.escape else out


def _inputs(mask=None, sq=7, sk=9):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, s, 16, generator=g) for s in (sq, sk, sk))
    m = None
    if mask == "additive":
        m = torch.randn(2, 1, sq, sk, generator=g)
    elif mask in ("bool", "where"):
        m = torch.rand(2, 1, sq, sk, generator=g) > 0.3
        m[..., 0] = True
    return q, k, v, m


@pytest.mark.parametrize("form", ["mul", "div", "prescaled"])
@pytest.mark.parametrize("mask", [None, "additive", "bool", "where"])
def test_manual_forms_rewritten_exactly(form, mask):
    q, k, v, m = _inputs(mask)
    module = Manual(form, mask)
    want = module(q, k, v, m)
    ctxs, got = capture(module, q, k, v, m)
    sites = [s for c in ctxs for s in c.sites]
    assert [s.decision for s in sites] == ["exact"], [s.reason for s in sites]
    assert rel_err(got, want) < 1e-5
    expected_scale = 0.25
    assert sites[0].scale == pytest.approx(expected_scale)


def test_escaping_probabilities_keep_the_site():
    q, k, v, m = _inputs()
    ctxs, (out, p) = capture(Manual(escape=True), q, k, v)
    (site,) = [s for c in ctxs for s in c.sites]
    assert site.decision == "keep" and "probabilities" in site.reason
    assert not ctxs[0].chosen


class Sdpa(nn.Module):
    def __init__(self, **kw):
        super().__init__()
        self.kw = kw

    def forward(self, q, k, v, m=None):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=m, **self.kw)


@pytest.mark.parametrize("kw,mask", [
    ({}, None), ({"is_causal": True}, None), ({"scale": 0.3}, "additive"), ({}, "bool"),
    ({"enable_gqa": True}, None),
])  # fmt: skip
def test_sdpa_forms(kw, mask):
    q, k, v, m = _inputs(mask)
    if kw.get("enable_gqa"):
        k, v = k[:, :2], v[:, :2]
    module = Sdpa(**kw)
    want = module(q, k, v, m)
    ctxs, got = capture(module, q, k, v, m)
    (site,) = [s for c in ctxs for s in c.sites]
    assert site.decision == "exact"
    assert site.causal == ("top-left" if kw.get("is_causal") else "none")
    if kw.get("enable_gqa"):
        assert site.heads == (4, 2)
    assert rel_err(got, want) < 1e-5


def test_sdpa_dropout_in_training_is_rewritten_with_dropout():
    q, k, v, _ = _inputs()
    ctxs, out = capture(Sdpa(dropout_p=0.5), q, k, v)
    (site,) = ctxs[0].sites
    assert site.decision == "exact" and site.dropout_p == 0.5
    assert "dropout is random" in site.reason
    assert (out == 0).float().mean() < 0.5  # dropout drops probabilities, not outputs


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("need_weights", [True, False])
def test_multihead_attention(batch_first, need_weights):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(32, 4, batch_first=batch_first).eval()
    x = torch.randn(2, 7, 32) if batch_first else torch.randn(7, 2, 32)
    kpm = torch.zeros(2, 7, dtype=torch.bool)
    kpm[1, -2:] = True

    class Wrap(nn.Module):
        def forward(self, x):
            return mha(x, x, x, key_padding_mask=kpm, need_weights=need_weights)[0]

    want = Wrap()(x)
    ctxs, got = capture(Wrap(), x)
    (site,) = [s for c in ctxs for s in c.sites]
    assert site.kind == "mha" and site.decision == "exact", site.reason
    assert rel_err(got, want) < 1e-5


def test_multihead_attention_weights_used_is_kept():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(32, 4, batch_first=True).eval()
    x = torch.randn(2, 7, 32)

    class Wrap(nn.Module):
        def forward(self, x):
            out, w = mha(x, x, x)
            return out + w.sum()

    ctxs, _ = capture(Wrap(), x)
    (site,) = [s for c in ctxs for s in c.sites]
    assert site.decision == "keep" and "weights" in site.reason


def test_rollback_when_the_op_deviates(monkeypatch):
    """A rewritten site whose output deviates beyond tolerance is rolled back, with the reason."""
    import attnopt.variants.exact as exact_variant

    real_emit = exact_variant.emit

    def wrong_emit(graph, m, lookup):
        out = real_emit(graph, m, lookup)
        return graph.call_function(torch.mul, (out, 1.01))  # a 1% error, far beyond fp32 tolerance

    monkeypatch.setattr(exact_variant, "emit", wrong_emit)  # how the exact variant writes a site
    q, k, v, _ = _inputs()
    module = Manual()
    want = module(q, k, v)
    ctxs, got = capture(module, q, k, v)
    (site,) = ctxs[0].sites
    assert site.decision == "keep" and site.reason.startswith("rolled back")
    assert site.deviation == pytest.approx(0.01, rel=1e-2)
    torch.testing.assert_close(got, want)  # the original code runs


def test_no_rollback_for_a_correct_site():
    q, k, v, _ = _inputs()
    ctxs, _ = capture(Manual(), q, k, v)
    (site,) = ctxs[0].sites
    assert site.decision == "exact" and site.deviation < 1e-6


def test_softmax_over_wrong_dim_is_a_miss():
    class WrongDim(nn.Module):
        def forward(self, q, k, v):
            return torch.softmax(q @ k.transpose(-2, -1), dim=-2) @ v

    q, k, v, _ = _inputs(sq=9)
    ctxs, _ = capture(WrongDim(), q, k, v)
    assert not ctxs[0].sites
    (miss,) = ctxs[0].misses
    assert "not over the keys" in miss.reason


def test_keep_policy_and_override_glob():
    q, k, v, _ = _inputs()
    opt = attnopt.optimize(Manual(), attnopt.Policy(default="exact", overrides={"*": "keep"}), (q, k, v))
    (site,) = attnopt.report(opt).sites
    assert site.decision == "keep" and site.reason == "policy: keep"


class _Damped(attnopt.policy.ApproximateVariant):
    """A toy approximate variant: the exact op, scaled by 0.99 (a 1% deviation)."""

    name = "damped"

    def emit(self, graph, m, lookup):
        from attnopt.patterns.match import emit

        return graph.call_function(torch.mul, (emit(graph, m, lookup), 0.99))


@pytest.mark.parametrize("max_error,decision", [(None, "damped"), (0.1, "damped"), (1e-3, "keep")])
def test_approximate_variant_is_measured_and_bounded_by_max_error(max_error, decision):
    q, k, v, _ = _inputs()
    policy = attnopt.Policy(default="exact", overrides={"*": _Damped()}, max_error=max_error)
    opt = attnopt.optimize(Manual(), policy, (q, k, v))
    (site,) = attnopt.report(opt).sites
    assert site.decision == decision
    assert site.deviation == pytest.approx(0.01, rel=1e-2)
    if decision == "keep":
        assert "max_error" in site.reason
        torch.testing.assert_close(opt(q, k, v), Manual()(q, k, v))
    else:
        assert "approximate" in site.reason or max_error is not None
        torch.testing.assert_close(opt(q, k, v), 0.99 * Manual()(q, k, v))


def test_every_graph_of_a_split_model_is_processed():
    """A graph break between two attentions gives two dynamo graphs; both are rewritten."""

    class TwoLayers(nn.Module):
        def forward(self, q, k, v):
            x = F.scaled_dot_product_attention(q, k, v)
            torch._dynamo.graph_break()
            return Manual()(x, k, v)

    q, k, v, _ = _inputs(sq=9)
    module = TwoLayers()
    want = module(q, k, v)
    opt = attnopt.optimize(module, "exact", (q, k, v))
    rep = attnopt.report(opt)
    assert rep.graphs == 2
    assert sorted((s.graph, s.kind, s.decision) for s in rep.sites) == [(0, "sdpa", "exact"), (1, "manual", "exact")]
    assert rel_err(opt(q, k, v), want) < 1e-5
