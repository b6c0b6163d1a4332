"""Neighborhood attention (NATTEN semantics) on a 1-D, 2-D or 3-D token grid (docs/architecture.md, Masks)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from attnopt.masks.base import check_int, register_type
from attnopt.masks.grid import Grid, compact, per_axis, per_axis_bool


@register_type
@dataclass(frozen=True)
class Neighborhood(Grid):
    """Neighborhood attention (NATTEN semantics) on a 1-D, 2-D or 3-D token grid, per axis:

    * dilation d: positions split into d groups ``c mod d``; a query sees keys of its own group only,
      and the window below lives in group coordinates ``c // d`` on a group of ``L = ceil((n - c mod d) / d)``.
    * stride s (GNA): queries in groups of s share the window of their leader: the centre
      ``(c // s)·s + s // 2`` (clamped to ``L - 1``), or the last ``(c // s)·s + s - 1`` when causal.
    * non-causal: the ``kernel_size`` positions starting at ``clamp(leader - kernel_size // 2, 0, L - kernel_size)``:
      the window is shifted, not clipped, at the borders, so every query sees exactly kernel_size.
    * causal: keys ``<= c`` that are ``> leader - kernel_size`` (the kernel_size positions ending at the leader).

    A key is visible when it is visible on every axis. ``grid`` (row-major, after ``global_tokens``
    leading tokens such as CLS or registers, which see and are seen by all) defaults to 1-D.
    """

    kernel_size: int | tuple = 7
    dilation: int | tuple = 1
    stride: int | tuple = 1
    causal: bool | tuple = False
    grid: tuple | None = None
    global_tokens: int = 0
    tile: tuple | None = None
    order: str = "row-major"

    _axis_fields = ("kernel_size", "dilation", "stride", "causal")

    def __post_init__(self):
        name = "Neighborhood"
        self._check_grid(name)
        nd = self.ndim
        for field in ("kernel_size", "dilation", "stride"):
            vals = per_axis(name, field, getattr(self, field), nd)
            for v in vals:
                check_int(name, field, v, 1)
            object.__setattr__(self, field, vals)
        object.__setattr__(self, "causal", per_axis_bool(name, "causal", self.causal, nd))
        for a in range(nd):
            if self.stride[a] > self.kernel_size[a]:
                raise ValueError(f"Neighborhood.stride must not exceed kernel_size; got stride {self.stride[a]} "
                                 f"> kernel_size {self.kernel_size[a]} on axis {a}")  # fmt: skip
        if self.grid is not None:
            for a, n in enumerate(self.grid):
                self._check_axis(n, a)

    def _check_axis(self, n, axis):
        ks, d = self.kernel_size[axis], self.dilation[axis]
        if ks * d > n:
            raise ValueError(f"Neighborhood: kernel_size x dilation = {ks} x {d} exceeds the grid's axis {axis} "
                             f"of {n} tokens")  # fmt: skip

    def _contiguous(self, axis):
        return self.dilation[axis] == 1

    def _axis_pred(self, qc, kc, n, axis, ops):
        ks, d, s = self.kernel_size[axis], self.dilation[axis], self.stride[axis]
        if d > 1:
            gq, qg, kg = qc % d, qc // d, kc // d
            length = (n - gq + (d - 1)) // d
        else:
            qg, kg, length = qc, kc, n
        if self.causal[axis]:
            leader = ops.minimum((qg // s) * s + (s - 1), length - 1) if s > 1 else qg
            ok = (kg <= qg) & (kg + ks > leader)
        else:
            leader = ops.minimum((qg // s) * s + s // 2, length - 1) if s > 1 else qg
            start = ops.minimum(ops.maximum(leader - ks // 2, 0), length - ks)
            ok = (kg >= start) & (kg < start + ks)
        if d > 1:
            ok = ok & (kc % d == gq)
        return ok

    def _axis_window(self, axis, n):
        ks, d, s = self.kernel_size[axis], self.dilation[axis], self.stride[axis]
        c = torch.arange(n)
        gq, cg = c % d, c // d
        length = (n - gq + d - 1) // d
        if self.causal[axis]:
            leader = torch.minimum((cg // s) * s + s - 1, length - 1)
            lo, hi = torch.clamp(leader - ks + 1, min=0), cg
        else:
            leader = torch.minimum((cg // s) * s + s // 2, length - 1)
            lo = torch.minimum(torch.clamp(leader - ks // 2, min=0), length - ks)
            hi = lo + ks - 1
        return gq + d * lo, gq + d * hi

    def tile_count(self, block_m, block_n):
        if self.ndim != 1 or self.global_tokens or self.dilation[0] != 1 or self.stride[0] != 1:
            return None
        import sympy as sp

        t, sk = sp.symbols("t Sk", integer=True, nonnegative=True)
        ks = self.kernel_size[0]
        first_q, last_q = t * block_m, sp.Min(t * block_m + block_m, sk) - 1
        if self.causal[0]:
            lo, hi = sp.Max(first_q - ks + 1, 0), last_q + 1
        else:
            lo = sp.Min(sp.Max(first_q - ks // 2, 0), sk - ks)
            hi = sp.Min(sp.Max(last_q - ks // 2, 0), sk - ks) + ks
        return sp.ceiling(hi / block_n) - sp.floor(lo / block_n)

    def __str__(self):
        parts = [f"kernel_size={compact(self.kernel_size)}"]
        for field, default in (("dilation", 1), ("stride", 1)):
            if any(v != default for v in getattr(self, field)):
                parts.append(f"{field}={compact(getattr(self, field))}")
        if any(self.causal):
            parts.append(f"causal={compact(self.causal)}")
        if self.grid is not None:
            parts.append(f"grid={'x'.join(map(str, self.grid))}")
        if self.global_tokens:
            parts.append(f"global_tokens={self.global_tokens}")
        if self.tile is not None:
            parts.append(f"tile={'x'.join(map(str, self.tile))}" + (", tiled order" if self.order == "tiled" else ""))
        return f"Neighborhood({', '.join(parts)})"
