"""Longformer/BigBird style global tokens plus a local sliding window (docs/architecture.md, Masks)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from attnopt.masks.base import Mask, check_int, register_type
from attnopt.masks.sliding_window import SlidingWindow, as_window
from attnopt.masks.status import with_globals


@register_type
@dataclass(frozen=True)
class GlobalLocal(Mask):
    """Longformer/BigBird style: the first ``global_tokens`` tokens see and are seen by all; others use ``window``.

    ``window`` is a :class:`SlidingWindow`, or an int r meaning ``SlidingWindow(r, r)``.
    """

    global_tokens: int = 1
    window: SlidingWindow | int = 0

    def __post_init__(self):
        check_int("GlobalLocal", "global_tokens", self.global_tokens, 0)
        object.__setattr__(self, "window", as_window("GlobalLocal", self.window))

    def predicate(self, q, k, h, sq, sk, ops):
        g = self.global_tokens
        local = self.window.predicate(q, k, h, sq, sk, ops)
        return (q < g) | (k < g) | local if g else local

    def tile_status(self, qs, qe, ks, ke, sq, sk, heads):
        return with_globals(self.global_tokens, qs, qe, ks, ke,
                             lambda a, b, c, d: self.window.tile_status(a, b, c, d, sq, sk, heads))  # fmt: skip

    def key_span(self, qs, qe, sq, sk):
        lo, hi = self.window.key_span(qs, qe, sq, sk)
        rows = qs < self.global_tokens
        return torch.where(rows, 0, lo), torch.where(rows, sk, hi)

    def global_keys(self, sk):
        return min(self.global_tokens, sk)

    def tile_count(self, block_m, block_n):
        import sympy as sp

        return self.window.tile_count(block_m, block_n) + sp.ceiling(sp.Integer(self.global_tokens) / block_n)

    def __str__(self):
        return f"GlobalLocal({self.global_tokens}, {self.window})"
