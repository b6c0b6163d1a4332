"""Structured masks: sliding windows, neighborhoods, blocks, global+local, strided heads.

Positions are 0-based; ``q`` indexes queries (``Sq`` of them) and ``k`` keys (``Sk``). Each class
docstring states its predicate (docs/architecture.md, Masks). Tile statuses come from
interval arithmetic on the descriptor, key spans from closed forms, so a block map costs O(1) per
tile pair it looks at and never builds an ``[Sq, Sk]`` tensor.
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass
from functools import lru_cache

import torch

from attnopt.masks.base import (EMPTY, FULL, PARTIAL, STATUS_DTYPE, Mask, check_int, is_int, prod, register_key_order,
                                register_type)  # fmt: skip


def _status(full, nonempty) -> torch.Tensor:
    return torch.where(full, FULL, torch.where(nonempty, PARTIAL, EMPTY)).to(STATUS_DTYPE)


def _with_globals(g: int, qs, qe, ks, ke, local) -> torch.Tensor:
    """Status when queries ``< g`` see every key and keys ``< g`` are seen by every query.

    ``local(qs, qe, ks, ke)`` is the status of the other pairs, asked on tiles clipped to ``>= g``.
    """
    if g == 0:
        return local(qs, qe, ks, ke)
    inner = local(torch.clamp(qs, min=g), torch.clamp(qe, min=g + 1), torch.clamp(ks, min=g), torch.clamp(ke, min=g + 1))
    all_global = (qe <= g) | (ke <= g)
    any_global = (qs < g) | (ks < g)
    inner = torch.where(any_global & (inner == EMPTY), PARTIAL, inner).to(STATUS_DTYPE)
    return torch.where(all_global, FULL, inner).to(STATUS_DTYPE)


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
        return _status(full, nonempty)

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


def causal() -> SlidingWindow:
    """Plain causal attention, bottom-right aligned: ``SlidingWindow(None, 0)``."""
    return SlidingWindow(None, 0)


class Grid(Mask):
    """Masks on a token grid (row-major), after ``global_tokens`` leading tokens that see and are seen by all.

    ``grid=None`` is a 1-D grid of ``Sk - global_tokens`` tokens. Self-attention only (``Sq == Sk``).

    ``tile`` (an execution choice, same mask): the sparse ops reorder the grid tokens into spatial tiles
    of that shape (tile-major, row-major within a tile), so a query tile's neighborhood is a few dense
    key tiles; :meth:`tiled` is the mask on the reordered positions and :meth:`permutation` the order.
    Subclasses give, per axis, the element relation on coordinates (``_axis_pred``) and, for every
    query coordinate, the first and last visible key coordinate (``_axis_window``); when
    ``_contiguous(axis)`` every query's visible coordinates are that whole interval, and the union
    over consecutive queries is an interval too (windows move by at most their length).
    """

    grid: tuple | None
    global_tokens: int
    tile: tuple | None
    order: str

    @property
    def ndim(self) -> int:
        return 1 if self.grid is None else len(self.grid)

    def _dims(self, sk):
        return (sk - self.global_tokens,) if self.grid is None else self.grid

    def _axis_pred(self, qc, kc, n, axis, ops):
        raise NotImplementedError

    def _axis_window(self, axis: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def _contiguous(self, axis: int) -> bool:
        return True

    def _check_grid(self, name: str) -> None:
        for field in ("grid", "tile"):
            if isinstance(getattr(self, field), list):
                object.__setattr__(self, field, tuple(getattr(self, field)))
        check_int(name, "global_tokens", self.global_tokens, 0)
        if self.grid is not None:
            if not (isinstance(self.grid, tuple) and 1 <= len(self.grid) <= 3 and all(is_int(n) and n >= 1 for n in self.grid)):
                raise ValueError(f"{name}.grid must be a tuple of 1 to 3 positive ints; got {self.grid!r}")
        if self.order not in ("row-major", "tiled"):
            raise ValueError(f"{name}.order must be 'row-major' or 'tiled'; got {self.order!r}")
        if self.tile is not None:
            if self.grid is None or not (isinstance(self.tile, tuple) and len(self.tile) == len(self.grid)
                                         and all(is_int(t) and t >= 1 and n % t == 0 for t, n in zip(self.tile, self.grid))):  # fmt: skip
                raise ValueError(f"{name}.tile must give one size per grid axis, each dividing the grid; got tile "
                                 f"{self.tile!r} for grid {self.grid!r}")  # fmt: skip
        elif self.order == "tiled":
            raise ValueError(f"{name}: order='tiled' needs a tile shape")

    # Per-axis fields (a tuple of one value per grid axis after construction).
    _axis_fields = ()

    def on_grid(self, grid: tuple, global_tokens: int) -> "Grid":
        """This mask on ``grid`` after ``global_tokens`` leading tokens (a grid inferred from a model): per-axis
        fields given once (an int, or a 1-tuple) apply to every axis of the grid."""
        per_axis = {f: getattr(self, f) for f in self._axis_fields}
        per_axis = {f: v[0] if isinstance(v, tuple) and len(v) == 1 else v for f, v in per_axis.items()}
        return dataclasses.replace(self, grid=tuple(grid), global_tokens=global_tokens, **per_axis)

    def tiled(self) -> "Grid":
        """The same mask on tile-major positions (what the sparse kernels run when ``tile`` is set)."""
        return dataclasses.replace(self, order="tiled")

    def permutation(self, sk: int) -> torch.Tensor:
        """int64 [Sk]: ``perm[i]`` is the row-major position of tile-major position i (global tokens stay first)."""
        g = self.global_tokens
        t = torch.arange(sk - g)
        flat = 0
        for c, n in zip(self.tiled()._coords(t, self.grid), self.grid):
            flat = flat * n + c
        return torch.cat([torch.arange(g), g + flat])

    def _tile_grid(self) -> tuple:
        return tuple(n // t for n, t in zip(self.grid, self.tile))

    def _check_axis(self, n: int, axis: int) -> None:
        """Raises ValueError when axis ``axis`` of length ``n`` cannot hold the mask."""

    def check(self, sq, sk, heads):
        name = type(self).__name__
        if sq != sk:
            raise ValueError(f"{name} is self-attention on a token grid: Sq must equal Sk; got {sq} and {sk}")
        g = self.global_tokens
        if self.grid is not None and g + prod(self.grid) != sk:
            raise ValueError(f"{name}: the sequence has {sk} tokens but global_tokens + grid = {g} + "
                             f"{'x'.join(map(str, self.grid))} = {g + prod(self.grid)}")  # fmt: skip
        if sk - g < 1:
            raise ValueError(f"{name}: the sequence ({sk} tokens) has no grid tokens after {g} global tokens")
        for a, n in enumerate(self._dims(sk)):
            self._check_axis(n, a)

    def _coords(self, t, dims):
        """Coordinates of grid index ``t`` (>= 0): row-major, or tile-major when ``order`` is tiled."""
        if self.order == "tiled":
            area = prod(self.tile)
            tiles = self._row_major(t // area, self._tile_grid())
            inner = self._row_major(t % area, self.tile)
            return [tc * size + ic for tc, ic, size in zip(tiles, inner, self.tile)]
        return self._row_major(t, dims)

    @staticmethod
    def _row_major(t, dims):
        out = []
        for a, n in enumerate(dims):
            inner = prod(dims[a + 1:]) if len(dims) > 1 else 1
            c = t if inner == 1 else t // inner
            if a > 0:
                c = c % n
            out.append(c)
        return out

    def predicate(self, q, k, h, sq, sk, ops):
        g = self.global_tokens
        dims = self._dims(sk)
        qt = ops.maximum(q - g, 0) if g else q
        kt = ops.maximum(k - g, 0) if g else k
        out = None
        for a, (qc, kc) in enumerate(zip(self._coords(qt, dims), self._coords(kt, dims))):
            t = self._axis_pred(qc, kc, dims[a], a, ops)
            out = t if out is None else out & t
        if g:
            out = (q < g) | (k < g) | out
        return out

    # --- block maps -----------------------------------------------------------------------------------
    def _windows(self, axis, n):
        return _cached_windows(self, axis, n)

    def _axis_boxes(self, s, e, dims):
        """Per axis, the coordinate interval [lo, hi] covering grid indices [s, e) (e > s), and exactness."""
        if self.order == "tiled":
            area = prod(self.tile)
            tile_boxes, _ = self._row_major_boxes(s // area, (e - 1) // area + 1, self._tile_grid())
            boxes = [(lo * t, hi * t + t - 1) for (lo, hi), t in zip(tile_boxes, self.tile)]
            volume = 1
            for lo, hi in boxes:
                volume = volume * (hi - lo + 1)
            return boxes, volume == (e - s)
        return self._row_major_boxes(s, e, dims)

    @staticmethod
    def _row_major_boxes(s, e, dims):
        boxes, volume = [], 1
        for a, n in enumerate(dims):
            inner = prod(dims[a + 1:])
            u0, u1 = s // inner, (e - 1) // inner
            lo, hi = u0 % n, u1 % n
            whole = (u1 - u0 >= n) | (lo > hi)
            lo, hi = torch.where(whole, 0, lo), torch.where(whole, n - 1, hi)
            boxes.append((lo, hi))
            volume = volume * (hi - lo + 1)
        return boxes, volume == (e - s)

    def _reduce(self, arr, lo, hi, contiguous):
        """(min, max) of ``arr`` over [lo, hi] per entry; endpoints suffice when ``arr`` is monotone."""
        if contiguous:
            return arr[lo], arr[hi]
        width = int((hi - lo).max()) + 1 if lo.numel() else 1
        idx = torch.minimum(lo.unsqueeze(-1) + torch.arange(width), hi.unsqueeze(-1))
        vals = arr[idx]
        return vals.amin(-1), vals.amax(-1)

    def _local_status(self, qs, qe, ks, ke, sk):
        g = self.global_tokens
        dims = self._dims(sk)
        qboxes, q_exact = self._axis_boxes(qs - g, qe - g, dims)
        kboxes, k_exact = self._axis_boxes(ks - g, ke - g, dims)
        nonempty = torch.ones(torch.broadcast_shapes(qs.shape, ks.shape), dtype=torch.bool)
        full = nonempty & q_exact & k_exact
        for a, ((qa, qb), (ka, kb)) in enumerate(zip(qboxes, kboxes)):
            first, last = self._windows(a, dims[a])
            contiguous = self._contiguous(a)
            min_first, max_first = self._reduce(first, qa, qb, contiguous)
            min_last, max_last = self._reduce(last, qa, qb, contiguous)
            nonempty &= (max_last >= ka) & (min_first <= kb)
            if contiguous:
                full &= (max_first <= ka) & (min_last >= kb)
            else:
                full &= False
        return _status(full, nonempty)

    def tile_status(self, qs, qe, ks, ke, sq, sk, heads):
        return _with_globals(self.global_tokens, qs, qe, ks, ke, lambda a, b, c, d: self._local_status(a, b, c, d, sk))

    def key_span(self, qs, qe, sq, sk):
        g = self.global_tokens
        dims = self._dims(sk)
        boxes, _ = self._axis_boxes(torch.clamp(qs - g, min=0), torch.clamp(qe - g, min=1), dims)
        tiled = self.order == "tiled"
        span_dims = self._tile_grid() if tiled else dims
        scale = prod(self.tile) if tiled else 1
        lo, hi = torch.zeros_like(qs), torch.zeros_like(qs)
        for a, (qa, qb) in enumerate(boxes):
            first, last = self._windows(a, dims[a])
            inner = prod(span_dims[a + 1:])
            min_first, _ = self._reduce(first, qa, qb, self._contiguous(a))
            _, max_last = self._reduce(last, qa, qb, self._contiguous(a))
            if tiled:  # the key box's spatial tiles, lowest and highest in tile-major order
                min_first, max_last = min_first // self.tile[a], max_last // self.tile[a]
            lo = lo + min_first * inner
            hi = hi + max_last * inner
        lo, hi = g + lo * scale, g + (hi + 1) * scale
        has_global_rows = qs < g
        return torch.where(has_global_rows, 0, lo), torch.where(has_global_rows, sk, hi)

    def global_keys(self, sk):
        return self.global_tokens


@lru_cache(maxsize=64)
def _cached_windows(mask, axis, n):
    return mask._axis_window(axis, n)


def _per_axis(name: str, field: str, value, ndim: int) -> tuple:
    vals = (value,) * ndim if is_int(value) else value
    if not (isinstance(vals, tuple) and len(vals) == ndim):
        raise ValueError(f"{name}.{field} must be an int or a tuple of {ndim} (one per grid axis); got {value!r}")
    return vals


def _per_axis_bool(name: str, field: str, value, ndim: int) -> tuple:
    vals = (value,) * ndim if isinstance(value, bool) else value
    if not (isinstance(vals, tuple) and len(vals) == ndim and all(isinstance(v, bool) for v in vals)):
        raise ValueError(f"{name}.{field} must be a bool or a tuple of {ndim} bools; got {value!r}")
    return vals


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
            vals = _per_axis(name, field, getattr(self, field), nd)
            for v in vals:
                check_int(name, field, v, 1)
            object.__setattr__(self, field, vals)
        object.__setattr__(self, "causal", _per_axis_bool(name, "causal", self.causal, nd))
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
        parts = [f"kernel_size={_short(self.kernel_size)}"]
        for field, default in (("dilation", 1), ("stride", 1)):
            if any(v != default for v in getattr(self, field)):
                parts.append(f"{field}={_short(getattr(self, field))}")
        if any(self.causal):
            parts.append(f"causal={_short(self.causal)}")
        if self.grid is not None:
            parts.append(f"grid={'x'.join(map(str, self.grid))}")
        if self.global_tokens:
            parts.append(f"global_tokens={self.global_tokens}")
        if self.tile is not None:
            parts.append(f"tile={'x'.join(map(str, self.tile))}" + (", tiled order" if self.order == "tiled" else ""))
        return f"Neighborhood({', '.join(parts)})"


def _short(vals: tuple):
    return vals[0] if len(set(vals)) == 1 else vals


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
        vals = _per_axis("Blocked", "block", self.block, self.ndim)
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
        return f"Blocked({_short(self.block)}{grid}{g})"


def _as_window(owner: str, window) -> SlidingWindow:
    if isinstance(window, SlidingWindow):
        return window
    if is_int(window) and window >= 0:
        return SlidingWindow(window, window)
    raise ValueError(f"{owner}.window must be an int >= 0 (symmetric radius) or a SlidingWindow; got {window!r}")


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
        object.__setattr__(self, "window", _as_window("GlobalLocal", self.window))

    def predicate(self, q, k, h, sq, sk, ops):
        g = self.global_tokens
        local = self.window.predicate(q, k, h, sq, sk, ops)
        return (q < g) | (k < g) | local if g else local

    def tile_status(self, qs, qe, ks, ke, sq, sk, heads):
        return _with_globals(self.global_tokens, qs, qe, ks, ke,
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
        object.__setattr__(self, "window", _as_window("Strided", self.window))

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
        return _status(lowest == FULL, highest != EMPTY)

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


__all__ = ["Blocked", "GlobalLocal", "Neighborhood", "ResidueOrder", "SlidingWindow", "Strided", "causal", "residue_order"]
