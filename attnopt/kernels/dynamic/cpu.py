"""Block-list attention on CPU: each query block attends to its own gathered key blocks (never ``[Sq, Sk]``).

Queries are padded to ``NQ · block_m`` rows and viewed as ``[B, Hq, NQ, block_m, D]``; keys and values as
``[B, Hkv, NK, block_n, D]``. Query blocks are grouped into *chunks* of consecutive blocks; for a chunk of
``c`` blocks that visit at most ``L`` key blocks each (over every batch row and head), the selected key blocks
of each (batch row, query head, query block) are gathered into ``[B·Hq, c, L·block_n, D]`` (a query head reads
its own key/value head: GQA without repeating k and v) and one call of ATen's fused CPU flash-attention kernel
(the chunk's blocks on its head axis) computes the chunk, with an additive 0 / -inf bias that hides the padding
entries of shorter lists, keys past ``Sk``, the site's causal rule and the key padding. What a chunk
materializes is bounded by :data:`CHUNK_ELEMENTS`. The backward takes the forward's selection (the same
chunks, the same gathers), calls the fused backward kernel and adds the key gradients back with
``index_add_``. Rows that see no key give zeros and ``lse = -inf``.

Work is ``O(Σ selected blocks · block_m · block_n · D)``; memory is linear in ``S`` beyond the selection.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from attnopt.kernels.dynamic.blocks import causal_offset, num_blocks, visible
from attnopt.kernels.layout import acc_dtype

CHUNK_ELEMENTS = 1 << 23  # elements a chunk materializes (bias, gathered k and v): 32 MiB of fp32
PAD_WASTE = 1.25  # a chunk's padded key blocks may exceed its useful ones by this factor


def _pad(x: torch.Tensor, n: int) -> torch.Tensor:
    """``x`` [B, H, S, D] padded with zeros to ``n`` rows."""
    return x if x.shape[2] == n else F.pad(x, (0, 0, 0, n - x.shape[2]))


class _Call:
    """One call's operands: blocked views, the selection broadcast to every query head, and its chunks."""

    def __init__(self, q, k, v, kv_num, kv_idx, block_m, block_n, causal, kv_valid, scale):
        self.b, self.hq, self.sq, self.d = q.shape
        self.hkv, self.sk, self.dv = k.shape[1], k.shape[2], v.shape[-1]
        self.bm, self.bn = block_m, block_n
        self.nq, self.nk = num_blocks(self.sq, block_m), num_blocks(self.sk, block_n)
        self.scale = self.d ** -0.5 if scale is None else scale
        self.offset = causal_offset(causal, self.sq, self.sk)
        self.kv_valid = kv_valid
        self.q = _pad(q, self.nq * block_m).view(self.b, self.hq, self.nq, block_m, self.d)
        self.k = _pad(k, self.nk * block_n).view(self.b, self.hkv, self.nk, block_n, self.d)
        self.v = _pad(v, self.nk * block_n).view(self.b, self.hkv, self.nk, block_n, self.dv)
        shape = (self.b, self.hq, self.nq)
        self.num = kv_num.expand(shape).long()
        live = torch.arange(kv_idx.shape[-1]) < self.num[..., None]
        self.idx = torch.where(live, kv_idx.expand(*shape, kv_idx.shape[-1]).long(), 0)  # padding reads block 0
        self.live = live
        self.kv_head = torch.arange(self.hq) // (self.hq // self.hkv)
        self.chunks = self._chunks()

    def _chunks(self) -> list[tuple[int, int, int]]:
        """``(first block, end block, L)`` of each chunk: consecutive query blocks within the element budget and
        the padding allowance (blocks that visit nothing are left out)."""
        longest = self.num.amax((0, 1)).tolist() if self.num.numel() else []
        per_block = self.b * self.hq * self.bn * (self.bm + self.d + self.dv)  # per query block and key block
        chunks, start, size, useful = [], None, 0, 0
        for t, n in enumerate(longest + [0]):
            if start is not None:
                grow = max(size, n)
                if n > 0 and (t - start + 1) * grow * per_block <= CHUNK_ELEMENTS and \
                        (t - start + 1) * grow <= PAD_WASTE * (useful + n):
                    size, useful = grow, useful + n
                    continue
                chunks.append((start, t, size))
                start = None
            if n > 0:
                start, size, useful = t, n, n
        return chunks

    def gather(self, blocks: torch.Tensor, t0: int, t1: int, length: int) -> torch.Tensor:
        """``blocks`` [B, Hkv, NK, bn, ·] -> [B·Hq, c, L·bn, ·]: each query block's selected key blocks."""
        idx = self.idx[:, :, t0:t1, :length]  # [B, Hq, c, L]
        bi = torch.arange(self.b)[:, None, None, None]
        g = blocks[bi, self.kv_head[None, :, None, None], idx]  # [B, Hq, c, L, bn, ·]
        return g.reshape(self.b * self.hq, t1 - t0, length * self.bn, blocks.shape[-1])

    def flat_keys(self, t0: int, t1: int, length: int) -> torch.Tensor:
        """int64 [B·Hq·c·L·bn]: the rows of k [B·Hkv·NK·bn, ·] the chunk gathered (for the backward's scatter)."""
        idx = self.idx[:, :, t0:t1, :length]
        base = (torch.arange(self.b)[:, None] * self.hkv + self.kv_head[None, :]) * self.nk  # [B, Hq]
        rows = (base[:, :, None, None] + idx) * self.bn
        return (rows[..., None] + torch.arange(self.bn)).reshape(-1)

    def bias(self, t0: int, t1: int, length: int, dtype) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """``(bias [B·Hq, c, bm, L·bn] 0 / -inf or None, blind [B·Hq, c, bm] rows that see no key or None)``."""
        c = t1 - t0
        idx, live = self.idx[:, :, t0:t1, :length], self.live[:, :, t0:t1, :length]
        k_pos = (idx[..., None] * self.bn + torch.arange(self.bn)).reshape(self.b, self.hq, c, 1, length * self.bn)
        q_pos = ((t0 + torch.arange(c))[:, None] * self.bm + torch.arange(self.bm))[None, None, :, :, None]
        keep = visible(q_pos, k_pos, self.sk, self.offset)  # [B, Hq, c, bm or 1, L·bn]
        keep = keep & live.repeat_interleave(self.bn, -1)[:, :, :, None, :]
        if self.kv_valid is not None:
            keep = keep & self.kv_valid[torch.arange(self.b)[:, None, None, None, None], k_pos.clamp(max=self.sk - 1)]
        if bool(keep.all()):
            return None, None
        keep = keep.expand(self.b, self.hq, c, self.bm, length * self.bn)
        bias = torch.zeros(keep.shape, dtype=dtype).masked_fill_(~keep, float("-inf"))
        blind = ~keep.any(-1)
        n = self.b * self.hq
        return bias.view(n, c, self.bm, -1), blind.view(n, c, self.bm) if bool(blind.any()) else None

    def rows(self, x: torch.Tensor, t0: int, t1: int) -> torch.Tensor:
        """[B, Hq, NQ, bm, ·] -> the chunk's rows [B·Hq, c, bm, ·]."""
        return x[:, :, t0:t1].reshape(self.b * self.hq, t1 - t0, self.bm, x.shape[-1])


def _blocked(x: torch.Tensor, call: _Call) -> torch.Tensor:
    """[B, Hq, Sq, ·] -> [B, Hq, NQ, bm, ·] (zero-padded rows)."""
    return _pad(x, call.nq * call.bm).view(call.b, call.hq, call.nq, call.bm, x.shape[-1])


def forward(q, k, v, kv_num, kv_idx, block_m, block_n, causal=0, kv_valid=None, scale=None):
    """``(out [B, Hq, Sq, Dv] in q.dtype, lse [B, Hq, Sq] fp32, fp64 for fp64 inputs)``."""
    call = _Call(q, k, v, kv_num, kv_idx, block_m, block_n, causal, kv_valid, scale)
    b, hq, nq, bm = call.b, call.hq, call.nq, call.bm
    out = torch.zeros(b, hq, nq, bm, call.dv, dtype=q.dtype)
    lse = torch.full((b, hq, nq, bm, 1), float("-inf"), dtype=acc_dtype(q))
    for t0, t1, length in call.chunks:
        bias, blind = call.bias(t0, t1, length, q.dtype)
        o, chunk_lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            call.rows(call.q, t0, t1), call.gather(call.k, t0, t1, length), call.gather(call.v, t0, t1, length),
            attn_mask=bias, scale=call.scale)  # fmt: skip
        if blind is not None:  # the fused kernel reports lse 0 (and zeros) for rows that see no key
            chunk_lse = chunk_lse.masked_fill(blind, float("-inf"))
        out[:, :, t0:t1] = o.view(b, hq, t1 - t0, bm, -1)
        lse[:, :, t0:t1] = chunk_lse.view(b, hq, t1 - t0, bm, 1).to(lse.dtype)
    return out.view(b, hq, nq * bm, -1)[:, :, :call.sq], lse.view(b, hq, nq * bm)[:, :, :call.sq]


def backward(dout, q, k, v, out, lse, kv_num, kv_idx, block_m, block_n, causal=0, kv_valid=None, scale=None):
    """``(dq, dk, dv)`` of :func:`forward`, on the forward's selection."""
    call = _Call(q, k, v, kv_num, kv_idx, block_m, block_n, causal, kv_valid, scale)
    b, hq, nq, bm = call.b, call.hq, call.nq, call.bm
    acc = acc_dtype(q)
    dq = torch.zeros(b, hq, nq, bm, call.d, dtype=q.dtype)
    dk = torch.zeros(b * call.hkv * call.nk * call.bn, call.d, dtype=acc)
    dv = torch.zeros(b * call.hkv * call.nk * call.bn, call.dv, dtype=acc)
    do5, o5 = _blocked(dout, call), _blocked(out, call)
    # Rows that see no key have lse = -inf; with 0 instead, P = exp(-inf - 0) = 0 there.
    lse5 = _blocked(lse.masked_fill(lse == float("-inf"), 0.0).unsqueeze(-1), call)
    for t0, t1, length in call.chunks:
        bias, _ = call.bias(t0, t1, length, q.dtype)
        cdq, cdk, cdv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            call.rows(do5, t0, t1), call.rows(call.q, t0, t1), call.gather(call.k, t0, t1, length),
            call.gather(call.v, t0, t1, length), call.rows(o5, t0, t1), call.rows(lse5, t0, t1).squeeze(-1).to(acc),
            0.0, False, attn_mask=bias, scale=call.scale)  # fmt: skip
        dq[:, :, t0:t1] = cdq.view(b, hq, t1 - t0, bm, -1)
        rows = call.flat_keys(t0, t1, length)
        dk.index_add_(0, rows, cdk.reshape(-1, call.d).to(acc))
        dv.index_add_(0, rows, cdv.reshape(-1, call.dv).to(acc))
    dk = dk.view(b, call.hkv, call.nk * call.bn, -1)[:, :, :call.sk]
    dv = dv.view(b, call.hkv, call.nk * call.bn, -1)[:, :, :call.sk]
    return dq.view(b, hq, nq * bm, -1)[:, :, :call.sq], dk.to(k.dtype), dv.to(v.dtype)
