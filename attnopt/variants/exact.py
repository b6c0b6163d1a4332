"""The exact variant (attnopt's fused kernel, the same function) and keep (the site as written)."""

from __future__ import annotations

from dataclasses import dataclass

from attnopt import cost
from attnopt.patterns.match import emit
from attnopt.variants.registry import MethodHandler, register_variant


@dataclass(frozen=True)
class Exact:
    """Same function, through attnopt's fused kernel."""

    name = "exact"


@dataclass(frozen=True)
class Keep:
    """Leave the site as the model wrote it."""

    name = "keep"


class ExactHandler(MethodHandler):
    def describe(self, variant, match=None):
        return "fused attnopt kernel, same function"

    def emit(self, variant, graph, match, lookup):
        return emit(graph, match, lookup)

    def exact(self, variant):
        return True

    def cost(self, variant, shape):
        return cost.exact(shape.causal, shape.masked)


class KeepHandler(MethodHandler):
    def describe(self, variant, match=None):
        return "policy: keep"

    def exact(self, variant):
        return True

    def cost(self, variant, shape):
        return cost.original(shape)


register_variant(Exact, ExactHandler())
register_variant(Keep, KeepHandler())
