"""Head-sharded strided attention (S2-attention style) (docs/architecture.md, Masks)."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from attnopt.masks.base import Mask, check_int, register_type
from attnopt.masks.sliding_window import SlidingWindow, as_window
from attnopt.masks.status import EMPTY, FULL, PARTIAL, STATUS_DTYPE


@register_type
@dataclass(frozen=True)
class Strided(Mask):
    """Head-sharded strided attention (S2-attention style): head h sees keys ``j ≡ h (mod stride)``, plus ``window``.

    The union over ``stride`` consecutive heads covers the whole context; ``window`` (a
    :class:`SlidingWindow`, or an int r for ``SlidingWindow(r, r)``) keeps every query's local
    neighbourhood. Combine with :func:`causal` (``Strided(8, SlidingWindow(63, 0)) & causal()``) for decoders.

    The sparse ops run it on keys sorted by residue (:class:`ResidueOrder`): head h's strided keys are
    then one contiguous range of full key tiles, and a query tile's window a short piece of each other
    residue class, so a head visits about ``Sk / (stride · block_n) + 2 · stride`` key tiles, not ``Sk / block_n``.
    """

    stride: int = 8
    window: SlidingWindow | int = 0

    def __post_init__(self):
        check_int("Strided", "stride", self.stride, 1)
        object.__setattr__(self, "window", as_window("Strided", self.window))

    @property
    def head_dependent(self) -> bool:
        return self.stride > 1

    def predicate(self, q, k, h, sq, sk, ops):
        local = self.window.predicate(q, k, h, sq, sk, ops)
        if self.stride == 1:
            return ops.true_like(q, k)
        return (k % self.stride == h % self.stride) | local

    def _heads(self, heads, like):
        return torch.arange(heads).reshape(heads, *([1] * like.dim()))  # [heads, 1, ...]

    def tile_status(self, qs, qe, ks, ke, sq, sk, heads):
        local = self.window.tile_status(qs, qe, ks, ke, sq, sk, heads)
        if self.stride == 1:
            return torch.full_like(local, FULL)
        r = self.stride
        h = self._heads(heads, ks)
        # The first key >= ks in head h's residue class is ks + (h - ks) mod r.
        has_key = ks + torch.remainder(h - ks, r) < ke
        strided = torch.where(has_key, PARTIAL, EMPTY).to(STATUS_DTYPE)
        return torch.maximum(strided, local)

    def residue_status(self, qs, qe, ks, ke, stride, residue, sq, sk, heads):
        if self.stride == 1 or stride % self.stride != 0:
            return self.tile_status(qs, qe, ks, ke, sq, sk, heads)
        # Every key of the subset is ≡ residue (mod self.stride): all of them strided keys of head h, or none.
        h = self._heads(heads, ks)
        own = torch.where(torch.remainder(residue, self.stride) == h % self.stride, FULL, EMPTY).to(STATUS_DTYPE)
        return torch.maximum(own, self.window.residue_status(qs, qe, ks, ke, stride, residue, sq, sk, heads))

    def tile_count(self, block_m, block_n):
        """Key tiles that query tile ``t`` of head ``h`` visits as the sparse ops run the mask (keys in
        :class:`ResidueOrder`; symbols t, h, Sq, Sk): the tiles of head h's residue segment and, in every
        other residue segment, of the keys of the tile's window. Exact when ``Sk >= stride · block_n`` (a key tile
        then meets at most two residue segments), an upper bound below that; None for a dilated window."""
        import sympy as sp

        t, h, sq, sk = sp.symbols("t h Sq Sk", integer=True, nonnegative=True)
        r = self.stride
        if r == 1:
            return sp.ceiling(sk / block_n)
        if self.window.dilation != 1:
            return None
        n = sp.floor(sk / r)
        m = sk - r * n

        def start(rho):  # first position of residue class rho: classes below m hold n + 1 keys, the others n
            return rho * n + sp.Min(rho, m)

        left, right = self.window.reach
        lo = 0 if left is None else sp.Max(0, t * block_m + sk - sq - left)  # the tile's window: keys [lo, hi)
        hi = sk if right is None else sp.Min(sk, sp.Min(t * block_m + block_m, sq) + sk - sq + right)
        pieces = []  # per residue class: (1 if it has visited keys else 0, first tile, last tile)
        for rho in range(r):
            own = sp.KroneckerDelta(sp.Mod(h, r), rho)  # head h's class: all of it, else the window's keys
            first = start(rho) + (1 - own) * sp.ceiling((lo - rho) / r)
            keys = own * (start(rho + 1) - start(rho)) + (1 - own) * (sp.ceiling((hi - rho) / r) - first + start(rho))
            # 1 when the class has visited keys (unevaluated: evaluating Min/Max here searches for zeros, slowly)
            some = sp.Min(sp.Max(keys, 0, evaluate=False), 1, evaluate=False)
            pieces.append((some, sp.floor(first / block_n), sp.floor((first + keys - 1) / block_n)))
        count = sum(some * (last - first + 1) for some, first, last in pieces)
        # Consecutive pieces are ordered and disjoint: they share at most one tile, the last of one and first of the next.
        shared = sum(a[0] * b[0] * sp.KroneckerDelta(a[2], b[1]) for a, b in itertools.pairwise(pieces))
        return count - shared

    def __str__(self):
        return f"Strided({self.stride}, {self.window})"
