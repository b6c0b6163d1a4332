"""The exact mass of the key blocks every selection keeps, measured on a few sampled query rows.

An estimator's pooled or sketched scores are weakest exactly where attention is sharpest: next to the diagonal
(local smoothness: the keys right before a query score highest, a peak that mean pooling flattens) and on the
attention sinks. Those blocks are kept by every selection (:mod:`.select`), and their share of the mass decides
how much is left for the far blocks: underrate them and a threshold spends many far blocks on mass that is not
there; overrate them and far blocks are dropped. So the estimators that pool (``pooled``, ``lowbit``, ``lsh``)
replace their score of these *near* blocks by the exact one on ``rows`` sampled rows per query block:

* near blocks of query block ``i``: the first ``sink`` key blocks, and the ``local + 1`` key blocks ending at
  the block holding the diagonal key of its last row (with square blocks and ``local = 1``: ``i - 1`` and ``i``);
* sampled rows: ``rows`` evenly spaced rows ending at the block's last row (which sees its whole diagonal block);
* the near block's log-mass: ``log mean_r Σ_{key in block} exp(q_r · key · scale)`` under the site's causal rule,
  the same quantity the pooled scores estimate for the far blocks (``log`` of the mean row's summed ``exp``).

Work: ``O(S · rows / block_m · (sink + local + 1) · block_n · D)``, about ``rows · (sink + local + 1) / block_m``
of a block's worth of attention per query block: with 4 rows, 3 near blocks and blocks of 64, under 0.2% of
dense attention at S = 32k. No key tensor is copied when the near blocks are a shift of the query block index
(``block_m == block_n`` and ``(Sk - Sq) % block_n == 0``, the common case); else the blocks are gathered.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from attnopt.kernels.dynamic.blocks import num_blocks


def near_logmass(q, k, block_m: int, block_n: int, offset: int | None, scale: float, rows: int = 4,
                 sink: int = 1, local: int = 1) -> torch.Tensor:  # fmt: skip
    """``[B, Hq, NQ, NK]`` fp32: the near blocks' exact log-mass on sampled rows, NaN on every other block
    (q ``[B, Hq, Sq, D]``, k ``[B, Hkv, Sk, D]``, ``Hq`` a multiple of ``Hkv``)."""
    b, hq, sq, d = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    g, nq, nk = hq // hkv, num_blocks(sq, block_m), num_blocks(sk, block_n)
    dev = q.device
    spread = torch.clamp(((torch.arange(rows, device=dev) + 1) * block_m) // rows - 1, min=0)  # rows > block_m: repeats
    at = torch.clamp(torch.arange(nq, device=dev)[:, None] * block_m + spread, max=sq - 1)  # [NQ, rows]
    # Queries [NQ, B·Hkv, G·rows, D]; keys [B·Hkv, NK, bn, D] (a view of k when bn divides Sk).
    qs = q[:, :, at].float().view(b, hkv, g, nq, rows, d).permute(3, 0, 1, 2, 4, 5).reshape(nq, b * hkv, -1, d)
    kb = (k if nk * block_n == sk else F.pad(k, (0, 0, 0, nk * block_n - sk))).float().reshape(b * hkv, nk, block_n, d)
    # The band's last key block per query block, on the device and, for _scores_at to inspect without a device
    # sync (meta tensors included), on the host.
    hi, hi_host = (_band_end(sq, sk, block_m, block_n, device) for device in (dev, "cpu"))
    cols, lses = [], []
    for j in range(min(sink, nk)):  # one key block for all: one matmul
        s = torch.matmul(qs.transpose(0, 1).reshape(b * hkv, -1, d), kb[:, j].transpose(-2, -1))
        cols.append(torch.full_like(hi, j))
        lses.append(_lse(s.view(b * hkv, nq, -1, block_n).transpose(0, 1) * scale, cols[-1], at, block_n, sk, offset))
    for t in range(local + 1):
        j = hi - t  # [NQ]
        lses.append(_lse(_scores_at(qs, kb, j, hi_host - t) * scale, j, at, block_n, sk, offset))
        cols.append(torch.where(j >= sink, j, nk))  # a band block that is a sink counts once; nk: dropped
    # The mean over the sampled rows of each block's summed exp, in log space.
    lse = torch.stack(lses, -1).view(nq, b, hkv, g, rows, len(lses))
    lse = (torch.logsumexp(lse, 4) - math.log(rows)).permute(1, 2, 3, 0, 4).reshape(b, hq, nq, len(lses))
    out = torch.full((b, hq, nq, nk + 1), float("nan"), device=dev)
    return out.scatter_(-1, torch.stack(cols, -1).expand(b, hq, nq, len(cols)), lse)[..., :nk]


def _band_end(sq: int, sk: int, block_m: int, block_n: int, device) -> torch.Tensor:
    """``[NQ]``: the key block holding the diagonal key of each query block's last row (clamped to the blocks)."""
    nq, nk = num_blocks(sq, block_m), num_blocks(sk, block_n)
    last = torch.clamp(torch.arange(nq, device=device) * block_m + block_m - 1, max=sq - 1) + (sk - sq)
    return torch.clamp(torch.div(last, block_n, rounding_mode="floor"), 0, nk - 1)


def _scores_at(qs: torch.Tensor, kb: torch.Tensor, j: torch.Tensor, j_host: torch.Tensor) -> torch.Tensor:
    """``[NQ, B·Hkv, G·rows, bn]``: query block i's sampled rows against key block ``j[i]`` (``j_host``: the same
    on the host; scores of a ``j`` outside ``0 .. NK-1`` are garbage, hidden by the caller). When the valid ``j``
    run over consecutive blocks (square blocks: the common case) each (batch row, head) is one matmul on a view of
    the keys, no copy."""
    nk = kb.shape[1]
    live = torch.nonzero((j_host >= 0) & (j_host < nk)).flatten()
    i0 = int(live[0]) if len(live) else 0
    i1 = i0 + len(live)
    run = len(live) > 0 and bool((j_host[i0:i1] == j_host[i0] + torch.arange(i1 - i0)).all())
    if not run:
        return torch.matmul(qs, kb[:, j.clamp(0, nk - 1)].transpose(0, 1).transpose(-2, -1))
    out = qs.new_zeros(qs.shape[0], qs.shape[1], qs.shape[2], kb.shape[2])
    j0 = int(j_host[i0])
    for bh in range(qs.shape[1]):
        out[i0:i1, bh] = torch.matmul(qs[i0:i1, bh], kb[bh, j0:j0 + i1 - i0].transpose(-2, -1))
    return out


def _lse(s, j, at, block_n: int, sk: int, offset: int | None) -> torch.Tensor:
    """``[NQ, B·Hkv, G·rows]``: log-sum-exp over block ``j`` [NQ]'s visible keys of the sampled rows' (``at``
    [NQ, rows]) scores ``s`` [NQ, B·Hkv, G·rows, bn]; ``-inf`` where none is visible."""
    rows = at.shape[1]
    pos = j[:, None] * block_n + torch.arange(block_n, device=s.device)  # [NQ, bn]
    hidden = ((pos >= sk) | (pos < 0))[:, None, :]
    if offset is not None:
        hidden = hidden | (pos[:, None, :] > at[:, :, None] + offset)  # [NQ, rows, bn]
    s = s.view(s.shape[0], s.shape[1], -1, rows, block_n).masked_fill(hidden[:, None, None], float("-inf"))
    return torch.logsumexp(s, -1).flatten(2)


def with_near(logits: torch.Tensor, near: torch.Tensor) -> torch.Tensor:
    """An estimator's block logits with the near blocks' exact log-mass in their place."""
    return torch.where(near.isnan(), logits, near)
