"""The sigmoid variant: ``σ(scale·QKᵀ + bias + mask) V``, one ``torch.ops.attnopt.sigmoid_attention`` call on
the site's canonical operands, its masks and causal flag included (changes the function)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

import attnopt.kernels.sigmoid  # noqa: F401  (registers torch.ops.attnopt.sigmoid_attention)
from attnopt import cost
from attnopt.patterns.match import emit_operands, emit_output
from attnopt.variants.linear import is_number, parse_options, softcapped
from attnopt.variants.registry import ApproximateVariant, MethodHandler, register_variant


def check_sigmoid(v) -> dict:
    if v.bias is not None and not (is_number(v.bias) and math.isfinite(v.bias)):
        raise ValueError(f"Sigmoid.bias must be None (-log Sk) or a finite number; got {v.bias!r}")
    return {"bias": None if v.bias is None else float(v.bias)}


def sigmoid_unsupported(v, m) -> str | None:
    if m.custom_emit is not None:
        return f"sigmoid attention needs the site's q, k and v; this {m.kind} site is rewritten as a whole"
    if softcapped(m):
        return "the site soft-caps its scores (Gemma 2 style); the sigmoid kernels do not"
    return None


def emit_sigmoid(v, graph, m, lookup):
    c = emit_operands(graph, m, lookup)
    out = graph.call_function(torch.ops.attnopt.sigmoid_attention.default,
                              (c.q, c.k, c.v, c.mask, c.causal, c.scale, v.bias))  # fmt: skip
    return emit_output(graph, m, out)


@dataclass(frozen=True)
class Sigmoid(ApproximateVariant):
    """Sigmoid attention ``σ(scale·QKᵀ + bias + mask) V`` (changes the function; fused kernels, causal and masked).

    ``bias`` None means ``-log(Sk)`` per call. Attention dropout is not applied.
    """

    bias: float | None = None
    name = "sigmoid"

    def __post_init__(self):
        for key, value in check_sigmoid(self).items():
            object.__setattr__(self, key, value)

    @classmethod
    def from_string(cls, text: str) -> "Sigmoid":
        """``sigmoid``, ``sigmoid:<bias>`` or ``sigmoid:bias=<bias>``."""
        return cls(**parse_options(text, cls))

    def unsupported(self, match) -> str | None:
        return sigmoid_unsupported(self, match)

    def describe(self, match=None) -> str:
        bias = "-log(Sk)" if self.bias is None else f"{self.bias:g}"
        return f"sigmoid attention, bias {bias} (changes the function)"

    def emit(self, graph, match, lookup):
        return emit_sigmoid(self, graph, match, lookup)


class SigmoidHandler(MethodHandler):
    def cost(self, variant, shape):
        return cost.sigmoid(shape.causal, shape.masked)


register_variant(Sigmoid, SigmoidHandler())
