"""Sliding windows (FlashAttention-2 ``window_size``), causal attention, and the window argument of the masks built
on one (docs/architecture.md, Masks)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from attnopt.masks.base import Mask, check_int, is_int, register_type
from attnopt.masks.status import EMPTY, STATUS_DTYPE, status_of


@register_type
@dataclass(frozen=True)
class SlidingWindow(Mask):
    """Query i sees keys j with ``i' - left <= j <= i' + right``, ``i' = i + Sk - Sq`` (bottom-right aligned).

    The FlashAttention-2 ``window_size`` convention: ``None`` is unbounded, so ``SlidingWindow(None, 0)``
    is plain causal and a causal window of W tokens is ``SlidingWindow(W - 1, 0)``. With ``dilation``
    d > 1 the window lives on the sub-sequence ``j ≡ i' (mod d)`` and spans ``left`` and ``right``
    steps of it: ``i' - left·d <= j <= i' + right·d``.
    """

    left: int | None = None
    right: int | None = None
    dilation: int = 1

    shift_invariant = True

    def __post_init__(self):
        check_int("SlidingWindow", "left", self.left, 0, allow_none=True)
        check_int("SlidingWindow", "right", self.right, 0, allow_none=True)
        check_int("SlidingWindow", "dilation", self.dilation, 1)

    @property
    def reach(self) -> tuple[int | None, int | None]:
        """Key offsets ``(left, right)`` in positions (dilation included)."""
        d = self.dilation
        return (None if self.left is None else self.left * d, None if self.right is None else self.right * d)

    def predicate(self, q, k, h, sq, sk, ops):
        left, right = self.reach
        i = q + (sk - sq)
        out = None
        if left is not None:
            out = k >= i - left
        if right is not None:
            t = k <= i + right
            out = t if out is None else out & t
        if self.dilation > 1:
            t = (k + sq) % self.dilation == (q + sk) % self.dilation  # j - i' ≡ 0 (mod d), both sides >= 0
            out = t if out is None else out & t
        return ops.true_like(q, k) if out is None else out

    def tile_status(self, qs, qe, ks, ke, sq, sk, heads):
        left, right = self.reach
        off = sk - sq
        dmin = ks - (qe - 1 + off)  # smallest j - i' over the tile pair
        dmax = (ke - 1) - (qs + off)  # largest j - i'
        nonempty = torch.ones(torch.broadcast_shapes(dmin.shape, dmax.shape), dtype=torch.bool)
        full = nonempty.clone() if self.dilation == 1 else torch.zeros_like(nonempty)
        if left is not None:
            nonempty &= dmax >= -left
            full &= dmin >= -left
        if right is not None:
            nonempty &= dmin <= right
            full &= dmax <= right
        return status_of(full, nonempty)

    def residue_status(self, qs, qe, ks, ke, stride, residue, sq, sk, heads):
        status = self.tile_status(qs, qe, ks, ke, sq, sk, heads)  # FULL is exact: ks and ke - 1 are in the subset
        if self.dilation > 1:
            return status
        # The tile's queries see the key interval [qs' - left, qe' - 1 + right]; is one of its keys ≡ residue?
        left, right = self.reach
        off = sk - sq
        lo = ks if left is None else torch.maximum(ks, qs + off - left)
        hi = ke - 1 if right is None else torch.minimum(ke - 1, qe - 1 + off + right)
        nonempty = lo + torch.remainder(residue - lo, stride) <= hi
        return torch.where(nonempty, status, EMPTY).to(STATUS_DTYPE)

    def key_span(self, qs, qe, sq, sk):
        left, right = self.reach
        off = sk - sq
        lo = torch.zeros_like(qs) if left is None else torch.clamp(qs + off - left, 0, sk)
        hi = torch.full_like(qe, sk) if right is None else torch.clamp(qe + off + right, 0, sk)
        return lo, torch.maximum(hi, lo)

    def tile_count(self, block_m, block_n):
        import sympy as sp

        t, sq, sk = sp.symbols("t Sq Sk", integer=True, nonnegative=True)
        left, right = self.reach
        lo = 0 if left is None else sp.Max(0, t * block_m + sk - sq - left)
        hi = sk if right is None else sp.Min(sk, sp.Min(t * block_m + block_m, sq) + sk - sq + right)
        return sp.Max(0, sp.ceiling(hi / block_n) - sp.floor(lo / block_n))

    def __str__(self):
        if self.left is None and self.right == 0 and self.dilation == 1:
            return "causal"
        dil = f", dilation={self.dilation}" if self.dilation > 1 else ""
        return f"SlidingWindow({self.left}, {self.right}{dil})"


ALIGNS = ("bottom-right", "top-left")


def causal(align: str = "bottom-right") -> Mask:
    """Plain causal attention: bottom-right aligned ``SlidingWindow(None, 0)`` (query i sees keys up to
    ``i + Sk - Sq``, FlashAttention-2's convention), or top-left aligned ``TopLeft(SlidingWindow(None, 0))``
    (keys up to ``i``: SDPA's ``is_causal``, FlexAttention's ``q_idx >= kv_idx``). Both agree when Sq == Sk."""
    if align not in ALIGNS:
        raise ValueError(f"causal(align=...) takes one of {ALIGNS}; got {align!r}")
    return SlidingWindow(None, 0) if align == "bottom-right" else TopLeft(SlidingWindow(None, 0))


@register_type
@dataclass(frozen=True)
class TopLeft(Mask):
    """``window`` aligned top-left: query i stands at key position i (not ``i + Sk - Sq``), so query i sees keys
    ``i - left <= j <= i + right``. The same as ``window`` when Sq == Sk; ``causal("top-left")`` is SDPA's
    ``is_causal``."""

    window: SlidingWindow = SlidingWindow(None, 0)

    shift_invariant = True

    def __post_init__(self):
        if not isinstance(self.window, SlidingWindow):
            raise TypeError(f"TopLeft aligns a SlidingWindow; got {self.window!r}")

    # The window evaluated as if Sq were Sk: its offset Sk - Sq is then 0.
    def predicate(self, q, k, h, sq, sk, ops):
        return self.window.predicate(q, k, h, sk, sk, ops)

    def tile_status(self, qs, qe, ks, ke, sq, sk, heads):
        return self.window.tile_status(qs, qe, ks, ke, sk, sk, heads)

    def residue_status(self, qs, qe, ks, ke, stride, residue, sq, sk, heads):
        return self.window.residue_status(qs, qe, ks, ke, stride, residue, sk, sk, heads)

    def key_span(self, qs, qe, sq, sk):
        return self.window.key_span(qs, qe, sk, sk)

    def __str__(self):
        return f"{self.window} (top-left)"


def as_window(owner: str, window) -> SlidingWindow:
    """``window`` of mask ``owner`` as a SlidingWindow: one given, or an int r meaning ``SlidingWindow(r, r)``."""
    if isinstance(window, SlidingWindow):
        return window
    if is_int(window) and window >= 0:
        return SlidingWindow(window, window)
    raise ValueError(f"{owner}.window must be an int >= 0 (symmetric radius) or a SlidingWindow; got {window!r}")
