"""A variant defined here, outside attnopt, through the public registry, runs end to end: policy forms,
optimize, validation, the report and the cost model."""

import math
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import attnopt
from attnopt import cost
from attnopt.patterns.match import emit
from attnopt.policy import Exact, Policy, variant_from_dict, variant_to_dict
from attnopt.variants.registry import (VariantHandler, handler_for, register_variant, unregister_variant,
                                       variant_names)  # fmt: skip


@dataclass(frozen=True)
class Damped:
    """The toy variant: exact attention scaled by ``factor`` (a deviation of ``1 - factor``)."""

    factor: float = 0.99
    name = "damped"

    def __post_init__(self):
        if not 0.0 < self.factor <= 1.0:
            raise ValueError(f"Damped.factor must be in (0, 1], got {self.factor!r}")

    @classmethod
    def from_string(cls, text: str) -> "Damped":
        _, _, factor = text.partition(":")
        return cls(float(factor)) if factor else cls()


class DampedHandler(VariantHandler):
    def unsupported(self, variant, match):
        return "the site is causal" if match.causal else None

    def describe(self, variant, match=None):
        return f"damped by {variant.factor:g} (changes the function)"

    def emit(self, variant, graph, match, lookup):
        return graph.call_function(torch.mul, (emit(graph, match, lookup), variant.factor))

    def cost(self, variant, shape):  # priced as a causal site: half the tiles, so auto finds it worth trying
        return cost.exact(True, shape.masked)


@pytest.fixture
def damped():
    register_variant(Damped, DampedHandler(), heads=("damp",))
    yield Damped
    unregister_variant(Damped)


class Attention(nn.Module):
    def __init__(self, causal: bool = False):
        super().__init__()
        self.causal = causal

    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)


def _qkv():
    g = torch.Generator().manual_seed(0)
    return tuple(torch.randn(1, 2, 8, 16, generator=g) for _ in range(3))


def test_optimize_rewrites_the_site_with_the_registered_variant(damped):
    qkv = _qkv()
    optimized = attnopt.optimize(Attention(), Policy(default=Damped(0.9), max_error=0.5), qkv)
    (site,) = attnopt.report(optimized).sites
    assert (site.decision, site.reason) == ("damped", "damped by 0.9 (changes the function)")
    assert site.deviation == pytest.approx(0.1, rel=1e-3)  # validated: measured against the original
    torch.testing.assert_close(optimized(*qkv), 0.9 * Attention()(*qkv))
    assert "damped" in attnopt.report(optimized).render(width=200)


def test_validation_rolls_the_variant_back_beyond_max_error(damped):
    qkv = _qkv()
    optimized = attnopt.optimize(Attention(), Policy(default=Damped(0.9), max_error=1e-3), qkv)
    (site,) = attnopt.report(optimized).sites
    assert site.decision == "keep" and "max_error" in site.reason
    torch.testing.assert_close(optimized(*qkv), Attention()(*qkv))


def test_the_handler_refuses_a_site_by_name(damped):
    optimized = attnopt.optimize(Attention(causal=True), Policy(default=Damped(), max_error=0.5), _qkv())
    (site,) = attnopt.report(optimized).sites
    assert (site.decision, site.reason) == ("keep", "damped not applicable: the site is causal")


def test_string_and_dict_forms_round_trip(damped):
    assert "damped" in variant_names() and handler_for(Damped()).__class__ is DampedHandler
    assert Policy.from_string("damp:0.5").default == Damped(0.5)
    assert Policy.from_string("damped").default == Damped()
    policy = Policy(default=Exact(), overrides={"layers.*": Damped(0.5)}, max_error=0.1)
    assert variant_to_dict(Damped(0.5)) == {"variant": "damped", "factor": 0.5}
    assert Policy.from_dict(policy.to_dict()) == policy
    with pytest.raises(ValueError, match="factor must be in"):
        variant_from_dict({"variant": "damped", "factor": 2.0})


def test_cost_and_predicted_speedup_come_from_the_handler(damped):
    optimized = attnopt.optimize(Attention(), Policy(default=Damped(), max_error=0.5, seq_len=4096), _qkv())
    (site,) = attnopt.report(optimized).sites
    shape = cost.Shape.from_site(site, 4096)  # long enough to be compute-bound (at 8 tokens launches dominate)
    assert cost.variant_cost(Damped(), shape) == cost.exact(True, shape.masked)
    want = cost.seconds(cost.original(shape), shape) / cost.seconds(cost.exact(True, shape.masked), shape)
    assert site.predicted_speedup == pytest.approx(want)
    assert math.isfinite(want) and want > cost.predict_speedup(site, Exact(), 4096)


def test_auto_calibrates_with_the_registered_variant_as_a_candidate(damped):
    qkv = _qkv()
    optimized = attnopt.optimize(Attention(), Policy.auto(max_error=0.1, seq_len=4096, candidates=[Damped(0.95)], rank_by="predicted"), qkv)
    (site,) = attnopt.report(optimized).sites
    assert site.decision == "damped" and site.deviation == pytest.approx(0.05, rel=1e-3)
    torch.testing.assert_close(optimized(*qkv), 0.95 * Attention()(*qkv))


class OfferingHandler(DampedHandler):
    """The toy handler also offers candidates, behind an Auto flag the test sets (an option like allow_linear)."""

    def candidates(self, config, site, match):
        return [config(0.5), config(0.95)]  # equal cost: tried in this order

    def auto_option(self, config):
        return "try_damped"


@pytest.fixture
def offering():
    register_variant(Damped, OfferingHandler())
    yield Damped
    unregister_variant(Damped)


def test_auto_asks_every_registered_handler_for_candidates(monkeypatch, offering):
    """No explicit candidates: auto asks the registry; the toy offers two, the one within budget is chosen."""
    from attnopt.policy import Auto

    monkeypatch.setattr(Auto, "try_damped", True, raising=False)
    qkv = _qkv()
    optimized = attnopt.optimize(Attention(), Policy.auto(max_error=0.1, seq_len=4096, rank_by="predicted"), qkv)
    (site,) = attnopt.report(optimized).sites
    assert site.decision == "damped" and site.variant == Damped(0.95)
    assert {t.variant: t.verdict for t in site.tried}["Damped(factor=0.5)"] == "over budget"
    monkeypatch.setattr(Auto, "try_damped", False)  # the flag off: the toy's candidates are not tried
    optimized = attnopt.optimize(Attention(), Policy.auto(max_error=0.1, seq_len=4096, rank_by="predicted"), qkv)
    assert attnopt.report(optimized).sites[0].variant != Damped(0.95)


def test_the_site_keeps_its_variant_object(damped):
    optimized = attnopt.optimize(Attention(), Policy(default=Damped(0.9), max_error=0.5), _qkv())
    (site,) = attnopt.report(optimized).sites
    assert site.variant == Damped(0.9) and "variant" not in site.to_dict()
    kept = attnopt.optimize(Attention(causal=True), Policy(default=Damped(), max_error=0.5), _qkv())
    assert attnopt.report(kept).sites[0].variant == attnopt.Keep()


def test_unregistered_the_name_is_unknown_again(damped):
    unregister_variant(Damped)
    with pytest.raises(ValueError, match="unknown policy 'damped'"):
        Policy.from_string("damped")
    with pytest.raises(ValueError, match="unknown variant 'damped'"):
        variant_from_dict({"variant": "damped"})


def test_registration_is_checked():
    @dataclass
    class Mutable:
        name = "mutable"

    @dataclass(frozen=True)
    class SecondExact:
        name = "exact"

    with pytest.raises(TypeError, match="frozen dataclass"):
        register_variant(Mutable)
    with pytest.raises(ValueError, match="already registered"):
        register_variant(SecondExact)
    with pytest.raises(TypeError, match="VariantHandler instance"):
        register_variant(Damped, object())
