"""The mask descriptor protocol, its combinators, and its serialization.

A mask says which keys each query of one attention head may see (docs/architecture.md, Masks). Every
descriptor provides, for query positions ``q``, key positions ``k`` and query head ``h``:

* ``predicate(q, k, h, sq, sk, ops)``: the element test, written once and evaluated on tensors
  (:meth:`Mask.allows`) or as Triton source (see :mod:`attnopt.masks.expr`);
* ``tile_status(qs, qe, ks, ke, sq, sk, heads)``: for query tiles ``[qs, qe)`` and key tiles
  ``[ks, ke)`` (broadcast int64 tensors), :data:`EMPTY`, :data:`PARTIAL` or :data:`FULL`. It may
  say PARTIAL where the truth is EMPTY or FULL (the element test then decides), never the reverse;
  structured masks answer by interval arithmetic on the descriptor, in O(1) per tile pair;
* ``key_span(qs, qe, sq, sk)``: a key range ``[lo, hi)`` holding every key the query tile may see
  except the leading :meth:`Mask.global_keys` (which every query may see), so block maps only look
  at the tiles near a query tile;
* ``check(sq, sk, heads)``: raises ValueError when the mask cannot apply to those sizes.

``a & b`` (both must allow) and ``a | b`` (either allows) combine descriptors; tile statuses
combine by min and max on EMPTY < PARTIAL < FULL, which keeps them conservative.

Masks are frozen dataclasses. JSON-describable ones serialize to canonical JSON (:meth:`Mask.key`);
masks that hold a tensor or a callable are registered in a process-wide table and keyed by a digest.
"""

from __future__ import annotations

import hashlib
import json
import math
import threading
from dataclasses import dataclass, fields
from typing import Any

import torch

from attnopt.masks.blockmap import build
from attnopt.masks.draw import draw_png, draw_text
from attnopt.masks.expr import TORCH
from attnopt.masks.status import EMPTY, FULL, PARTIAL, STATUS_DTYPE, ceil_div  # noqa: F401  (re-exported)

_REGISTRY: dict[str, "Mask"] = {}
_REGISTRY_LOCK = threading.Lock()
_TYPES: dict[str, type] = {}

# dense() and draw() build [Sq, Sk] tensors: only for small test and display sizes.
MAX_DENSE_ELEMENTS = 1 << 26


# Functions giving a mask on reordered keys (the order its kernels run it in), or None: tile counts are taken
# in the first order that applies. attnopt.masks.residue registers the residue order of strided masks.
_KEY_ORDERS: list = []


def register_key_order(reorder):
    """Makes ``reorder(mask) -> Mask | None`` (the mask on keys in the order its kernels run it) known to
    :meth:`Mask.tiles_per_query_tile`."""
    _KEY_ORDERS.append(reorder)
    return reorder


def register_type(cls):
    """Class decorator: makes ``cls`` known to :func:`from_dict` by its name."""
    _TYPES[cls.__name__] = cls
    return cls


class Mask:
    """Base class of mask descriptors; see the module docstring."""

    # Whether Triton source can be generated for the predicate (False for Python callables).
    traceable = True
    # Whether the predicate depends on k - q (and h) only, not on absolute positions.
    shift_invariant = False

    # --- the protocol -------------------------------------------------------------------------------
    def predicate(self, q, k, h, sq, sk, ops):
        raise NotImplementedError

    def tile_status(self, qs, qe, ks, ke, sq: int, sk: int, heads: int) -> torch.Tensor:
        return torch.full(torch.broadcast_shapes(qs.shape, ks.shape), PARTIAL, dtype=STATUS_DTYPE)

    def key_span(self, qs: torch.Tensor, qe: torch.Tensor, sq: int, sk: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.zeros_like(qs), torch.full_like(qs, sk)

    def residue_status(self, qs, qe, ks, ke, stride: int, residue, sq: int, sk: int, heads: int) -> torch.Tensor:
        """:meth:`tile_status` restricted to the keys ``j`` of ``[ks, ke)`` with ``j ≡ residue (mod stride)``
        (``residue`` broadcasts like ``ks``; ``ks`` and ``ke - 1`` are such keys): what a key tile holds after
        :class:`~attnopt.masks.residue.ResidueOrder` sorts keys by residue. The status of the whole range is a
        valid answer (FULL there is FULL on the subset, EMPTY there EMPTY); Strided and SlidingWindow refine it."""
        return self.tile_status(qs, qe, ks, ke, sq, sk, heads)

    def global_keys(self, sk: int) -> int:
        """Number of leading keys that some query of every tile may see (always block-map candidates)."""
        return 0

    def check(self, sq: int, sk: int, heads: int) -> None:
        """Raises ValueError when the mask cannot describe attention of those sizes."""

    @property
    def head_dependent(self) -> bool:
        """Whether different query heads see different keys (then block maps are per head)."""
        return False

    def batch_dependent(self, batch: int) -> bool:
        """Whether rows of a batch of ``batch`` see different keys (then each row runs with :meth:`at_batch`)."""
        return False

    def at_batch(self, b: int) -> "Mask":
        """This mask for batch row ``b`` (itself unless it depends on the batch row)."""
        return self

    def to_dict(self) -> dict | None:
        """A JSON-able description (``{"type": ClassName, ...fields}``), or None when the mask has none."""
        out: dict[str, Any] = {"type": type(self).__name__}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Mask):
                value = value.to_dict()
                if value is None:
                    return None
            out[f.name] = value
        return out

    # --- derived ------------------------------------------------------------------------------------
    def key(self) -> str:
        """A string that identifies the mask: canonical JSON, or ``ref:<digest>`` of the registered object."""
        d = self.to_dict()
        if d is not None:
            return json.dumps(d, sort_keys=True, separators=(",", ":"))
        ref = f"ref:{self.digest()}"
        with _REGISTRY_LOCK:
            _REGISTRY.setdefault(ref, self)
        return ref

    def digest(self) -> str:
        raise NotImplementedError(f"{type(self).__name__} has no JSON form and no digest")

    def heads_of(self, heads: int) -> int:
        """Number of distinct head variants in block maps: ``heads`` when head dependent, else 1."""
        return heads if self.head_dependent else 1

    def allows(self, q_idx, kv_idx, sq: int, sk: int, h=0) -> torch.Tensor:
        """Element test on broadcastable int64 position tensors (``h``: head index, int or tensor)."""
        q_idx, kv_idx = torch.as_tensor(q_idx, dtype=torch.int64), torch.as_tensor(kv_idx, dtype=torch.int64)
        h = torch.as_tensor(h, dtype=torch.int64, device=q_idx.device)
        out = self.predicate(q_idx, kv_idx, h, sq, sk, TORCH)
        return torch.broadcast_to(out, torch.broadcast_shapes(q_idx.shape, kv_idx.shape, h.shape, out.shape))

    def dense(self, sq: int, sk: int, heads: int = 1, device=None) -> torch.Tensor:
        """The boolean mask ``[heads_of(heads), Sq, Sk]`` (True = attend); small sizes only."""
        self.check(sq, sk, heads)
        hm = self.heads_of(heads)
        if hm * sq * sk > MAX_DENSE_ELEMENTS:
            raise ValueError(f"dense() is for small sizes; {hm}x{sq}x{sk} is too large (use block maps)")
        q = torch.arange(sq, device=device)[None, :, None]
        k = torch.arange(sk, device=device)[None, None, :]
        h = torch.arange(hm, device=device)[:, None, None]
        return self.allows(q, k, sq, sk, h).expand(hm, sq, sk).contiguous()

    def row_counts(self, sq: int, sk: int, heads: int = 1, rows_per_chunk: int = 1024) -> torch.Tensor:
        """Visible keys per query row, ``[heads_of(heads), Sq]`` int64, evaluated in row chunks (O(chunk·Sk) memory)."""
        self.check(sq, sk, heads)
        hm = self.heads_of(heads)
        out = torch.empty(hm, sq, dtype=torch.int64)
        k = torch.arange(sk)[None, None, :]
        h = torch.arange(hm)[:, None, None]
        for r0 in range(0, sq, rows_per_chunk):
            q = torch.arange(r0, min(r0 + rows_per_chunk, sq))[None, :, None]
            out[:, r0:r0 + q.shape[1]] = self.allows(q, k, sq, sk, h).sum(-1)
        return out

    def density(self, sq: int, sk: int, heads: int = 1) -> float:
        """Fraction of (query, key) pairs visible, averaged over heads."""
        if sq == 0 or sk == 0:
            return 0.0
        return float(self.row_counts(sq, sk, heads).sum()) / (self.heads_of(heads) * sq * sk)

    def tile_count(self, block_m: int, block_n: int):
        """Sympy expression of the key tiles visited by query tile ``t`` (symbols t, Sq, Sk), or None.

        Counts the tiles of :meth:`key_span` (an upper bound on the non-empty tiles), for masks with a
        closed form.
        """
        return None

    def tiles_per_query_tile(self, sq: int, sk: int, block: int):
        """Key tiles a query tile visits on average, in ``block`` x ``block`` tiles (a sympy number, for cost
        models): counted on the block map, which is O(S/block) to build for structured masks; a strided mask
        is counted in the residue order its kernels run it in."""
        import sympy as sp

        for reorder in _KEY_ORDERS:
            ordered = reorder(self)
            if ordered is not None:
                return ordered.tiles_per_query_tile(sq, sk, block)
        bmap = self.block_map(sq, sk, block, block, self.heads_of(1) if not self.head_dependent else _heads_hint(self))
        return sp.Rational(int(bmap.visited().sum()), max(bmap.runs.shape[0] * bmap.runs.shape[1], 1))

    def block_map(self, sq: int, sk: int, block_m: int, block_n: int, heads: int = 1, **kw):
        """The tile runs of this mask; see :func:`attnopt.masks.blockmap.build`."""
        return build(self, sq, sk, block_m, block_n, heads, **kw)

    def draw(self, sq: int, sk: int, head: int = 0, block: tuple[int, int] | None = None) -> str:
        """Text picture: ``#`` visible, ``.`` hidden; with ``block``, the tile map (F full, p partial)."""
        return draw_text(self, sq, sk, head, block)

    def png(self, path, sq: int, sk: int, head: int = 0, block: tuple[int, int] | None = None) -> None:
        """Writes a PNG of the mask (matplotlib, imported here), tile boundaries drawn when ``block``."""
        draw_png(self, path, sq, sk, head, block)

    def __and__(self, other: "Mask") -> "Mask":
        if not isinstance(other, Mask):
            return NotImplemented
        return And(_flatten(And, (self, other)))

    def __or__(self, other: "Mask") -> "Mask":
        if not isinstance(other, Mask):
            return NotImplemented
        return Or(_flatten(Or, (self, other)))


def _heads_hint(mask: "Mask") -> int:
    """Heads to build a head-dependent map for when the caller has no head count (cost estimates)."""
    layout = getattr(mask, "layout", None)
    if layout is not None:
        return int(layout.shape[0])
    stride = getattr(mask, "stride", None)
    return int(stride) if isinstance(stride, int) else getattr(mask, "heads", None) or 1


def _flatten(kind, parts):
    out = []
    for p in parts:
        out.extend(p.parts if isinstance(p, kind) else (p,))
    return tuple(out)


class _Combination(Mask):
    """What :class:`And` and :class:`Or` share: their parts, element tests joined by ``_join``."""

    parts: tuple

    def __post_init__(self):
        if not isinstance(self.parts, tuple) or len(self.parts) < 2 or not all(isinstance(p, Mask) for p in self.parts):
            raise TypeError(f"{type(self).__name__} combines two or more masks; got {self.parts!r}")

    @property
    def traceable(self) -> bool:
        return all(p.traceable for p in self.parts)

    @property
    def shift_invariant(self) -> bool:
        return all(p.shift_invariant for p in self.parts)

    @property
    def head_dependent(self) -> bool:
        return any(p.head_dependent for p in self.parts)

    def heads_of(self, heads: int) -> int:
        return heads if any(p.heads_of(heads) > 1 for p in self.parts) else 1

    def batch_dependent(self, batch: int) -> bool:
        return any(p.batch_dependent(batch) for p in self.parts)

    def at_batch(self, b: int) -> Mask:
        return type(self)(tuple(p.at_batch(b) for p in self.parts))

    # How the parts' element tests and tile statuses (EMPTY < PARTIAL < FULL) combine: set by And and Or.
    _join: Any
    _join_status: Any

    def predicate(self, q, k, h, sq, sk, ops):
        out = self.parts[0].predicate(q, k, h, sq, sk, ops)
        for p in self.parts[1:]:
            out = self._join(out, p.predicate(q, k, h, sq, sk, ops))
        return out

    def tile_status(self, qs, qe, ks, ke, sq, sk, heads):
        out = self.parts[0].tile_status(qs, qe, ks, ke, sq, sk, heads)
        for p in self.parts[1:]:
            out = self._join_status(out, p.tile_status(qs, qe, ks, ke, sq, sk, heads))
        return out

    def residue_status(self, qs, qe, ks, ke, stride, residue, sq, sk, heads):
        out = self.parts[0].residue_status(qs, qe, ks, ke, stride, residue, sq, sk, heads)
        for p in self.parts[1:]:
            out = self._join_status(out, p.residue_status(qs, qe, ks, ke, stride, residue, sq, sk, heads))
        return out

    def check(self, sq, sk, heads):
        for p in self.parts:
            p.check(sq, sk, heads)

    def to_dict(self):
        ds = [p.to_dict() for p in self.parts]
        return None if any(d is None for d in ds) else {"type": type(self).__name__, "parts": ds}

    def digest(self):
        parts = [p.key() for p in self.parts]
        return hashlib.sha256((type(self).__name__ + "\0" + "\0".join(parts)).encode()).hexdigest()[:16]


@register_type
@dataclass(frozen=True)
class And(_Combination):
    """Keys visible under every part."""

    parts: tuple

    _join = staticmethod(lambda a, b: a & b)
    _join_status = staticmethod(torch.minimum)

    def key_span(self, qs, qe, sq, sk):
        # Part p sees keys in [lo_p, hi_p) ∪ [0, g_p); the intersection keeps [0, min g_p) as its global
        # keys, so a part with more global keys contributes the hull [0, max(hi_p, g_p)) instead.
        g = self.global_keys(sk)
        lo, hi = torch.zeros_like(qs), torch.full_like(qs, sk)
        for p in self.parts:
            a, b = p.key_span(qs, qe, sq, sk)
            gp = p.global_keys(sk)
            if gp > g:
                a, b = torch.zeros_like(a), torch.clamp(b, min=gp)
            lo, hi = torch.maximum(lo, a), torch.minimum(hi, b)
        return lo, torch.maximum(hi, lo)

    def global_keys(self, sk):
        return min(p.global_keys(sk) for p in self.parts)

    def __str__(self):
        return " & ".join(_wrap(p, Or) for p in self.parts)


@register_type
@dataclass(frozen=True)
class Or(_Combination):
    """Keys visible under any part."""

    parts: tuple

    _join = staticmethod(lambda a, b: a | b)
    _join_status = staticmethod(torch.maximum)

    def key_span(self, qs, qe, sq, sk):
        # Part p sees keys in [lo_p, hi_p) ∪ [0, g_p) ⊆ [lo_p, hi_p) ∪ [0, max g): the hull of the spans.
        spans = [p.key_span(qs, qe, sq, sk) for p in self.parts]
        return torch.stack([a for a, _ in spans]).amin(0), torch.stack([b for _, b in spans]).amax(0)

    def global_keys(self, sk):
        return max(p.global_keys(sk) for p in self.parts)

    def __str__(self):
        return " | ".join(_wrap(p, And) for p in self.parts)


def _wrap(p, kind) -> str:
    return f"({p})" if isinstance(p, kind) else str(p)


def from_dict(d: dict) -> Mask:
    """The mask described by ``d`` (the inverse of :meth:`Mask.to_dict`)."""
    if not isinstance(d, dict) or "type" not in d:
        raise ValueError(f"a mask description is a dict with a 'type'; got {d!r}")
    kind = d["type"]
    if kind in ("And", "Or"):
        return _TYPES[kind](tuple(from_dict(p) for p in d["parts"]))
    cls = _TYPES.get(kind)
    if cls is None:
        raise ValueError(f"unknown mask type {kind!r}; known: {sorted(_TYPES)}")
    kwargs = {}
    for f in fields(cls):
        if f.name in d:
            value = d[f.name]
            kwargs[f.name] = from_dict(value) if isinstance(value, dict) and "type" in value else _tuples(value)
    return cls(**kwargs)


def _tuples(value):
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def lookup(key: str) -> Mask:
    """The mask of :meth:`Mask.key` ``key``: parsed from JSON, or found in this process's registry."""
    if key.startswith("ref:"):
        with _REGISTRY_LOCK:
            mask = _REGISTRY.get(key)
        if mask is None:
            raise KeyError(f"mask {key} is not registered in this process (masks holding tensors or callables "
                           "live only in the process that made them)")  # fmt: skip
        return mask
    return _from_json(key)


_JSON_CACHE: dict[str, Mask] = {}


def _from_json(key: str) -> Mask:
    mask = _JSON_CACHE.get(key)
    if mask is None:
        mask = from_dict(json.loads(key))
        _JSON_CACHE[key] = mask
    return mask


def is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def check_int(owner: str, name: str, value, minimum: int = 0, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if not is_int(value) or value < minimum:
        what = f"an int >= {minimum}" + (" or None" if allow_none else "")
        raise ValueError(f"{owner}.{name} must be {what}; got {value!r}")


def block_pair(owner: str, block, names: str = "(block_m, block_n)") -> tuple[int, int]:
    """``block`` (an int, or a pair of ints >= 1) as a pair ``(rows, cols)``; a clear error otherwise."""
    pair = (block, block) if is_int(block) else tuple(block)
    if len(pair) != 2:
        raise ValueError(f"{owner}.block must be an int or {names}; got {block!r}")
    for b in pair:
        check_int(owner, "block", b, 1)
    return pair


def prod(xs) -> int:
    return math.prod(xs)
