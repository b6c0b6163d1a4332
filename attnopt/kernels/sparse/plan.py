"""The plan of a blockwise sparse call: query tiles grouped into chunks, with their padded key index lists.

Built once per call and shared by the forward and the backward of :mod:`attnopt.kernels.sparse.blockwise`
(which documents the chunking). A chunk of ``c`` query tiles that visit at most ``L`` keys materializes
about ``c · (L · per_key + per_tile)`` elements, kept under :data:`CHUNK_ELEMENTS`.
"""

from __future__ import annotations

import torch

from attnopt.masks import KIND_FULL, Mask

CHUNK_ELEMENTS = 1 << 23  # elements one chunk materializes (see blockwise._setup): 32 MiB of fp32
PAD_WASTE = 1.25  # a chunk's padded keys may exceed its useful keys by this factor


class Plan:
    """Chunks of query tiles with their padded key index lists; shared by the forward and the backward."""

    def __init__(self, mask: Mask, sq: int, sk: int, heads: int, per_key: int, per_tile: int, device, block_m, block_n,
                 head: int | None = None):  # fmt: skip
        """``head``: plan query head ``head`` alone on its own map (else every head on the merged map)."""
        self.mask, self.sq, self.sk = mask, sq, sk
        self.block_m, self.block_n = block_m, block_n
        if head is None:
            bmap = mask.block_map(sq, sk, block_m, block_n, heads, merge_heads=True, bits=False)
            self.head_ids = torch.arange(mask.heads_of(heads), device=device)
        else:
            bmap = mask.block_map(sq, sk, block_m, block_n, heads, bits=False)
            self.head_ids = torch.tensor([head], device=device)
        self.hm = self.head_ids.numel()
        self.device = device
        row_runs, row_counts = bmap.runs[0 if head is None else head], bmap.num_runs[0 if head is None else head]
        # A shift-invariant mask (a function of k - q) hides the same elements in every tile whose key
        # segments sit at the same offsets from its first row: such tiles share one element mask.
        self.shared = mask.shift_invariant
        # Per query tile: key segments [(c0, c1)] (adjacent runs merged), key count, element test needed, and
        # how many leading keys need it: for unshared masks the boundary tiles' keys come first, so the element
        # test runs on those only (full tiles are visible throughout).
        segs, counts, tested, self.tested_keys, full_segs = [], [], [], [], []
        for tile_runs, n in zip(row_runs.tolist(), row_counts.tolist()):
            parts = {True: [], False: []}  # boundary segments, full segments (all in one when shared)
            for first, end, kind in tile_runs[:n]:
                c0, c1 = first * block_n, min(end * block_n, sk)
                part = parts[self.shared or kind != KIND_FULL]
                if part and part[-1][1] == c0:
                    part[-1] = (part[-1][0], c1)
                else:
                    part.append((c0, c1))
            s = parts[True] + parts[False]
            full_segs.append(parts[False])
            test = any(kind != KIND_FULL for _, _, kind in tile_runs[:n])
            segs.append(s)
            counts.append(sum(c1 - c0 for c0, c1 in s))
            tested.append(test)
            self.tested_keys.append(sum(c1 - c0 for c0, c1 in parts[True]) if test else 0)
        self.segs, self.tested = segs, tested
        self.full_segs = full_segs  # per tile: its full key segments (the tail of ``segs``)
        self.patterns = [(tuple((c0 - t * block_m, c1 - t * block_m) for c0, c1 in s), test)
                         for t, (s, test) in enumerate(zip(segs, tested))]  # fmt: skip
        self.cache: dict = {}  # per shared pattern: its element mask and bias (computed once per call)
        self.chunks = self._chunks(counts, per_key, per_tile)

    def _chunks(self, counts, per_key: int, per_tile: int) -> list[tuple[int, int, int]]:
        """``(first tile, end tile, padded keys)`` of each chunk; tiles that visit no key are left out.

        A chunk holds full tiles only (the last, partial tile of Sq goes alone), within the padding
        allowance and the budget: ``tiles · (keys · per_key + per_tile) <= CHUNK_ELEMENTS``.
        """
        n_full = self.sq // self.block_m
        chunks, start, longest, useful = [], None, 0, 0
        for t, n in enumerate(counts + [0]):
            if start is not None:
                size = t - start + 1
                grow = max(longest, n)
                fits = (t < n_full and n > 0 and size * (grow * per_key + per_tile) <= CHUNK_ELEMENTS
                        and size * grow <= PAD_WASTE * (useful + n)
                        and (not self.shared or self.patterns[t] == self.patterns[start]))  # fmt: skip
                if fits:
                    longest, useful = grow, useful + n
                    continue
                chunks.append((start, t, longest))
                start = None
            if t < len(counts) and n > 0:
                start, longest, useful = t, n, n
                if t >= n_full:
                    chunks.append((t, t + 1, n))
                    start = None
        return chunks

    def rows(self, t0: int, t1: int) -> tuple[int, int]:
        return t0 * self.block_m, min(t1 * self.block_m, self.sq)

    def keys(self, t0: int, t1: int, length: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(idx [c, L] int64, padding [c, L] bool or None)``: the keys of tiles [t0, t1), padded to ``length``."""
        idx = torch.zeros(t1 - t0, length, dtype=torch.int64)
        padded = False
        for i, t in enumerate(range(t0, t1)):
            ranges = [torch.arange(c0, c1) for c0, c1 in self.segs[t]]
            row = torch.cat(ranges) if len(ranges) > 1 else ranges[0]
            idx[i, :row.numel()] = row
            padded |= row.numel() < length
        pad = None
        if padded:
            n = torch.tensor([sum(c1 - c0 for c0, c1 in self.segs[t]) for t in range(t0, t1)])
            pad = torch.arange(length)[None, :] >= n[:, None]
            pad = pad.to(self.device)
        return idx.to(self.device), pad

    def split(self, t0: int, t1: int) -> tuple[int, int, int | None, int] | None:
        """``(T, span, first, step)`` when tiles [t0, t1) run as two parts (the split
        chunks of :mod:`attnopt.kernels.sparse.blockwise`), else None.

        Each tile's boundary keys are the first ``tested_keys`` of its list, padded to T; its full keys the rest,
        padded to ``span``. ``first`` is not None when tile i's full keys are one segment starting at
        ``first + i·step`` and ``first + i·step + span <= Sk`` for every tile: they are then a strided view of k.
        """
        if self.shared or self.hm != 1 or not any(self.tested[t0:t1]):
            return None
        full = [(i, self.full_segs[t]) for i, t in enumerate(range(t0, t1)) if self.full_segs[t]]
        if not full:
            return None
        span = max(sum(c1 - c0 for c0, c1 in segs) for _, segs in full)
        tested = max(self.tested_keys[t0:t1])
        if any(len(segs) > 1 for _, segs in full):
            return tested, span, None, 0
        (i0, [(a0, _)]), *rest = full
        step = (rest[0][1][0][0] - a0) // (rest[0][0] - i0) if rest else 0
        first = a0 - i0 * step
        fits = step >= 0 and all(segs[0][0] == first + i * step for i, segs in rest)  # as_strided: no negative steps
        fits &= all(0 <= first + i * step and first + i * step + span <= self.sk for i in range(t1 - t0))
        return tested, span, first if fits else None, step

    def uniform(self, t0: int, t1: int) -> bool:
        """Whether tiles [t0, t1) share one element mask (see ``shared``)."""
        return self.shared and all(self.patterns[t] == self.patterns[t0] for t in range(t0, t1))

    def strided(self, t0: int, t1: int) -> int | None:
        """The first key of tile t0 when the tiles' keys are one segment each, ``block_m`` apart (else None)."""
        if not self.uniform(t0, t1) or len(self.segs[t0]) != 1:
            return None
        return self.segs[t0][0][0]

    def hidden(self, t0: int, t1: int, idx: torch.Tensor, pad: torch.Tensor | None) -> torch.Tensor | None:
        """bool [Hm, c or 1, m, L]: keys the mask hides from tiles [t0, t1) (padding included), or None."""
        if not any(self.tested[t0:t1]):
            return None if pad is None else pad[None, :, None, :]
        if self.uniform(t0, t1):
            key = ("hidden", self.patterns[t0])
            if key not in self.cache:
                self.cache[key] = self._hidden(t0, t0 + 1, idx[:1], None if pad is None else pad[:1])
            return self.cache[key]
        return self._hidden(t0, t1, idx, pad)

    def _hidden(self, t0, t1, idx, pad):
        r0, r1 = self.rows(t0, t1)
        c, length = t1 - t0, idx.shape[1]
        m = (r1 - r0) // c
        q = torch.arange(r0, r1, device=self.device).view(1, c, m, 1)
        h = self.head_ids.view(self.hm, 1, 1, 1)
        tested = max(self.tested_keys[t0:t1])  # keys past it lie in full tiles of every tile of the chunk
        keep = self.mask.allows(q, idx[None, :, None, :tested], self.sq, self.sk, h)  # [Hm, c, m, tested]
        hide = torch.zeros(keep.shape[0], c, m, length, dtype=torch.bool, device=self.device)
        hide[..., :tested] = ~keep
        return hide if pad is None else hide | pad[None, :, None, :]
