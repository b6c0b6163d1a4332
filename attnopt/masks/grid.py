"""The base of masks on a token grid (row-major or in spatial tiles, after leading global tokens) and the helpers of
their per-axis fields (docs/architecture.md, Masks)."""

from __future__ import annotations

import dataclasses
from functools import lru_cache

import torch

from attnopt.masks.base import Mask, check_int, is_int, prod
from attnopt.masks.status import status_of, with_globals


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
        values = {f: getattr(self, f) for f in self._axis_fields}
        values = {f: v[0] if isinstance(v, tuple) and len(v) == 1 else v for f, v in values.items()}
        return dataclasses.replace(self, grid=tuple(grid), global_tokens=global_tokens, **values)

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
        return status_of(full, nonempty)

    def tile_status(self, qs, qe, ks, ke, sq, sk, heads):
        return with_globals(self.global_tokens, qs, qe, ks, ke, lambda a, b, c, d: self._local_status(a, b, c, d, sk))

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


def per_axis(name: str, field: str, value, ndim: int) -> tuple:
    """``value`` (an int, or a tuple of one int per axis) as a tuple of ``ndim`` ints (ValueError otherwise)."""
    vals = (value,) * ndim if is_int(value) else value
    if not (isinstance(vals, tuple) and len(vals) == ndim):
        raise ValueError(f"{name}.{field} must be an int or a tuple of {ndim} (one per grid axis); got {value!r}")
    return vals


def per_axis_bool(name: str, field: str, value, ndim: int) -> tuple:
    """``value`` (a bool, or a tuple of one bool per axis) as a tuple of ``ndim`` bools (ValueError otherwise)."""
    vals = (value,) * ndim if isinstance(value, bool) else value
    if not (isinstance(vals, tuple) and len(vals) == ndim and all(isinstance(v, bool) for v in vals)):
        raise ValueError(f"{name}.{field} must be a bool or a tuple of {ndim} bools; got {value!r}")
    return vals


def compact(vals: tuple):
    """One value when every axis has the same (how the masks print per-axis fields), else the tuple."""
    return vals[0] if len(set(vals)) == 1 else vals
