"""How a sequence is laid out over the ranks: contiguous, or head-tail (zigzag) for causal load balance.

The sequence of ``S`` positions is cut into ``chunks`` equal chunks of ``L = S / chunks`` positions.
Head-tail gives rank ``r`` of ``W`` the chunks ``r`` and ``2W - 1 - r``: under a causal mask, a early
chunk sees few keys and a late one many, so every rank does the same work (:func:`visible_key_tiles`).
A rank's local tensor is its chunks concatenated in that order along the sequence dimension.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from attnopt.masks import Mask
from attnopt.masks.status import EMPTY


@dataclass(frozen=True)
class Layout:
    world: int
    load_balance: bool = True

    @property
    def chunks(self) -> int:
        return 2 * self.world if self.load_balance else self.world

    def chunks_of(self, rank: int) -> tuple[int, ...]:
        """The global chunk indices rank ``rank`` holds, in local order."""
        if self.load_balance:
            return (rank, 2 * self.world - 1 - rank)
        return (rank,)

    def owner(self, chunk: int) -> tuple[int, int]:
        """``(rank, local slot)`` holding global chunk ``chunk``."""
        if not self.load_balance:
            return chunk, 0
        return (chunk, 0) if chunk < self.world else (2 * self.world - 1 - chunk, 1)

    def chunk_len(self, seq_len: int) -> int:
        if seq_len % self.chunks:
            raise ValueError(f"context parallelism over {self.world} ranks cuts the sequence into {self.chunks} "
                             f"equal chunks; {seq_len} positions do not divide: pad the sequence to a multiple "
                             f"of {self.chunks}")  # fmt: skip
        return seq_len // self.chunks

    def shard(self, t: Tensor, dim: int, rank: int) -> Tensor:
        """Rank ``rank``'s part of the full tensor ``t`` (sequence along ``dim``)."""
        self.chunk_len(t.shape[dim])
        pieces = t.chunk(self.chunks, dim)
        return torch.cat([pieces[c] for c in self.chunks_of(rank)], dim)

    def to_global(self, stacked: Tensor, dim: int) -> Tensor:
        """The full tensor from every rank's local tensor, stacked ``[world, ...]`` (``dim`` counts without it)."""
        pieces = [None] * self.chunks
        for rank in range(self.world):
            local = stacked[rank].chunk(len(self.chunks_of(rank)), dim)
            for slot, c in enumerate(self.chunks_of(rank)):
                pieces[c] = local[slot]
        return torch.cat(pieces, dim)

    def to_stacked(self, full: Tensor, dim: int) -> Tensor:
        """Inverse of :meth:`to_global`: ``[world, ...]``, each rank's local tensor."""
        return torch.stack([self.shard(full, dim, rank) for rank in range(self.world)])


def visible_key_tiles(layout: Layout, rank: int, seq_len: int, tile: int, mask: Mask) -> int:
    """How many (query tile, key tile) pairs of rank ``rank``'s queries ``mask`` leaves non-empty: the work a
    tiled kernel does for that rank (tiles of ``tile`` positions, chunks a multiple of it)."""
    size = layout.chunk_len(seq_len)
    if size % tile:
        raise ValueError(f"chunk length {size} is not a multiple of the tile {tile}")
    starts = torch.cat([torch.arange(c * size, (c + 1) * size, tile) for c in layout.chunks_of(rank)])
    ks = torch.arange(0, seq_len, tile)
    status = mask.tile_status(starts[:, None], starts[:, None] + tile, ks[None, :], ks[None, :] + tile, seq_len,
                              seq_len, 1)  # fmt: skip
    return int((status != EMPTY).sum())
