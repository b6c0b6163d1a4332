"""Block-diagonal attention on a token grid: tokens see the tokens of their own block (docs/architecture.md, Masks)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from attnopt.masks.base import check_int, register_type
from attnopt.masks.grid import Grid, compact, per_axis


@register_type
@dataclass(frozen=True)
class Blocked(Grid):
    """Query and key see each other when they fall in the same block of ``block`` tokens, per grid axis."""

    block: int | tuple = 64
    grid: tuple | None = None
    global_tokens: int = 0
    tile: tuple | None = None
    order: str = "row-major"

    _axis_fields = ("block",)

    def __post_init__(self):
        self._check_grid("Blocked")
        vals = per_axis("Blocked", "block", self.block, self.ndim)
        for v in vals:
            check_int("Blocked", "block", v, 1)
        object.__setattr__(self, "block", vals)

    def _axis_pred(self, qc, kc, n, axis, ops):
        b = self.block[axis]
        return qc // b == kc // b

    def _axis_window(self, axis, n):
        b = self.block[axis]
        first = torch.arange(n) // b * b
        return first, torch.clamp(first + b - 1, max=n - 1)

    def tile_count(self, block_m, block_n):
        if self.ndim != 1 or self.global_tokens:
            return None
        import sympy as sp

        t, sk = sp.symbols("t Sk", integer=True, nonnegative=True)
        b = self.block[0]
        lo = sp.floor(t * block_m / b) * b
        hi = sp.Min(sk, sp.ceiling(sp.Min(t * block_m + block_m, sk) / b) * b)
        return sp.ceiling(hi / block_n) - sp.floor(lo / block_n)

    def __str__(self):
        grid = f", grid={'x'.join(map(str, self.grid))}" if self.grid is not None else ""
        g = f", global_tokens={self.global_tokens}" if self.global_tokens else ""
        return f"Blocked({compact(self.block)}{grid}{g})"
