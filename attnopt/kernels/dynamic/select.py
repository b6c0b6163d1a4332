"""From estimated block probabilities to block lists: top-k or cumulative mass, plus the blocks always kept.

``probs`` ``[B, H, NQ, NK]`` is an estimator's probability mass per (query block, key block), zero where the
site's own mask hides the whole block. Every query block keeps its *sink* blocks (the first ``sink`` key
blocks: attention sinks) and its *local* blocks (those holding the ``local · block_n`` keys before each of its
queries on the causal diagonal, aligned bottom-right, and the diagonal itself: with ``block_m == block_n`` and
``local=1``, the diagonal block and the one before), then either the ``top_k`` most probable others (of
positive mass) or the smallest set, most probable first, whose mass (the kept blocks' included) reaches
``threshold``, and every block holding at least ``(1 - threshold) / 2`` of the mass outside the kept blocks.
Blocks the site's mask hides are never selected. Work is ``O(NQ · NK · log NK)``: no ``S²`` term.
"""

from __future__ import annotations

import torch

from attnopt.kernels.dynamic.blocks import allowed_blocks, from_dense, num_blocks


def forced_blocks(sq: int, sk: int, block_m: int, block_n: int, sink: int, local: int, device=None) -> torch.Tensor:
    """bool ``[NQ, NK]``: the sink and local blocks of every query block (before the site's mask)."""
    nq, nk = num_blocks(sq, block_m), num_blocks(sk, block_n)
    cols = torch.arange(nk, device=device)[None, :]
    rows = torch.arange(nq, device=device)
    last = torch.clamp(rows * block_m + block_m - 1, max=sq - 1) + (sk - sq)  # the last row's diagonal key
    first = rows * block_m + (sk - sq)
    hi = torch.clamp(last // block_n, 0, nk - 1)[:, None]
    lo = torch.clamp(torch.div(first + 1 - local * block_n, block_n, rounding_mode="floor"), 0, nk - 1)[:, None]
    local_band = (cols >= lo) & (cols <= hi) if local > 0 else torch.zeros(nq, nk, dtype=torch.bool, device=device)
    return local_band | (cols < sink)


def select(probs: torch.Tensor, sq: int, sk: int, block_m: int, block_n: int, offset: int | None, *,
           top_k: int | None = None, threshold: float | None = None, sink: int = 1, local: int = 1):  # fmt: skip
    """``(kv_num, kv_idx)`` int32 (see :mod:`attnopt.kernels.dynamic.blocks`) from ``probs`` [B, H, NQ, NK]."""
    if (top_k is None) == (threshold is None):
        raise ValueError("give exactly one of top_k (key blocks per query block) or threshold (mass in (0, 1])")
    allowed = allowed_blocks(sq, sk, block_m, block_n, offset, probs.device)
    forced = forced_blocks(sq, sk, block_m, block_n, sink, local, probs.device) & allowed
    p = probs.masked_fill(~allowed, 0.0)
    if top_k is not None:
        k = min(int(top_k), p.shape[-1])
        score = p.masked_fill(forced, -1.0).masked_fill(~allowed, -2.0)  # kept blocks are not counted in top_k
        picked = torch.zeros_like(allowed.expand(p.shape)).scatter_(-1, score.topk(k, -1).indices, True) & (p > 0)
    else:
        # Kept blocks first (their mass counts), then the most probable until the mass reaches threshold; and any
        # block holding half the residual 1 - threshold or more of the mass outside the kept blocks (a pooled
        # estimate overrates the diagonal block, which must not hide a strong far block behind it).
        order = torch.sort(p + forced.to(p.dtype) * 2.0, dim=-1, descending=True).indices
        sorted_p = torch.gather(p, -1, order)
        before = torch.cumsum(sorted_p, -1) - sorted_p  # mass of the blocks ranked above
        picked = torch.zeros_like(allowed.expand(p.shape)).scatter_(-1, order, before < threshold)
        rest = p.masked_fill(forced, 0.0)  # the mass outside the kept blocks, renormalized
        picked |= (rest > 0) & (rest >= (1.0 - threshold) / 2 * rest.sum(-1, keepdim=True))
    return from_dense((picked | forced) & allowed)
