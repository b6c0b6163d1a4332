"""Block lists: the run-time selection a dynamic-sparse call runs on, and the element rules every path shares.

A selection is FlexAttention's block-mask shape: for each (batch row, query head, query block)

* ``kv_num`` int32 ``[B, Hq or 1, NQ]``: how many key blocks the query block visits, and
* ``kv_idx`` int32 ``[B, Hq or 1, NQ, L]``: their indices (the first ``kv_num`` entries count; the rest is
  padding, any value), distinct within a row, ``L <= NK``.

``NQ = ceil(Sq / block_m)`` and ``NK = ceil(Sk / block_n)``. A head axis of 1 applies to every query head.
The site's own mask combines with the selection element by element: ``causal`` (the exact ops' codes: none,
top-left ``k <= q`` as SDPA's ``is_causal``, bottom-right ``k <= q + Sk - Sq``) and the key padding
``kv_valid`` (bool ``[B, Sk]``).
"""

from __future__ import annotations

import torch

from attnopt.codegen.spec import CAUSAL_BOTTOM_RIGHT, CAUSAL_NONE


def causal_offset(causal: int, sq: int, sk: int) -> int | None:
    """Key ``k`` is visible to query ``q`` when ``k <= q + offset``; None when the site is not causal."""
    if causal == CAUSAL_NONE:
        return None
    return sk - sq if causal == CAUSAL_BOTTOM_RIGHT else 0


def num_blocks(n: int, block: int) -> int:
    return -(-n // block)


def check(q, k, kv_num, kv_idx, block_m: int, block_n: int, kv_valid=None) -> None:
    """ValueError naming the problem when the selection does not fit q [B, Hq, Sq, D] and k [B, Hkv, Sk, D]."""
    b, hq, sq, _ = q.shape
    sk = k.shape[2]
    if block_m < 1 or block_n < 1:
        raise ValueError(f"block sizes must be >= 1; got block_m={block_m}, block_n={block_n}")
    nq, nk = num_blocks(sq, block_m), num_blocks(sk, block_n)
    if kv_num.dtype != torch.int32 or kv_idx.dtype != torch.int32:
        raise ValueError(f"kv_num and kv_idx must be int32; got {kv_num.dtype} and {kv_idx.dtype}")
    if kv_num.dim() != 3 or kv_num.shape[0] != b or kv_num.shape[1] not in (1, hq) or kv_num.shape[2] != nq:
        raise ValueError(f"kv_num must be [B, Hq or 1, ceil(Sq/block_m)] = [{b}, {hq} or 1, {nq}]; "
                         f"got {tuple(kv_num.shape)}")  # fmt: skip
    if kv_idx.dim() != 4 or tuple(kv_idx.shape[:3]) != tuple(kv_num.shape) or kv_idx.shape[3] > max(nk, 1):
        raise ValueError(f"kv_idx must be [*kv_num.shape, L] with L <= ceil(Sk/block_n) = {nk}; "
                         f"got {tuple(kv_idx.shape)} for kv_num {tuple(kv_num.shape)}")  # fmt: skip
    if kv_valid is not None and (kv_valid.dtype != torch.bool or tuple(kv_valid.shape) != (b, sk)):
        raise ValueError(f"kv_valid must be bool [B, Sk] = {(b, sk)}; got {kv_valid.dtype} {tuple(kv_valid.shape)}")


def dense_blocks(kv_num, kv_idx, nk: int) -> torch.Tensor:
    """bool ``[B, H, NQ, NK]``: the selected blocks (padding entries dropped)."""
    length = kv_idx.shape[-1]
    live = torch.arange(length, device=kv_idx.device) < kv_num[..., None].long()  # [B, H, NQ, L]
    out = torch.zeros(*kv_num.shape, nk + 1, dtype=torch.bool, device=kv_idx.device)
    idx = torch.where(live, kv_idx.long(), nk)  # padding lands in the spare column
    out.scatter_(-1, idx, True)
    return out[..., :nk]


def from_dense(selected: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(kv_num, kv_idx)`` of bool blocks ``[B, H, NQ, NK]``: indices ascending, ``L`` = the longest row, padding
    entries 0. A selected block's slot is the count of selected blocks before it (a cumulative sum and one
    scatter: O(NQ · NK), no sort)."""
    counts = selected.sum(-1)
    length = max(int(counts.max()) if counts.numel() else 0, 1)
    slot = torch.cumsum(selected, -1).sub_(1).masked_fill_(~selected, length)  # unselected: the spare column
    cols = torch.arange(selected.shape[-1], dtype=torch.int32, device=selected.device).expand(selected.shape)
    out = torch.zeros(*selected.shape[:-1], length + 1, dtype=torch.int32, device=selected.device)
    return counts.to(torch.int32), out.scatter_(-1, slot, cols)[..., :length].contiguous()


def visible(q_pos, k_pos, sk: int, offset: int | None) -> torch.Tensor:
    """bool, broadcast of ``q_pos`` and ``k_pos``: the site's own rule (key in range, causal ``offset``)."""
    ok = k_pos < sk
    if offset is not None:
        ok = ok & (k_pos <= q_pos + offset)
    return ok


def allowed_blocks(sq: int, sk: int, block_m: int, block_n: int, offset: int | None, device=None) -> torch.Tensor:
    """bool ``[NQ, NK]``: blocks holding at least one element the site's causal rule (``offset``) allows."""
    nq, nk = num_blocks(sq, block_m), num_blocks(sk, block_n)
    if offset is None:
        return torch.ones(nq, nk, dtype=torch.bool, device=device)
    last_q = torch.clamp(torch.arange(nq, device=device) * block_m + block_m - 1, max=sq - 1)
    first_k = torch.arange(nk, device=device) * block_n
    return first_k[None, :] <= last_q[:, None] + offset
