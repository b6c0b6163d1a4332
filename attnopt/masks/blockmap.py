"""Block maps: for each query tile, the runs of key tiles it visits, without S² memory.

A :class:`BlockMap` for tiles of ``block_m`` queries by ``block_n`` keys holds, per head variant and
query tile, a short list of *runs* ``(first key tile, end key tile, kind)``: consecutive key tiles
of one kind. Kinds: :data:`KIND_FULL` (every pair visible: no element test), :data:`KIND_PARTIAL`
(the kernel evaluates the mask's predicate per element) and ``KIND_BITS + p`` (one boundary tile
whose elements are stored in ``tile_bits[p]``: masks given as Python callables have no kernel form).
Its size is O(query tiles x runs), e.g. 3 runs a tile for a sliding window and 2 for causal.

:func:`build` asks the mask for each query tile's key span (closed form), then for the status of
the candidate tiles of that span (interval arithmetic; element evaluation only for mask_mod), a
chunk of query tiles at a time, so its memory is O(chunk x span) and never O(Sq x Sk).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from attnopt.masks.status import EMPTY, FULL, PARTIAL, ceil_div

if TYPE_CHECKING:  # (a type only: the mask classes use this module)
    from attnopt.masks.base import Mask

KIND_PARTIAL = 0
KIND_FULL = 1
KIND_BITS = 2

# Elements of the status tensors evaluated at once while building (bounds the builder's memory).
_STATUS_BUDGET = 1 << 22
_CACHE_SIZE = 64
_CACHE: OrderedDict = OrderedDict()
_CACHE_LOCK = threading.Lock()


@dataclass(frozen=True, eq=False)
class BlockMap:
    """Runs of visited tiles; see the module docstring.

    ``runs`` int32 [heads, rows, max_runs, 3] (first tile, end tile, kind), unused slots empty
    (first == end); ``num_runs`` int32 [heads, rows]. Rows are query tiles, or key tiles when
    ``transposed`` (then runs list query tiles: what a key tile's backward pass visits).
    ``tile_bits`` bool [P, block_m, block_n] holds the elements of ``KIND_BITS + p`` tiles.
    """

    block_m: int
    block_n: int
    sq: int
    sk: int
    runs: torch.Tensor
    num_runs: torch.Tensor
    tile_bits: torch.Tensor | None = None
    transposed: bool = False

    @property
    def heads(self) -> int:
        return self.runs.shape[0]

    @property
    def max_runs(self) -> int:
        return self.runs.shape[2]

    def visited(self) -> torch.Tensor:
        """Tiles visited per row: int64 [heads, rows]."""
        return (self.runs[..., 1] - self.runs[..., 0]).long().sum(-1)

    def density(self) -> float:
        """Visited tiles over all tiles."""
        total = ceil_div(self.sq, self.block_m) * ceil_div(self.sk, self.block_n) * self.heads
        return float(self.visited().sum()) / max(total, 1)

    def nbytes(self) -> int:
        bits = self.tile_bits.numel() if self.tile_bits is not None else 0
        return self.runs.numel() * 4 + self.num_runs.numel() * 4 + bits

    def pairs(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Every visited tile as ``(head, row, col, kind)`` int64 vectors, sorted by head, row, col."""
        hm, rows, r, _ = self.runs.shape
        runs = self.runs.reshape(-1, 3).long()
        length = runs[:, 1] - runs[:, 0]
        keep = length > 0
        idx = torch.arange(hm * rows * r)[keep]
        runs, length = runs[keep], length[keep]
        rep = torch.repeat_interleave(torch.arange(runs.shape[0]), length)
        offset = torch.arange(rep.numel()) - torch.repeat_interleave(torch.cumsum(length, 0) - length, length)
        col = runs[rep, 0] + offset
        kind = runs[rep, 2]
        flat_row = idx[rep] // r
        return flat_row // rows, flat_row % rows, col, kind

    def transpose(self) -> "BlockMap":
        """The same tiles listed per key tile (rows) with runs of query tiles: the backward's dK/dV order."""
        h, row, col, kind = self.pairs()
        n_cols = ceil_div(self.sq if self.transposed else self.sk, self.block_m if self.transposed else self.block_n)
        order = torch.argsort((h * n_cols + col) * (row.max().item() + 1 if row.numel() else 1) + row)
        runs, num = runs_from_pairs(self.heads, n_cols, h[order], col[order], row[order], kind[order])
        return BlockMap(self.block_m, self.block_n, self.sq, self.sk, runs, num, self.tile_bits, not self.transposed)

    def to(self, device) -> "BlockMap":
        bits = self.tile_bits.to(device) if self.tile_bits is not None else None
        return BlockMap(self.block_m, self.block_n, self.sq, self.sk, self.runs.to(device), self.num_runs.to(device),
                        bits, self.transposed)  # fmt: skip

    def text(self, head: int = 0) -> str:
        """One line per row: ``F`` full, ``p`` partial (element test or stored bits), ``.`` skipped."""
        n_cols = ceil_div(self.sq, self.block_m) if self.transposed else ceil_div(self.sk, self.block_n)
        lines = []
        for row_runs, n in zip(self.runs[head].tolist(), self.num_runs[head].tolist()):
            line = ["."] * n_cols
            for first, end, kind in row_runs[:n]:
                for c in range(first, end):
                    line[c] = "F" if kind == KIND_FULL else "p"
            lines.append("".join(line))
        return "\n".join(lines)


def runs_from_pairs(hm: int, n_rows: int, h, row, col, kind) -> tuple[torch.Tensor, torch.Tensor]:
    """Runs ``[hm, n_rows, R, 3]`` and counts ``[hm, n_rows]`` (int32) of pairs sorted by (h, row, col).

    Consecutive columns of one kind merge into one run, except stored-bits tiles (one run each).
    """
    n = h.numel()
    if n == 0:
        runs = torch.zeros(hm, n_rows, 1, 3, dtype=torch.int32)
        runs[..., 2] = KIND_FULL
        return runs, torch.zeros(hm, n_rows, dtype=torch.int32)
    key = h * n_rows + row
    new_row = torch.ones(n, dtype=torch.bool)
    new_row[1:] = key[1:] != key[:-1]
    new_run = new_row.clone()
    new_run[1:] |= (col[1:] != col[:-1] + 1) | (kind[1:] != kind[:-1]) | (kind[1:] >= KIND_BITS)
    run_id = torch.cumsum(new_run, 0) - 1
    row_id = torch.cumsum(new_row, 0) - 1
    run_in_row = run_id - run_id[new_row][row_id]
    r = int(run_in_row.max()) + 1
    runs = torch.zeros(hm * n_rows, r, 3, dtype=torch.int32)
    runs[..., 2] = KIND_FULL
    starts = new_run.nonzero().squeeze(1)
    ends = torch.cat([starts[1:] - 1, torch.tensor([n - 1])])
    runs[key[starts], run_in_row[starts], 0] = col[starts].int()
    runs[key[starts], run_in_row[starts], 1] = (col[ends] + 1).int()
    runs[key[starts], run_in_row[starts], 2] = kind[starts].int()
    num = torch.zeros(hm * n_rows, dtype=torch.int32)
    num.index_add_(0, key[starts], torch.ones(starts.numel(), dtype=torch.int32))
    return runs.reshape(hm, n_rows, r, 3), num.reshape(hm, n_rows)


def _status_cost(mask: Mask, block_m: int, block_n: int) -> int:
    return 1 if mask.traceable else block_m * block_n


def build(mask: Mask, sq: int, sk: int, block_m: int, block_n: int, heads: int = 1, merge_heads: bool = False,
          bits: bool | None = None) -> BlockMap:  # fmt: skip
    """The block map of ``mask`` for ``Sq`` x ``Sk`` attention in ``block_m`` x ``block_n`` tiles.

    ``heads``: query heads (head-dependent masks get one map per head); ``merge_heads``: one map for
    all heads (a tile is FULL only if it is FULL for every head, skipped only if skipped by all);
    ``bits``: store the elements of boundary tiles (default: when the mask has no Triton form).
    Results are cached per arguments.
    """
    bits = (not mask.traceable) if bits is None else bits
    cache_key = (mask.key(), sq, sk, block_m, block_n, heads, merge_heads, bits)
    with _CACHE_LOCK:
        hit = _CACHE.get(cache_key)
        if hit is not None:
            _CACHE.move_to_end(cache_key)
            return hit
    bmap = _build(mask, sq, sk, block_m, block_n, heads, merge_heads, bits)
    with _CACHE_LOCK:
        _CACHE[cache_key] = bmap
        while len(_CACHE) > _CACHE_SIZE:
            _CACHE.popitem(last=False)
    return bmap


def _build(mask, sq, sk, block_m, block_n, heads, merge_heads, bits) -> BlockMap:
    mask.check(sq, sk, heads)
    status_heads = mask.heads_of(heads)
    if merge_heads and bits and status_heads > 1:
        raise ValueError("stored boundary tiles are per head: a head-dependent map with bits cannot merge heads")
    hm = 1 if merge_heads else status_heads
    nq, nk = ceil_div(sq, block_m), ceil_div(sk, block_n)
    if nq == 0 or nk == 0:
        runs, num = runs_from_pairs(hm, nq, *(torch.zeros(0, dtype=torch.int64),) * 4)
        return BlockMap(block_m, block_n, sq, sk, runs, num, None)
    g_tiles = ceil_div(min(mask.global_keys(sk), sk), block_n)

    qs_all = torch.arange(nq) * block_m
    qe_all = torch.clamp(qs_all + block_m, max=sq)
    lo, hi = mask.key_span(qs_all, qe_all, sq, sk)
    lo_t = torch.clamp(lo // block_n, min=g_tiles)
    hi_t = torch.maximum(torch.clamp((hi + block_n - 1) // block_n, max=nk), lo_t)
    width = int((hi_t - lo_t).max()) + g_tiles
    if width == 0:
        runs, num = runs_from_pairs(hm, nq, *(torch.zeros(0, dtype=torch.int64),) * 4)
        return BlockMap(block_m, block_n, sq, sk, runs, num, None)
    chunk = max(1, _STATUS_BUDGET // (status_heads * width * _status_cost(mask, block_m, block_n)))

    pieces, counts, all_bits = [], [], []
    n_bits = 0
    for t0 in range(0, nq, chunk):
        t1 = min(t0 + chunk, nq)
        c = t1 - t0
        cols = torch.cat([torch.arange(g_tiles).expand(c, g_tiles),
                          lo_t[t0:t1, None] + torch.arange(width - g_tiles)], dim=1)  # [C, W] fmt: skip
        valid = cols < torch.cat([torch.full((c, g_tiles), nk), hi_t[t0:t1, None].expand(c, width - g_tiles)], 1)
        cols = torch.where(valid, cols, 0)
        ks = cols * block_n
        ke = torch.clamp(ks + block_n, max=sk)
        status = mask.tile_status(qs_all[t0:t1, None], qe_all[t0:t1, None], ks, ke, sq, sk, heads)
        status = (status if status.dim() == 3 else status[None]).expand(status_heads, c, width)
        status = torch.where(valid, status, EMPTY)
        status = torch.where((ke - ks < block_n) & (status == FULL), PARTIAL, status)  # tile crosses Sk
        if merge_heads:
            status = torch.where(status.amin(0) == FULL, FULL, torch.where(status.amax(0) == EMPTY, EMPTY, PARTIAL))[None]
        h, ci, wi = status.nonzero(as_tuple=True)
        col = cols[ci, wi]
        kind = torch.where(status[h, ci, wi] == FULL, KIND_FULL, KIND_PARTIAL).long()
        if bits:
            partial = (kind == KIND_PARTIAL).nonzero().squeeze(1)
            if partial.numel():
                all_bits.append(_tile_bits(mask, h[partial], t0 + ci[partial], col[partial], block_m, block_n, sq, sk))
                kind[partial] = KIND_BITS + n_bits + torch.arange(partial.numel())
                n_bits += partial.numel()
        runs, num = runs_from_pairs(hm, c, h, ci, col, kind)
        pieces.append(runs)
        counts.append(num)
    tile_bits = torch.cat(all_bits) if all_bits else None
    return BlockMap(block_m, block_n, sq, sk, _cat_runs(pieces), torch.cat(counts, 1), tile_bits)


def _cat_runs(pieces: list[torch.Tensor]) -> torch.Tensor:
    """The runs of consecutive query-tile chunks ([H, C, R_i, 3] each) as one [H, nq, max R_i, 3] tensor; the
    padding runs (past each row's count) are empty FULL runs."""
    r = max(p.shape[2] for p in pieces)
    padded = []
    for p in pieces:
        if p.shape[2] < r:
            pad = torch.zeros(p.shape[0], p.shape[1], r - p.shape[2], 3, dtype=torch.int32)
            pad[..., 2] = KIND_FULL
            p = torch.cat([p, pad], dim=2)
        padded.append(p)
    return torch.cat(padded, 1)


def _tile_bits(mask, h, qt, kt, block_m, block_n, sq, sk) -> torch.Tensor:
    """bool [P, block_m, block_n]: the elements of P tiles (rows past Sq and columns past Sk are False)."""
    rows = (qt * block_m)[:, None, None] + torch.arange(block_m)[None, :, None]
    cols = (kt * block_n)[:, None, None] + torch.arange(block_n)[None, None, :]
    ok = mask.allows(torch.clamp(rows, max=sq - 1), torch.clamp(cols, max=sk - 1), sq, sk, h[:, None, None])
    return ok & (rows < sq) & (cols < sk)
