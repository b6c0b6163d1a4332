"""Block-list attention on CPU: each query block attends to its own gathered key blocks (never ``[Sq, Sk]``).

A *unit* is one (batch row, query head, query block): its ``block_m`` query rows (zero-padded past ``Sq``) and its
list of key blocks. Each list is split in two: its *full* key blocks, which every row of the query block may see
under the site's causal rule, and its *diagonal* ones, which the causal rule cuts (with ``block_m == block_n``,
one per query block). Per part, the units are sorted by their number of key blocks and cut into *chunks* of
units with about as many (no padding across heads or query blocks whose lists differ in length: with per-head
densities of 9-19% at S=32k, padding to the longest head doubled the work); a chunk's key blocks are gathered
into ``[1, c, L·block_n, D]`` (``index_select`` of whole blocks of the unit's own key/value head: GQA without
repeating k and v) and one call of ATen's fused CPU flash-attention kernel (the units on its head axis) computes
it: the full part with a per-key bias ``[1, c, 1, L·block_n]`` (0 / -inf: padding of shorter lists, keys past
``Sk``, key padding), the diagonal part with a per-element bias (the causal rule too). The two parts merge by
their log-sum-exp. What a chunk materializes is bounded by :data:`CHUNK_ELEMENTS`.

The backward takes the forward's selection (the same split, chunks and gathers), calls the fused backward kernel
on each part with the merged output and lse (which makes each part's P and rowsum(dO ⊙ O) those of the whole
row) and adds the gradients back with ``index_add_``. Rows that see no key give zeros and ``lse = -inf``.

Work is ``O(Σ selected blocks · block_m · block_n · D)``; memory is linear in ``S`` beyond the selection.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from attnopt.kernels.dynamic import native
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
    """``(num [U], idx [U, L'])`` over the units (batch row, query head, query block) flattened: the entries of
    ``idx`` [B, H, NQ, L] where ``keep``, first (stable)."""
    num = keep.sum(-1).reshape(-1)
    length = max(int(num.max()) if num.numel() else 0, 1)
    order = torch.sort((~keep).to(torch.uint8), dim=-1, stable=True).indices[..., :length]
    live = torch.arange(length) < num[:, None]
    return num, torch.where(live, torch.gather(idx, -1, order).reshape(num.numel(), length), 0)


class _Part:
    """One part (full or diagonal blocks) of every unit's list, and its chunks: units of about as many key blocks
    (sorted by count: no padding across heads or query blocks whose lists differ in length)."""

    def __init__(self, call: "_Call", num: torch.Tensor, idx: torch.Tensor, rowwise: bool):
        self.call, self.num, self.idx, self.rowwise = call, num, idx, rowwise
        units = torch.arange(num.numel())
        b_of, h_of = units // (call.hq * call.nq), units // call.nq % call.hq
        self.m_of = units % call.nq  # each unit's query block
        self.b_of = b_of
        kv_rows = (b_of * call.hkv + call.kv_head[h_of]) * call.nk  # first key block row of the unit's kv head
        self.flat = kv_rows[:, None] + idx  # [U, L]: block rows of the [B·Hkv·NK, bn, ·] views
        self.chunks = self._chunks()

    def _chunks(self) -> list[tuple[torch.Tensor, int]]:
        """``(units, L)`` of each chunk: units by descending count, within the budget and the padding allowance."""
        order = torch.sort(self.num, descending=True, stable=True).indices
        counts = self.num[order].tolist()
        call = self.call
        per_block = call.bn * (call.d + call.dv + (call.bm if self.rowwise else 1))  # per unit and key block
        chunks, start = [], 0
        while start < len(counts) and counts[start] > 0:
            longest, end, useful = counts[start], start + 1, counts[start]
            while end < len(counts) and counts[end] > 0 and (end - start + 1) * longest * per_block <= CHUNK_ELEMENTS \
                    and (end - start + 1) * longest <= PAD_WASTE * (useful + counts[end]):
                useful += counts[end]
                end += 1
            chunks.append((order[start:end], longest))
            start = end
        return chunks

    def gather(self, blocks: torch.Tensor, units: torch.Tensor, length: int) -> torch.Tensor:
        """``blocks`` [B·Hkv·NK, bn, E] -> [1, c, L·bn, E]: each unit's key blocks of this part."""
        g = blocks.index_select(0, self.flat[units, :length].reshape(-1))
        return g.view(1, units.numel(), length * self.call.bn, -1)

    def key_rows(self, units: torch.Tensor, length: int) -> torch.Tensor:
        """int64 [c·L·bn]: the rows of k [B·Hkv·NK·bn, ·] the chunk gathered (for the backward's scatter)."""
        rows = self.flat[units, :length] * self.call.bn
        return (rows[..., None] + torch.arange(self.call.bn)).reshape(-1)

    def bias(self, units: torch.Tensor, length: int, dtype) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """``(bias [1, c, bm or 1, L·bn] 0 / -inf or None, blind [1, c, bm or 1] or None)``: rows of this part that
        see no key get lse -inf (the fused kernel reports 0)."""
        call, c = self.call, units.numel()
        live = torch.arange(length) < self.num[units, None]  # [c, L]
        k_pos = (self.idx[units, :length, None] * call.bn + torch.arange(call.bn)).view(c, 1, length * call.bn)
        keep = (k_pos < call.sk) & live.repeat_interleave(call.bn, -1)[:, None, :]
        if call.kv_valid is not None:
            keep = keep & call.kv_valid[self.b_of[units, None, None], k_pos.clamp(max=call.sk - 1)]
        if self.rowwise and call.offset is not None:
            q_pos = (self.m_of[units, None] * call.bm + torch.arange(call.bm))[:, :, None]  # [c, bm, 1]
            keep = keep & visible(q_pos, k_pos, call.sk, call.offset)
        if bool(keep.all()):
            return None, None
        bias = torch.zeros(keep.shape, dtype=dtype).masked_fill_(~keep, float("-inf"))
        blind = ~keep.any(-1)
        return bias[None], blind[None] if bool(blind.any()) else None


class _Call:
    """One call's operands: blocked views and the selection split into full and diagonal parts."""

    def __init__(self, q, k, v, kv_num, kv_idx, block_m, block_n, causal, kv_valid, scale):
        self.b, self.hq, self.sq, self.d = q.shape
        self.hkv, self.sk, self.dv = k.shape[1], k.shape[2], v.shape[-1]
        self.bm, self.bn = block_m, block_n
        self.nq, self.nk = num_blocks(self.sq, block_m), num_blocks(self.sk, block_n)
        self.scale = self.d ** -0.5 if scale is None else scale
        self.offset = causal_offset(causal, self.sq, self.sk)
        self.kv_valid = kv_valid
        self.q = _pad(q, self.nq * block_m).reshape(-1, block_m, self.d)  # [U, bm, D]
        self.k = _pad(k, self.nk * block_n).reshape(-1, block_n, self.d)  # [B·Hkv·NK, bn, D]
        self.v = _pad(v, self.nk * block_n).reshape(-1, block_n, self.dv)
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

    def part_forward(self, part: _Part, units: torch.Tensor, length: int, dtype):
        bias, blind = part.bias(units, length, dtype)
        o, lse = _FWD(self.q.index_select(0, units)[None], part.gather(self.k, units, length),
                      part.gather(self.v, units, length), attn_mask=bias, scale=self.scale)  # fmt: skip
        if blind is not None:
            lse = lse.masked_fill(blind.expand_as(lse), float("-inf"))
        return o[0], lse[0]


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
    """``(out [B, Hq, Sq, Dv] in q.dtype, lse [B, Hq, Sq] fp32, fp64 for fp64 inputs)``: the native kernel when it
    takes the inputs (:func:`attnopt.kernels.dynamic.native.refusal`), else the gathering path."""
    if native.refusal(q, k, v, block_m, block_n) is None:
        return native.forward(q, k, v, kv_num, kv_idx, block_m, block_n, causal, kv_valid, scale)
    call = _Call(q, k, v, kv_num, kv_idx, block_m, block_n, causal, kv_valid, scale)
    b, hq, nq, bm = call.b, call.hq, call.nq, call.bm
    acc = acc_dtype(q)
    results = []
    for part in call.parts:  # each part into its own buffers [U, bm, ·]; units it does not visit: zeros, -inf
        out = torch.zeros(b * hq * nq, bm, call.dv, dtype=acc)
        lse = torch.full((b * hq * nq, bm), float("-inf"), dtype=acc)
        for units, length in part.chunks:
            o, chunk_lse = call.part_forward(part, units, length, q.dtype)
            out.index_copy_(0, units, o.to(acc))
            lse.index_copy_(0, units, chunk_lse.to(acc))
        results.append((out, lse))
    if not results:
        out, lse = torch.zeros(b * hq * nq, bm, call.dv, dtype=acc), torch.full((b * hq * nq, bm), float("-inf"),
                                                                                dtype=acc)  # fmt: skip
    else:
        out, lse = _merge(results, acc)
    out = out.to(q.dtype).view(b, hq, nq * bm, -1)[:, :, :call.sq]
    return out, lse.view(b, hq, nq * bm)[:, :, :call.sq]


def backward(dout, q, k, v, out, lse, kv_num, kv_idx, block_m, block_n, causal=0, kv_valid=None, scale=None):
    """``(dq, dk, dv)`` of :func:`forward`, on the forward's selection (native or gathering, as the forward)."""
    if native.refusal(q, k, v, block_m, block_n) is None:
        return native.backward(dout, q, k, v, out, lse, kv_num, kv_idx, block_m, block_n, causal, kv_valid, scale)
    call = _Call(q, k, v, kv_num, kv_idx, block_m, block_n, causal, kv_valid, scale)
    b, hq, nq, bm = call.b, call.hq, call.nq, call.bm
    acc = acc_dtype(q)
    dq = torch.zeros(b * hq * nq, bm, call.d, dtype=acc)
    dk = torch.zeros(b * call.hkv * call.nk * call.bn, call.d, dtype=acc)
    dv = torch.zeros(b * call.hkv * call.nk * call.bn, call.dv, dtype=acc)
    rows = nq * bm
    do_u = _pad(dout, rows).reshape(-1, bm, call.dv)
    o_u = _pad(out, rows).reshape(-1, bm, call.dv)
    # Rows that see no key have lse = -inf; with 0 instead, P = exp(-inf - 0) = 0 there.
    lse_u = F.pad(lse.masked_fill(lse == float("-inf"), 0.0), (0, rows - call.sq)).reshape(-1, bm).to(acc)
    for part in call.parts:
        for units, length in part.chunks:
            bias, _ = part.bias(units, length, q.dtype)
            cdq, cdk, cdv = _BWD(do_u.index_select(0, units)[None], call.q.index_select(0, units)[None],
                                 part.gather(call.k, units, length), part.gather(call.v, units, length),
                                 o_u.index_select(0, units)[None], lse_u.index_select(0, units)[None], 0.0, False,
                                 attn_mask=bias, scale=call.scale)  # fmt: skip
            dq.index_add_(0, units, cdq[0].to(acc))
            key_rows = part.key_rows(units, length)
            dk.index_add_(0, key_rows, cdk.reshape(-1, call.d).to(acc))
            dv.index_add_(0, key_rows, cdv.reshape(-1, call.dv).to(acc))
    dk = dk.view(b, call.hkv, call.nk * call.bn, -1)[:, :, :call.sk]
    dv = dv.view(b, call.hkv, call.nk * call.bn, -1)[:, :, :call.sk]
    return dq.view(b, hq, rows, -1)[:, :, :call.sq].to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
