"""General masks: a block layout (:class:`BlockSparse`) and FlexAttention-style callables (:func:`from_mask_mod`).

Neither has a closed form, so they carry their structure: BlockSparse its ``[H or 1, ceil(Sq/bq),
ceil(Sk/bk)]`` layout (its own data, O((S/block)²) booleans), a mask_mod its callable, which block
maps evaluate tile by tile (never on an ``[Sq, Sk]`` tensor). Both are keyed by a digest and live in
this process's mask registry.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from functools import lru_cache, partial
from typing import Callable

import torch

from attnopt.masks.base import EMPTY, FULL, PARTIAL, STATUS_DTYPE, Mask, block_pair, ceil_div, check_int


@dataclass(frozen=True, eq=False)
class BlockSparse(Mask):
    """Blocks marked True in ``layout`` ([H or 1, ceil(Sq/bq), ceil(Sk/bk)] bool) are visible.

    ``block`` is an int or ``(bq, bk)``: query i and key j see each other when
    ``layout[h, i // bq, j // bk]``. A layout of 1 head applies to every head.
    """

    layout: torch.Tensor
    block: int | tuple = 128
    _digest: str = field(init=False, repr=False, compare=False)
    _integral: torch.Tensor = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        layout = self.layout
        if not isinstance(layout, torch.Tensor) or layout.dtype != torch.bool or layout.dim() not in (2, 3):
            raise ValueError("BlockSparse.layout must be a bool tensor [H or 1, query blocks, key blocks] "
                             f"(or 2-D for one head); got {getattr(layout, 'dtype', type(layout).__name__)} "
                             f"of shape {tuple(getattr(layout, 'shape', ()))}")  # fmt: skip
        layout = layout.detach().to("cpu").contiguous()
        if layout.dim() == 2:
            layout = layout[None]
        block = block_pair("BlockSparse", self.block, "(bq, bk)")
        object.__setattr__(self, "layout", layout)
        object.__setattr__(self, "block", block)
        digest = hashlib.sha256(repr((tuple(layout.shape), block)).encode() + layout.numpy().tobytes()).hexdigest()[:16]
        object.__setattr__(self, "_digest", digest)
        # Integral image: counts of visible blocks in any rectangle in O(1) (tile statuses).
        integral = torch.zeros(layout.shape[0], layout.shape[1] + 1, layout.shape[2] + 1, dtype=torch.int64)
        integral[:, 1:, 1:] = layout.long().cumsum(1).cumsum(2)
        object.__setattr__(self, "_integral", integral)

    def __eq__(self, other):
        return isinstance(other, BlockSparse) and other._digest == self._digest

    def __hash__(self):
        return hash(self._digest)

    @property
    def head_dependent(self) -> bool:
        return self.layout.shape[0] > 1

    def digest(self) -> str:
        return self._digest

    def to_dict(self):
        return None

    def check(self, sq, sk, heads):
        bq, bk = self.block
        need = (ceil_div(sq, bq), ceil_div(sk, bk))
        if tuple(self.layout.shape[1:]) != need:
            raise ValueError(f"BlockSparse layout has {tuple(self.layout.shape[1:])} blocks; Sq={sq}, Sk={sk} with "
                             f"blocks {bq}x{bk} need {need}")  # fmt: skip
        if self.layout.shape[0] not in (1, heads):
            raise ValueError(f"BlockSparse layout has {self.layout.shape[0]} heads; the attention has {heads}")

    def predicate(self, q, k, h, sq, sk, ops):
        bq, bk = self.block
        # Rows past Sq (the last query tile's padding) are clamped into the layout: their result is unused.
        qb = ops.minimum(q // bq, self.layout.shape[1] - 1)
        kb = ops.minimum(k // bk, self.layout.shape[2] - 1)
        return ops.layout_lookup(self, h, qb, kb)

    def lookup(self, h, qb, kb):
        """``layout[h, qb, kb]`` broadcast; indices clamped into the layout (rows past Sq are don't-care)."""
        layout = self.layout.to(qb.device)
        hh = h if self.layout.shape[0] > 1 else torch.zeros_like(h)
        return layout[hh, torch.clamp(qb, max=layout.shape[1] - 1), torch.clamp(kb, max=layout.shape[2] - 1)]

    def _count(self, h, q0, q1, k0, k1):
        """Visible blocks in rows [q0, q1) x cols [k0, k1) of head (variant) h."""
        s = self._integral
        return s[h, q1, k1] - s[h, q0, k1] - s[h, q1, k0] + s[h, q0, k0]

    def tile_status(self, qs, qe, ks, ke, sq, sk, heads):
        bq, bk = self.block
        hl = self.layout.shape[0]
        h = torch.arange(hl).reshape(hl, 1, 1)
        q0, q1 = qs // bq, (qe - 1) // bq + 1
        k0, k1 = ks // bk, (ke - 1) // bk + 1
        count = self._count(h, q0, q1, k0, k1)
        area = (q1 - q0) * (k1 - k0)
        status = torch.where(count == area, FULL, torch.where(count > 0, PARTIAL, EMPTY)).to(STATUS_DTYPE)
        return status.expand(heads, *status.shape[1:]) if hl > 1 and heads != hl else status

    def key_span(self, qs, qe, sq, sk):
        bq, bk = self.block
        any_layout = self.layout.any(0)  # [nQb, nKb]
        nkb = any_layout.shape[1]
        cols = torch.arange(nkb)
        first = torch.where(any_layout, cols, nkb).amin(1)  # [nQb] first visible key block of a block row
        last = torch.where(any_layout, cols, -1).amax(1)
        q0, q1 = qs // bq, (qe - 1) // bq
        rows = torch.arange(any_layout.shape[0])
        in_range = (rows >= q0.unsqueeze(-1)) & (rows <= q1.unsqueeze(-1))
        lo_b = torch.where(in_range, first, nkb).amin(-1)
        hi_b = torch.where(in_range, last, -1).amax(-1) + 1
        lo = torch.clamp(lo_b * bk, max=sk)
        return lo, torch.maximum(torch.clamp(hi_b * bk, max=sk), lo)

    def density(self, sq, sk, heads=1):
        bq, bk = self.block
        rows = torch.full((self.layout.shape[1],), bq)
        rows[-1] = sq - bq * (self.layout.shape[1] - 1)
        cols = torch.full((self.layout.shape[2],), bk)
        cols[-1] = sk - bk * (self.layout.shape[2] - 1)
        visible = (self.layout.double() * rows[:, None] * cols[None, :]).sum()
        return float(visible) / (self.layout.shape[0] * sq * sk)

    def __str__(self):
        return (f"BlockSparse({'x'.join(map(str, self.layout.shape))} layout, block {self.block[0]}x{self.block[1]}, "
                f"{self.layout.float().mean():.0%} of blocks)")  # fmt: skip


@dataclass(frozen=True, eq=False)
class MaskMod(Mask):
    """A FlexAttention ``mask_mod(b, h, q_idx, kv_idx) -> bool`` as a mask (see :func:`from_mask_mod`).

    The callable must be a pure function of its arguments. It is evaluated tile by tile as FlexAttention
    evaluates it: per element, through ``torch.vmap`` (each call sees 0-d int64 index tensors, so
    ``start, end = intervals[doc[q_idx]]`` works). A callable vmap cannot run (a NumPy round trip, an op
    without a batching rule) is called once on the broadcast index tensors instead.

    Whether it depends on the batch row ``b`` or the head ``h`` is whether its result flows from that
    index under vmap (without vmap: whether a call with ``b`` as ``[B, 1, 1, 1]`` and ``h`` as
    ``[1, H, 1, 1]`` keeps that dimension). Head-dependent masks get one block map per head;
    batch-dependent ones run one batch row at a time, each with the mask bound to its row
    (:meth:`at_batch`; ``batch`` is that row, None: row 0). ``heads`` declares the heads it distinguishes
    (None: found by that test).
    """

    fn: Callable
    heads: int | None = None
    name: str = ""
    batch: int | None = None

    traceable = False

    def __post_init__(self):
        if not callable(self.fn):
            raise TypeError(f"from_mask_mod takes a callable mask_mod(b, h, q_idx, kv_idx); got {self.fn!r}")
        check_int("from_mask_mod", "heads", self.heads, 1, allow_none=True)
        check_int("from_mask_mod", "batch", self.batch, 0, allow_none=True)
        if not self.name:
            object.__setattr__(self, "name", getattr(self.fn, "__name__", type(self.fn).__name__))

    def __eq__(self, other):
        return isinstance(other, MaskMod) and other.fn is self.fn and (other.heads, other.batch) == (self.heads, self.batch)

    def __hash__(self):
        return hash((id(self.fn), self.heads, self.batch))

    @property
    def head_dependent(self) -> bool:
        """Declared, or (undeclared) assumed: :meth:`heads_of` finds out for a given head count."""
        return self.heads is None or self.heads > 1

    def heads_of(self, heads: int) -> int:
        if self.heads is not None:
            return heads if self.heads > 1 else 1
        return heads if heads > 1 and _depends(self, 1, heads)[1] else 1

    def batch_dependent(self, batch: int) -> bool:
        return self.batch is None and batch > 1 and _depends(self, batch, 1)[0]

    def at_batch(self, b: int) -> "MaskMod":
        return MaskMod(self.fn, self.heads, self.name, b)

    def digest(self) -> str:
        return hashlib.sha256(f"mask_mod:{id(self.fn)}:{self.heads}:{self.name}:{self.batch}".encode()).hexdigest()[:16]

    def to_dict(self):
        return None

    def check(self, sq, sk, heads):
        if self.heads is not None and self.heads not in (1, heads):
            raise ValueError(f"mask_mod {self.name} was declared for {self.heads} heads; the attention has {heads}")

    def _call(self, b, h, q, k, per_element: bool = True) -> torch.Tensor:
        """The callable on broadcastable index tensors: per element through vmap (the result has the broadcast
        shape), else (or with ``per_element`` False) in one call on the tensors themselves. A callable closing over
        tensors on another device (document ids on the GPU) is called there, as FlexAttention calls it on its
        inputs' device; the result comes back to the indices' device."""
        device = closure_device(self.fn)
        if device is None or device == q.device:
            return self._call_here(b, h, q, k, per_element)
        moved = (torch.as_tensor(x).to(device) for x in (b, h, q, k))
        return self._call_here(*moved, per_element).to(q.device)

    def _call_here(self, b, h, q, k, per_element: bool) -> torch.Tensor:
        if per_element:
            try:
                out = _per_element(self.fn, (b, h, q, k))
            except Exception as vmap_error:  # not vmap-able: evaluated on the broadcast tensors instead
                out = self._broadcast_call(b, h, q, k, vmap_error)
        else:
            out = self.fn(b, h, q, k)
        if not isinstance(out, torch.Tensor) or out.dtype != torch.bool:
            raise TypeError(f"mask_mod {self.name} must return a bool tensor; got {type(out).__name__}"
                            f"{'' if not isinstance(out, torch.Tensor) else ' of ' + str(out.dtype)}")  # fmt: skip
        return out

    def _broadcast_call(self, b, h, q, k, vmap_error: Exception):
        try:
            return self.fn(b, h, q, k)
        except Exception as exc:
            raise TypeError(f"mask_mod {self.name} failed per element through torch.vmap ({vmap_error}) and on "
                            f"broadcast index tensors ({exc}); write it as FlexAttention expects: a function of 0-d "
                            "index tensors built from torch ops") from exc  # fmt: skip

    def predicate(self, q, k, h, sq, sk, ops):
        if ops.name != "torch":
            raise TypeError(f"mask_mod {self.name} is a Python callable; it has no Triton form (block maps store "
                            "its boundary tiles instead)")  # fmt: skip
        return self._call(torch.tensor(self.batch or 0, dtype=torch.int64, device=q.device), h, q, k)

    def tile_status(self, qs, qe, ks, ke, sq, sk, heads):
        """Evaluates the callable on every element of the tiles (rows past Sq count as visible)."""
        hm = self.heads_of(heads)
        shape = torch.broadcast_shapes(qs.shape, ks.shape)
        bm = int((qe - qs).max()) if qs.numel() else 1
        bn = int((ke - ks).max()) if ks.numel() else 1
        rows = qs.expand(shape).unsqueeze(-1) + torch.arange(bm)  # [C, W, bm]
        cols = ks.expand(shape).unsqueeze(-1) + torch.arange(bn)  # [C, W, bn]
        row_in = rows < qe.expand(shape).unsqueeze(-1)
        col_in = cols < ke.expand(shape).unsqueeze(-1)
        h = torch.arange(hm).reshape(hm, 1, 1, 1, 1)
        ok = self.allows(torch.clamp(rows, max=sq - 1).unsqueeze(-1), torch.clamp(cols, max=sk - 1).unsqueeze(-2), sq, sk, h)
        inside = row_in.unsqueeze(-1) & col_in.unsqueeze(-2)
        any_ok = (ok & inside).flatten(-2).any(-1)
        all_ok = (ok | ~inside).flatten(-2).all(-1)
        return torch.where(all_ok, FULL, torch.where(any_ok, PARTIAL, EMPTY)).to(STATUS_DTYPE)

    def __str__(self):
        return f"mask_mod({self.name})"


def closure_device(fn, depth: int = 0) -> torch.device | None:
    """The device of the first non-CPU tensor ``fn`` closes over (closure cells, default arguments, a
    ``functools.partial``'s arguments, and the callables among them, a few levels deep), or None."""
    if depth > 3:
        return None
    values = list(getattr(fn, "__defaults__", None) or ())
    for cell in getattr(fn, "__closure__", None) or ():
        try:
            values.append(cell.cell_contents)
        except ValueError:  # an empty cell (a name assigned after the closure was made)
            pass
    if isinstance(fn, partial):
        values += [fn.func, *fn.args, *fn.keywords.values()]
    for x in values:
        if isinstance(x, torch.Tensor) and x.device.type != "cpu":
            return x.device
        if callable(x) and not isinstance(x, (type, torch.Tensor)):
            found = closure_device(x, depth + 1)
            if found is not None:
                return found
    return None


def _per_element(fn: Callable, args: tuple) -> torch.Tensor:
    """``fn`` on every element of the broadcast of ``args`` (FlexAttention's semantics: each call sees 0-d
    tensors), through one ``torch.vmap`` per dimension of size > 1; an argument is mapped along the dimensions
    where it varies (as ``torch.nn.attention.flex_attention`` maps b, h, q_idx, kv_idx). Returns the broadcast shape."""
    shape = torch.broadcast_shapes(*(a.shape for a in args))
    padded = [a.reshape((1,) * (len(shape) - a.dim()) + tuple(a.shape)) for a in args]
    dims = [d for d, n in enumerate(shape) if n > 1]
    for d in reversed(dims):  # the last dimension innermost
        fn = torch.vmap(fn, in_dims=tuple(0 if a.shape[d] > 1 else None for a in padded))
    out = fn(*(a.reshape([n for n in a.shape if n > 1]) for a in padded))
    if not isinstance(out, torch.Tensor) or out.dim() != len(dims):
        raise TypeError("a mask_mod returns one bool per (b, h, q_idx, kv_idx)")
    return out.reshape(shape)


def _flows_from(fn: Callable, args: tuple, i: int) -> bool | None:
    """Whether ``fn``'s result flows from ``args[i]`` (1-D; the others 0-d) under vmap: vmap refuses to return an
    unmapped result (``out_dims=None``) that depends on the mapped argument. None: vmap cannot run ``fn``."""
    in_dims = tuple(0 if j == i else None for j in range(len(args)))
    try:
        torch.vmap(fn, in_dims=in_dims)(*args)
    except Exception:
        return None
    try:
        torch.vmap(fn, in_dims=in_dims, out_dims=None)(*args)
    except ValueError:  # "can not return a BatchedTensor when out_dim is None" (the call itself ran above)
        return True
    return False


@lru_cache(maxsize=256)
def _depends(mask: MaskMod, batch: int, heads: int) -> tuple[bool, bool]:
    """Whether ``mask``'s callable depends on (the batch row, the head): whether its result flows from ``b`` (``h``)
    under vmap, else (vmap cannot run it) whether one call on ``[B, H, 1, 1]`` indices keeps that dimension."""
    zero = torch.zeros((), dtype=torch.int64)
    by_batch = batch > 1 and _flows_from(mask.fn, (torch.arange(batch), zero, zero, zero), 0)
    by_head = heads > 1 and _flows_from(mask.fn, (zero, torch.arange(heads), zero, zero), 1)
    if by_batch is not None and by_head is not None:
        return by_batch, by_head
    b = torch.arange(batch).view(batch, 1, 1, 1)
    h = torch.arange(heads).view(1, heads, 1, 1)
    zero = zero.view(1, 1, 1, 1)
    shape = torch.broadcast_shapes(mask._call(b, h, zero, zero, per_element=False).shape, (1, 1, 1, 1))
    return shape[-4] > 1, shape[-3] > 1


def from_mask_mod(fn: Callable, heads: int | None = None, name: str = "") -> MaskMod:
    """A mask from a FlexAttention-style ``mask_mod(b, h, q_idx, kv_idx) -> bool tensor``; see :class:`MaskMod`."""
    return MaskMod(fn, heads, name)
