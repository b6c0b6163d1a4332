"""Block-list attention on CPU: each query block attends to its own gathered key blocks (never ``[Sq, Sk]``).

Queries are padded to ``NQ · block_m`` rows and viewed as ``[B, Hq, NQ, block_m, D]``; keys and values as
``[B·Hkv·NK, block_n·D]`` rows of blocks. Each (batch row, query head, query block)'s list is split in two:
its *full* key blocks, which every row of the query block may see under the site's causal rule, and its
*diagonal* ones, which the causal rule cuts (with ``block_m == block_n``, one per query block). Query blocks are
grouped into *chunks* of consecutive blocks; for a chunk of ``c`` blocks each part's key blocks are gathered
into ``[B·Hq, c, L·block_n, D]`` (``index_select`` of whole blocks; a query head reads its own key/value head:
GQA without repeating k and v) and one call of ATen's fused CPU flash-attention kernel (the chunk's blocks on its
head axis) computes it: the full part with a per-key bias ``[B·Hq, c, 1, L·block_n]`` (0 / -inf: padding of
shorter lists, keys past ``Sk``, key padding), the diagonal part with a per-element bias (the causal rule too).
The two parts merge by their log-sum-exp. What a chunk materializes is bounded by :data:`CHUNK_ELEMENTS`.

The backward takes the forward's selection (the same split, chunks and gathers), calls the fused backward kernel
on each part with the merged output and lse (which makes each part's P and rowsum(dO ⊙ O) those of the whole
row) and adds the key gradients back with ``index_add_``. Rows that see no key give zeros and ``lse = -inf``.

Work is ``O(Σ selected blocks · block_m · block_n · D)``; memory is linear in ``S`` beyond the selection.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from attnopt.kernels.dynamic.blocks import causal_offset, num_blocks, visible
from attnopt.kernels.layout import acc_dtype

CHUNK_ELEMENTS = 1 << 25  # elements a chunk materializes (gathered k and v, biases): 128 MiB of fp32, in S
# constant; fewer, larger fused calls (S=16k H8 D64, top-20 blocks, loaded 2-core box: 5.7 s, not 7.4 s, at 1 << 23)
PAD_WASTE = 1.25  # a chunk's padded key blocks may exceed its useful ones by this factor
_FWD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_BWD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


def _pad(x: torch.Tensor, n: int) -> torch.Tensor:
    """``x`` [B, H, S, D] padded with zeros to ``n`` rows."""
    return x if x.shape[2] == n else F.pad(x, (0, 0, 0, n - x.shape[2]))


def _pack(idx: torch.Tensor, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(num [B, H, NQ], idx [B, H, NQ, L'])``: the entries of ``idx`` where ``keep``, first (stable)."""
    num = keep.sum(-1)
    length = max(int(num.max()) if num.numel() else 0, 1)
    order = torch.sort((~keep).to(torch.uint8), dim=-1, stable=True).indices[..., :length]
    live = torch.arange(length) < num[..., None]
    return num, torch.where(live, torch.gather(idx, -1, order), 0)


class _Part:
    """One part (full or diagonal blocks) of every query block's list: packed indices and chunked gathers."""

    def __init__(self, call: "_Call", num: torch.Tensor, idx: torch.Tensor, rowwise: bool):
        self.call, self.num, self.idx, self.rowwise = call, num, idx, rowwise
        self.live = torch.arange(idx.shape[-1]) < num[..., None]
        base = (torch.arange(call.b)[:, None] * call.hkv + call.kv_head[None, :]) * call.nk  # [B, Hq]
        self.flat = base[:, :, None, None] + idx  # [B, Hq, NQ, L]: block rows of the [B·Hkv·NK, bn·D] views

    def longest(self) -> torch.Tensor:
        return self.num.amax((0, 1))

    def gather(self, blocks: torch.Tensor, t0: int, t1: int) -> torch.Tensor:
        """``blocks`` [B·Hkv·NK, bn·E] -> [B·Hq, c, L·bn, E]: each query block's key blocks of this part."""
        call, length = self.call, self.length(t0, t1)
        rows = self.flat[:, :, t0:t1, :length].reshape(-1)
        g = blocks.view(blocks.shape[0], call.bn, -1).index_select(0, rows)  # 3-D: faster than of flat rows
        return g.view(call.b * call.hq, t1 - t0, length * call.bn, -1)

    def length(self, t0: int, t1: int) -> int:
        return max(int(self.num[:, :, t0:t1].max()), 1)

    def key_rows(self, t0: int, t1: int) -> torch.Tensor:
        """int64 [B·Hq·c·L·bn]: the rows of k [B·Hkv·NK·bn, ·] the chunk gathered (for the backward's scatter)."""
        rows = self.flat[:, :, t0:t1, :self.length(t0, t1)] * self.call.bn
        return (rows[..., None] + torch.arange(self.call.bn)).reshape(-1)

    def bias(self, t0: int, t1: int, dtype) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """``(bias [B·Hq, c, bm or 1, L·bn] 0 / -inf or None, blind [B·Hq, c, bm or 1] or None)``: rows of this
        part that see no key get lse -inf (the fused kernel reports 0)."""
        call, c, length = self.call, t1 - t0, self.length(t0, t1)
        idx, live = self.idx[:, :, t0:t1, :length], self.live[:, :, t0:t1, :length]
        k_pos = (idx[..., None] * call.bn + torch.arange(call.bn)).reshape(call.b, call.hq, c, 1, length * call.bn)
        keep = (k_pos < call.sk) & live.repeat_interleave(call.bn, -1)[:, :, :, None, :]
        if call.kv_valid is not None:
            keep = keep & call.kv_valid[torch.arange(call.b)[:, None, None, None, None], k_pos.clamp(max=call.sk - 1)]
        if self.rowwise and call.offset is not None:
            q_pos = ((t0 + torch.arange(c))[:, None] * call.bm + torch.arange(call.bm))[None, None, :, :, None]
            keep = keep & visible(q_pos, k_pos, call.sk, call.offset)
        if bool(keep.all()):
            return None, None
        bias = torch.zeros(keep.shape, dtype=dtype).masked_fill_(~keep, float("-inf"))
        blind = ~keep.any(-1)
        n = call.b * call.hq
        return bias.view(n, c, keep.shape[3], -1), blind.view(n, c, -1) if bool(blind.any()) else None


class _Call:
    """One call's operands: blocked views, the selection split into full and diagonal parts, and the chunks."""

    def __init__(self, q, k, v, kv_num, kv_idx, block_m, block_n, causal, kv_valid, scale):
        self.b, self.hq, self.sq, self.d = q.shape
        self.hkv, self.sk, self.dv = k.shape[1], k.shape[2], v.shape[-1]
        self.bm, self.bn = block_m, block_n
        self.nq, self.nk = num_blocks(self.sq, block_m), num_blocks(self.sk, block_n)
        self.scale = self.d ** -0.5 if scale is None else scale
        self.offset = causal_offset(causal, self.sq, self.sk)
        self.kv_valid = kv_valid
        self.q = _pad(q, self.nq * block_m).view(self.b, self.hq, self.nq, block_m, self.d)
        self.k = _pad(k, self.nk * block_n).reshape(-1, block_n * self.d)
        self.v = _pad(v, self.nk * block_n).reshape(-1, block_n * self.dv)
        self.kv_head = torch.arange(self.hq) // (self.hq // self.hkv)
        shape = (self.b, self.hq, self.nq)
        num = kv_num.expand(shape).long()
        live = torch.arange(kv_idx.shape[-1]) < num[..., None]
        idx = torch.where(live, kv_idx.expand(*shape, kv_idx.shape[-1]).long(), 0)
        cut = torch.zeros_like(live)
        if self.offset is not None:  # key blocks past the first row's diagonal: the causal rule cuts them
            first_row = torch.arange(self.nq)[:, None] * block_m
            cut = (idx * block_n + block_n - 1 > first_row + self.offset) & live
        self.parts = [p for p in (_Part(self, *_pack(idx, live & ~cut), False), _Part(self, *_pack(idx, cut), True))
                      if bool(p.num.any())]  # fmt: skip
        self.chunks = self._chunks()

    def _chunks(self) -> list[tuple[int, int]]:
        """``(first block, end block)`` of each chunk: consecutive query blocks within the element budget and the
        padding allowance (blocks that visit nothing are left out)."""
        if not self.parts:
            return []
        longest = torch.stack([p.longest() for p in self.parts]).sum(0).tolist()  # key blocks per query block
        per_block = self.b * self.hq * self.bn * (self.d + self.dv + self.bm // 4)  # per query and key block
        chunks, start, size, useful = [], None, 0, 0
        for t, n in enumerate(longest + [0]):
            if start is not None:
                grow = max(size, n)
                if n > 0 and (t - start + 1) * grow * per_block <= CHUNK_ELEMENTS and \
                        (t - start + 1) * grow <= PAD_WASTE * (useful + n):
                    size, useful = grow, useful + n
                    continue
                chunks.append((start, t))
                start = None
            if n > 0:
                start, size, useful = t, n, n
        return chunks

    def rows(self, x: torch.Tensor, t0: int, t1: int) -> torch.Tensor:
        """[B, Hq, NQ, bm, ·] -> the chunk's rows [B·Hq, c, bm, ·]."""
        return x[:, :, t0:t1].reshape(self.b * self.hq, t1 - t0, self.bm, x.shape[-1])

    def part_forward(self, part: _Part, t0: int, t1: int, dtype):
        if not bool(part.num[:, :, t0:t1].any()):
            return None
        bias, blind = part.bias(t0, t1, dtype)
        o, lse = _FWD(self.rows(self.q, t0, t1), part.gather(self.k, t0, t1), part.gather(self.v, t0, t1),
                      attn_mask=bias, scale=self.scale)  # fmt: skip
        if blind is not None:
            lse = lse.masked_fill(blind.expand_as(lse), float("-inf"))
        return o, lse


def _blocked(x: torch.Tensor, call: _Call) -> torch.Tensor:
    """[B, Hq, Sq, ·] -> [B, Hq, NQ, bm, ·] (zero-padded rows)."""
    return _pad(x, call.nq * call.bm).view(call.b, call.hq, call.nq, call.bm, x.shape[-1])


def _merge(results, acc):
    """``(out, lse)`` of parts ``[(o, lse)]`` merged by their log-sum-exp (rows that see nothing: zeros, -inf)."""
    if len(results) == 1:
        return results[0][0], results[0][1].to(acc)
    (o1, l1), (o2, l2) = results
    l1, l2 = l1.to(acc), l2.to(acc)
    lse = torch.logaddexp(l1, l2)
    finite = torch.where(lse == float("-inf"), 0.0, lse)
    out = o1.to(acc) * torch.exp(l1 - finite).unsqueeze(-1) + o2.to(acc) * torch.exp(l2 - finite).unsqueeze(-1)
    return out, lse


def forward(q, k, v, kv_num, kv_idx, block_m, block_n, causal=0, kv_valid=None, scale=None):
    """``(out [B, Hq, Sq, Dv] in q.dtype, lse [B, Hq, Sq] fp32, fp64 for fp64 inputs)``."""
    call = _Call(q, k, v, kv_num, kv_idx, block_m, block_n, causal, kv_valid, scale)
    b, hq, nq, bm = call.b, call.hq, call.nq, call.bm
    acc = acc_dtype(q)
    out = torch.zeros(b, hq, nq, bm, call.dv, dtype=q.dtype)
    lse = torch.full((b, hq, nq, bm), float("-inf"), dtype=acc)
    for t0, t1 in call.chunks:
        results = [r for r in (call.part_forward(p, t0, t1, q.dtype) for p in call.parts) if r is not None]
        o, chunk_lse = _merge(results, acc)
        out[:, :, t0:t1] = o.view(b, hq, t1 - t0, bm, -1).to(q.dtype)
        lse[:, :, t0:t1] = chunk_lse.view(b, hq, t1 - t0, bm)
    return out.view(b, hq, nq * bm, -1)[:, :, :call.sq], lse.view(b, hq, nq * bm)[:, :, :call.sq]


def backward(dout, q, k, v, out, lse, kv_num, kv_idx, block_m, block_n, causal=0, kv_valid=None, scale=None):
    """``(dq, dk, dv)`` of :func:`forward`, on the forward's selection."""
    call = _Call(q, k, v, kv_num, kv_idx, block_m, block_n, causal, kv_valid, scale)
    b, hq, nq, bm = call.b, call.hq, call.nq, call.bm
    acc = acc_dtype(q)
    dq = torch.zeros(b, hq, nq, bm, call.d, dtype=acc)
    dk = torch.zeros(b * call.hkv * call.nk * call.bn, call.d, dtype=acc)
    dv = torch.zeros(b * call.hkv * call.nk * call.bn, call.dv, dtype=acc)
    do5, o5 = _blocked(dout, call), _blocked(out, call)
    # Rows that see no key have lse = -inf; with 0 instead, P = exp(-inf - 0) = 0 there.
    lse5 = _blocked(lse.masked_fill(lse == float("-inf"), 0.0).unsqueeze(-1).to(acc), call)
    for t0, t1 in call.chunks:
        do, o, chunk_lse = call.rows(do5, t0, t1), call.rows(o5, t0, t1), call.rows(lse5, t0, t1).squeeze(-1)
        for part in call.parts:
            if not bool(part.num[:, :, t0:t1].any()):
                continue
            bias, _ = part.bias(t0, t1, q.dtype)
            cdq, cdk, cdv = _BWD(do, call.rows(call.q, t0, t1), part.gather(call.k, t0, t1),
                                 part.gather(call.v, t0, t1), o, chunk_lse, 0.0, False, attn_mask=bias,
                                 scale=call.scale)  # fmt: skip
            dq[:, :, t0:t1] += cdq.view(b, hq, t1 - t0, bm, -1)
            rows = part.key_rows(t0, t1)
            dk.index_add_(0, rows, cdk.reshape(-1, call.d).to(acc))
            dv.index_add_(0, rows, cdv.reshape(-1, call.dv).to(acc))
    dk = dk.view(b, call.hkv, call.nk * call.bn, -1)[:, :, :call.sk]
    dv = dv.view(b, call.hkv, call.nk * call.bn, -1)[:, :, :call.sk]
    return dq.view(b, hq, nq * bm, -1)[:, :, :call.sq].to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
