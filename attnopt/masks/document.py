"""Packed variable-length sequences: documents laid end to end, each attending only to itself
(docs/architecture.md, Masks)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from attnopt.masks.base import Mask, is_int, register_type
from attnopt.masks.status import status_of


def _lengths(name: str, value) -> tuple:
    vals = tuple(int(x) for x in value.tolist()) if isinstance(value, torch.Tensor) else value
    if isinstance(vals, list):
        vals = tuple(vals)
    if not (isinstance(vals, tuple) and vals and all(is_int(n) and n >= 0 for n in vals)):
        raise ValueError(f"Document.{name} must be a non-empty tuple of ints >= 0 (one per document); got {value!r}")
    return vals


def _bounds(lengths: tuple) -> torch.Tensor:
    """int64 [n + 1]: where each document starts, then the total (cu_seqlens)."""
    return torch.tensor((0,) + lengths, dtype=torch.int64).cumsum(0)


def lengths_of(cu_seqlens) -> tuple:
    """Per-document lengths from cumulative offsets ``[0, n0, n0 + n1, ...]`` (a list or an int tensor)."""
    cu = [int(x) for x in (cu_seqlens.tolist() if isinstance(cu_seqlens, torch.Tensor) else cu_seqlens)]
    if len(cu) < 2 or cu[0] != 0 or any(b < a for a, b in zip(cu, cu[1:])):
        raise ValueError(f"cu_seqlens must start at 0 and never decrease, with at least one document; got {cu}")
    return tuple(b - a for a, b in zip(cu, cu[1:]))


@register_type
@dataclass(frozen=True)
class Document(Mask):
    """Documents packed end to end: query i of document d sees the keys of document d only.

    ``lengths`` gives each document's number of queries; ``kv_lengths`` its number of keys (None: the same,
    self-attention). With ``causal``, each document is causal on its own, aligned bottom-right within the
    document (``flash_attn_varlen_func``'s convention; plain ``k <= q`` when the lengths agree). Query i of
    document d, key j of document d: visible when ``j - kv_end(d) <= i - end(d)``.

    Tile statuses come from the documents' boundaries in closed form (a tile pair across two documents is
    EMPTY), so the kernels never visit tiles that span documents without a shared one.
    """

    lengths: tuple
    kv_lengths: tuple | None = None
    causal: bool = False

    def __post_init__(self):
        object.__setattr__(self, "lengths", _lengths("lengths", self.lengths))
        if self.kv_lengths is not None:
            object.__setattr__(self, "kv_lengths", _lengths("kv_lengths", self.kv_lengths))
            if len(self.kv_lengths) != len(self.lengths):
                raise ValueError(f"Document: {len(self.lengths)} query lengths but {len(self.kv_lengths)} key lengths; "
                                 "give one of each per document")  # fmt: skip
        if not isinstance(self.causal, bool):
            raise ValueError(f"Document.causal must be a bool; got {self.causal!r}")

    @classmethod
    def from_cu_seqlens(cls, cu_seqlens_q, cu_seqlens_k=None, causal: bool = False) -> "Document":
        """The mask of FlashAttention's varlen offsets (``cu_seqlens``: ``[0, n0, n0 + n1, ...]``)."""
        kv = None if cu_seqlens_k is None else lengths_of(cu_seqlens_k)
        return cls(lengths_of(cu_seqlens_q), kv, causal)

    @property
    def keys(self) -> tuple:
        return self.lengths if self.kv_lengths is None else self.kv_lengths

    def check(self, sq, sk, heads):
        if sum(self.lengths) != sq or sum(self.keys) != sk:
            raise ValueError(f"Document: the documents hold {sum(self.lengths)} queries and {sum(self.keys)} keys; "
                             f"the attention has Sq={sq}, Sk={sk} (pack the sequences end to end, no padding)")  # fmt: skip

    def predicate(self, q, k, h, sq, sk, ops):
        if ops.name == "torch":  # on tensors: each position's document by binary search
            return self._same_document(q, k)
        cq, ck = _bounds(self.lengths).tolist(), _bounds(self.keys).tolist()
        out = ops.true_like(q, k)
        for a, b in zip(cq[1:-1], ck[1:-1]):  # same document: on the same side of every boundary
            out = out & ((q < a) == (k < b))
        if self.causal:
            out = out & (k - self._end_offset(q, cq, ck) <= q)
        return out

    def _same_document(self, q, k):
        """The element test on int64 position tensors (what the Triton form spells out boundary by boundary)."""
        cq, ck = _bounds(self.lengths).to(q.device), _bounds(self.keys).to(q.device)
        dq, dk = self._docs(q, cq), self._docs(k, ck)
        out = dq == dk
        if self.causal:
            d = dq.clamp(max=len(self.lengths) - 1)
            out = out & (k - (ck[d + 1] - cq[d + 1]) <= q)
        return out

    @staticmethod
    def _end_offset(q, cq, ck):
        """``kv_end(d) - end(d)`` for query ``q`` of document d: a step function of ``q``."""
        offs = [b - a for a, b in zip(cq[1:], ck[1:])]
        out = offs[0]
        for a, prev, cur in zip(cq[1:-1], offs, offs[1:]):
            if cur != prev:
                out = out + (q >= a) * (cur - prev)
        return out

    def _docs(self, x, bounds):
        """The document of each position ``x`` (int64 tensor): the last one starting at or before it."""
        return torch.searchsorted(bounds, x.contiguous(), right=True) - 1

    def tile_status(self, qs, qe, ks, ke, sq, sk, heads):
        cq, ck = _bounds(self.lengths), _bounds(self.keys)
        n = len(self.lengths)
        dq0, dq1 = self._docs(qs, cq).clamp(max=n - 1), self._docs(qe - 1, cq).clamp(max=n - 1)
        dk0, dk1 = self._docs(ks, ck).clamp(max=n - 1), self._docs(ke - 1, ck).clamp(max=n - 1)
        lo, hi = torch.maximum(dq0, dk0), torch.minimum(dq1, dk1)
        nonempty = lo <= hi
        full = (dq0 == dq1) & (dk0 == dk1) & (dq0 == dk0)
        if self.causal:
            nonempty = nonempty & (self._causal_pair(lo, qs, qe, ks, ke, cq, ck)
                                   | self._causal_pair(hi, qs, qe, ks, ke, cq, ck) | (hi - lo >= 2))  # fmt: skip
            end_off = ck[dq0 + 1] - cq[dq0 + 1]  # the document's kv_end - end, where the pair is within one
            full = full & ((ke - 1) - end_off <= qs)
        return status_of(full, nonempty)

    @staticmethod
    def _causal_pair(d, qs, qe, ks, ke, cq, ck):
        """Whether document ``d`` has a visible causal pair within the tiles (their parts inside ``d``)."""
        d = d.clamp(0, cq.numel() - 2)
        q1 = torch.minimum(qe, cq[d + 1]) - 1  # the tile's last query inside d
        k0 = torch.maximum(ks, ck[d])  # the tile's first key inside d
        inside = (q1 >= torch.maximum(qs, cq[d])) & (k0 < torch.minimum(ke, ck[d + 1]))
        return inside & (k0 - (ck[d + 1] - cq[d + 1]) <= q1)

    def key_span(self, qs, qe, sq, sk):
        cq, ck = _bounds(self.lengths), _bounds(self.keys)
        n = len(self.lengths)
        d0 = self._docs(qs, cq).clamp(0, n - 1)
        d1 = self._docs(torch.maximum(qe - 1, qs), cq).clamp(0, n - 1)
        return ck[d0], ck[d1 + 1]

    def __str__(self):
        shown = lambda xs: ",".join(map(str, xs[:6])) + (",..." if len(xs) > 6 else "")  # noqa: E731
        kv = "" if self.kv_lengths is None else f", kv_lengths={shown(self.kv_lengths)}"
        return f"Document({len(self.lengths)} docs: {shown(self.lengths)}{kv}{', causal' if self.causal else ''})"
