"""Softmax attention (exact and sliding window) over a sequence sharded by a :class:`~.layout.Layout`.

Each local chunk ``c`` of ``L`` queries (global positions ``[cL, (c+1)L)``) sees the keys ``[lo, hi)``:
everything (no mask), ``[0, (c+1)L)`` (causal), or ``[max(0, cL - left), (c+1)L)`` (a causal sliding window
``SlidingWindow(left, 0)``). The queries of that chunk then run attnopt's own kernel on exactly that key
range, with the mask aligned bottom-right (which is the global mask restricted to the range), so each
chunk's ``(out, lse)`` is final: no partial results are left to merge.

Keys and values travel as one tensor ``[B, Hkv, S, D + Dv]``:

* causal or unmasked: one all-gather of every rank's K/V shard (``S/W · Hkv · (D + Dv)`` elements sent per
  rank); the backward sums the key gradients of every rank with one reduce-scatter;
* sliding window: only the halos, the ``left`` keys before each local chunk that live on other ranks
  (point-to-point, at most two neighbours with head-tail), and their gradients back the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from attnopt.codegen.spec import CAUSAL_BOTTOM_RIGHT, CAUSAL_NONE
from attnopt.distributed.comm import Comm
from attnopt.distributed.layout import Layout
from attnopt.masks import SlidingWindow


@dataclass(frozen=True)
class Shards:
    """The process group and the layout of the sequence on it."""

    comm: Comm
    layout: Layout


def key_range(mask: SlidingWindow | None, chunk: int, size: int, seq_len: int) -> tuple[int, int]:
    """Global key positions ``[lo, hi)`` visible to some query of ``chunk`` (chunks of ``size``)."""
    if mask is None:
        return 0, seq_len
    lo = 0 if mask.left is None else max(0, chunk * size - mask.left)
    return lo, (chunk + 1) * size


def halo_plan(shards: Shards, mask: SlidingWindow, size: int) -> list[tuple[int, int, int, int]]:
    """Every piece of key chunk held elsewhere that some rank needs: ``(needing rank, its chunk, key chunk,
    start within the key chunk)``, the same list (same order) on every rank."""
    plan = []
    layout = shards.layout
    for rank in range(layout.world):
        for c in layout.chunks_of(rank):
            lo, _ = key_range(mask, c, size, size * layout.chunks)
            plan += [(rank, c, j, max(lo - j * size, 0)) for j in range(lo // size, c)]
    return plan


def _chunks(t: Tensor, shards: Shards, rank: int) -> dict[int, Tensor]:
    """This rank's local tensor ``t`` (sequence on dim 2) as ``{global chunk: piece}``."""
    chunks = shards.layout.chunks_of(rank)
    return dict(zip(chunks, t.chunk(len(chunks), 2)))


def _fetch_halos(shards: Shards, kv: Tensor, mask: SlidingWindow, size: int) -> dict[tuple[int, int], Tensor]:
    """``{(my chunk, key chunk): keys}`` for every halo piece this rank's chunks need."""
    me, layout = shards.comm.rank, shards.layout
    mine = _chunks(kv, shards, me)
    sends, recvs, got = [], [], {}
    for rank, c, j, start in halo_plan(shards, mask, size):
        owner = layout.owner(j)[0]
        if rank == me and owner == me:
            got[(c, j)] = mine[j][:, :, start:]
        elif owner == me:
            sends.append((rank, mine[j][:, :, start:]))
        elif rank == me:
            buf = kv.new_empty((*kv.shape[:2], size - start, kv.shape[3]))
            recvs.append((owner, buf))
            got[(c, j)] = buf
    shards.comm.exchange(sends, recvs)
    return got


def _return_halos(shards: Shards, grads: dict[tuple[int, int], Tensor], dkv: Tensor, mask: SlidingWindow,
                  size: int) -> None:  # fmt: skip
    """Adds each halo piece's key gradient into its owner's ``dkv`` (this rank's local gradient, in place)."""
    me, layout = shards.comm.rank, shards.layout
    mine = _chunks(dkv, shards, me)
    sends, recvs, adds = [], [], []
    for rank, c, j, start in halo_plan(shards, mask, size):
        owner = layout.owner(j)[0]
        if rank == me and owner == me:
            adds.append((j, start, grads[(c, j)]))
        elif rank == me:
            sends.append((owner, grads[(c, j)]))
        elif owner == me:
            buf = dkv.new_empty((*dkv.shape[:2], size - start, dkv.shape[3]))
            recvs.append((rank, buf))
            adds.append((j, start, buf))
    shards.comm.exchange(sends, recvs)
    for j, start, g in adds:
        mine[j][:, :, start:] += g


def _key_ranges(shards: Shards, kv: Tensor, mask: SlidingWindow | None) -> tuple[dict, Tensor | None]:
    """``({my chunk: kv of its key range}, the gathered full kv or None)``."""
    size = kv.shape[2] // len(shards.layout.chunks_of(shards.comm.rank))
    seq_len = size * shards.layout.chunks
    mine = _chunks(kv, shards, shards.comm.rank)
    if mask is None or mask.left is None:
        full = shards.layout.to_global(shards.comm.all_gather(kv), 2)
        return {c: full[:, :, slice(*key_range(mask, c, size, seq_len))] for c in mine}, full
    halos = _fetch_halos(shards, kv, mask, size)
    ranges = {}
    for c, own in mine.items():
        pieces = [halos[(c, j)] for j in sorted(j for (cc, j) in halos if cc == c)]
        ranges[c] = torch.cat([*pieces, own], 2)
    return ranges, None


def _kernel(q, kv, d, mask, scale, softcap):
    k, v = kv[..., :d], kv[..., d:]
    if mask is not None and mask.left is not None:
        return torch.ops.attnopt.sparse_attention.default(q, k, v, None, None, mask.key(), scale, softcap)
    causal = CAUSAL_NONE if mask is None else CAUSAL_BOTTOM_RIGHT
    return torch.ops.attnopt.attention.default(q, k, v, None, 0.0, causal, scale, None, softcap)


def _kernel_backward(dout, q, kv, d, out, lse, mask, scale, softcap):
    k, v = kv[..., :d].contiguous(), kv[..., d:].contiguous()
    if mask is not None and mask.left is not None:
        return torch.ops.attnopt.sparse_attention_backward.default(dout, q, k, v, out, lse, None, None, mask.key(),
                                                                   scale, softcap)  # fmt: skip
    causal = CAUSAL_NONE if mask is None else CAUSAL_BOTTOM_RIGHT
    dq, dk, dv, _ = torch.ops.attnopt.attention_backward.default(dout, q, k, v, out, lse, None, 0.0, causal, scale,
                                                                 None, False, softcap)  # fmt: skip
    return dq, dk, dv


def forward(shards: Shards, q: Tensor, k: Tensor, v: Tensor, mask: SlidingWindow | None, scale: float,
            softcap: float) -> tuple[Tensor, Tensor]:  # fmt: skip
    """``(out, lse)`` of this rank's queries over the whole sharded sequence (local layout)."""
    ranges, _ = _key_ranges(shards, torch.cat([k, v], -1), mask)
    qs = _chunks(q, shards, shards.comm.rank)
    parts = [_kernel(qs[c].contiguous(), ranges[c], k.shape[-1], mask, scale, softcap) for c in qs]
    return torch.cat([o for o, _ in parts], 2).contiguous(), torch.cat([lse for _, lse in parts], 2).contiguous()


def backward(shards: Shards, dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
             mask: SlidingWindow | None, scale: float, softcap: float) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """``(dq, dk, dv)`` of this rank's shards: the keys' gradients summed over every rank's queries."""
    d, me = k.shape[-1], shards.comm.rank
    kv = torch.cat([k, v], -1)
    ranges, full = _key_ranges(shards, kv, mask)
    size = kv.shape[2] // len(ranges)
    pieces = {name: _chunks(t, shards, me) for name, t in (("dout", dout), ("q", q), ("out", out))}
    lses = dict(zip(shards.layout.chunks_of(me), lse.chunk(len(ranges), 2)))
    dqs, dkv_ranges = [], {}
    for c in shards.layout.chunks_of(me):
        dq, dk, dv = _kernel_backward(pieces["dout"][c].contiguous(), pieces["q"][c].contiguous(), ranges[c], d,
                                      pieces["out"][c].contiguous(), lses[c].contiguous(), mask, scale, softcap)  # fmt: skip
        dqs.append(dq)
        dkv_ranges[c] = torch.cat([dk, dv], -1)
    if full is not None:
        dkv = _reduce_ranges(shards, dkv_ranges, full, mask, size)
    else:
        dkv = torch.cat([g[:, :, -size:] for g in dkv_ranges.values()], 2).contiguous()
        halo_grads = _split_halo_grads(shards, dkv_ranges, mask, size)
        _return_halos(shards, halo_grads, dkv, mask, size)
    return torch.cat(dqs, 2).contiguous(), dkv[..., :d].contiguous(), dkv[..., d:].contiguous()


def _reduce_ranges(shards: Shards, dkv_ranges: dict, full: Tensor, mask, size: int) -> Tensor:
    """Every rank's key-range gradients summed onto the keys' owners: this rank's local ``dkv``."""
    total = torch.zeros_like(full)
    for c, g in dkv_ranges.items():
        lo, hi = key_range(mask, c, size, full.shape[2])
        total[:, :, lo:hi] += g
    return shards.comm.reduce_scatter(shards.layout.to_stacked(total, 2))


def _split_halo_grads(shards: Shards, dkv_ranges: dict, mask: SlidingWindow, size: int) -> dict:
    """``{(my chunk, key chunk): gradient}`` of the halo pieces (the key range's rows before its own chunk)."""
    grads = {}
    for rank, c, j, start in halo_plan(shards, mask, size):
        if rank != shards.comm.rank:
            continue
        lo, _ = key_range(mask, c, size, size * shards.layout.chunks)
        offset = j * size + start - lo
        grads[(c, j)] = dkv_ranges[c][:, :, offset:offset + size - start].contiguous()
    return grads
