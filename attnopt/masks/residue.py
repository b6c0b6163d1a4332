"""Masks on keys sorted by residue (how the sparse ops run :class:`~attnopt.masks.strided.Strided` masks), and
the key order registered with :func:`attnopt.masks.base.register_key_order` (docs/architecture.md, Masks)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from attnopt.masks.base import Mask, check_int, register_key_order, register_type
from attnopt.masks.status import EMPTY, FULL, status_of
from attnopt.masks.strided import Strided


@register_type
@dataclass(frozen=True)
class ResidueOrder(Mask):
    """``mask`` on keys sorted by ``(j mod stride, j // stride)``; queries keep their order.

    Key position p holds the original key :meth:`original` (p): residue class rho (``ceil((Sk - rho) / stride)``
    keys) starts at ``rho·n + min(rho, m)``, ``n = Sk // stride``, ``m = Sk mod stride``. This is how the sparse
    ops run a mask with :class:`Strided` parts (:func:`residue_order`): each head's strided keys are one
    contiguous run of key tiles. The block map comes from the descriptor: a key tile is at most a few
    pieces of residue classes, each asked of ``mask`` by :meth:`Mask.residue_status` (interval arithmetic).
    """

    mask: Mask
    stride: int

    shift_invariant = False

    def __post_init__(self):
        if not isinstance(self.mask, Mask):
            raise TypeError(f"ResidueOrder.mask must be a mask descriptor; got {self.mask!r}")
        check_int("ResidueOrder", "stride", self.stride, 1)

    @property
    def traceable(self) -> bool:
        return self.mask.traceable

    @property
    def head_dependent(self) -> bool:
        return self.mask.head_dependent

    def heads_of(self, heads):
        return self.mask.heads_of(heads)

    def batch_dependent(self, batch):
        return self.mask.batch_dependent(batch)

    def at_batch(self, b):
        return ResidueOrder(self.mask.at_batch(b), self.stride)

    def check(self, sq, sk, heads):
        self.mask.check(sq, sk, heads)

    def permutation(self, sk: int) -> torch.Tensor:
        """int64 [Sk]: ``perm[p]`` is the original position of key position p."""
        return torch.argsort(torch.arange(sk) % self.stride, stable=True)

    def original(self, p, sk, ops):
        """The original position of key position ``p`` (tensors or kernel expressions; ``p >= 0``); in a kernel
        the residue class and the position are computed once, as ``key_class`` and ``key_orig``."""
        r = self.stride
        n, m = sk // r, sk % r
        big = m * (n + 1)  # positions of the m classes of n + 1 keys
        rho = ops.bind("key_class", ops.minimum(p, big) // (n + 1) + ops.maximum(p - big, 0) // ops.maximum(n, 1))
        return ops.bind("key_orig", (p - (rho * n + ops.minimum(rho, m))) * r + rho)

    def predicate(self, q, k, h, sq, sk, ops):
        return self.mask.predicate(q, self.original(k, sk, ops), h, sq, sk, ops)

    def tile_status(self, qs, qe, ks, ke, sq, sk, heads):
        r = self.stride
        n, m = sk // r, sk % r
        big = m * (n + 1)

        def residue(p):
            return torch.where(p < big, p // (n + 1), m + (p - big) // max(n, 1))

        def start(rho):
            return rho * n + torch.clamp(rho, max=m)

        first, last = residue(ks), residue(ke - 1)
        lowest = highest = None
        for step in range(int((last - first).max()) + 1 if last.numel() else 0):
            # The tile's keys of class rho (past the last class: the last one again, which changes nothing).
            rho = torch.minimum(first + step, last)
            s0, s1 = start(rho), start(rho + 1)
            a0, a1 = torch.maximum(ks, s0) - s0, torch.minimum(ke, s1) - s0  # indices within the class
            st = self.mask.residue_status(qs, qe, rho + r * a0, rho + r * (a1 - 1) + 1, r, rho, sq, sk, heads)
            lowest = st if lowest is None else torch.minimum(lowest, st)
            highest = st if highest is None else torch.maximum(highest, st)
        if lowest is None:
            return super().tile_status(qs, qe, ks, ke, sq, sk, heads)
        return status_of(lowest == FULL, highest != EMPTY)

    def tile_count(self, block_m, block_n):
        if isinstance(self.mask, Strided) and self.mask.stride == self.stride:
            return self.mask.tile_count(block_m, block_n)
        return None

    def __str__(self):
        return f"ResidueOrder({self.mask}, {self.stride})"


def _strides(mask: Mask) -> set:
    if isinstance(mask, Strided):
        return {mask.stride} if mask.stride > 1 else set()
    parts = getattr(mask, "parts", ())
    return set().union(*(_strides(p) for p in parts)) if parts else set()


@register_key_order
def residue_order(mask: Mask) -> ResidueOrder | None:
    """``mask`` on keys in residue order when it has :class:`Strided` parts, all of one stride > 1 (what the
    sparse ops run, so each head visits only its own key tiles), else None."""
    strides = _strides(mask)
    return ResidueOrder(mask, strides.pop()) if len(strides) == 1 else None
