"""Blockwise sparse attention in plain PyTorch: the CPU implementation (and any-device fallback).

Queries are cut into tiles of ``block_m`` rows; the mask's block map (see :mod:`attnopt.masks.blockmap`)
lists the key tiles each query tile visits: one map for all heads, or, when the mask's tiles differ by
head (Strided, per-head layouts), one run per query head over that head's own map. Query tiles are grouped
into *chunks* of tiles that visit about as many keys (``L``); for a chunk of ``c`` tiles the keys of
each tile are gathered into ``[c, B·Hkv, L, D]`` (index lists padded to the chunk's longest, the
padding hidden) and one batched attention call computes the whole chunk, the tiles on the batch
axis. GQA stays native: the ``G = Hq / Hkv`` query heads of a key/value head are stacked on the row
axis (``[c, B·Hkv, G·block_m, D]``), so k and v are gathered once per key/value head.

Work is O(Sq · L): O(S · window) for a sliding window, never O(Sq · Sk); what a chunk materializes
is bounded by :data:`attnopt.kernels.sparse.plan.CHUNK_ELEMENTS` (:class:`~attnopt.kernels.sparse.plan.Plan`
makes the chunks). The element test runs only for chunks holding boundary tiles, and
only on the keys of boundary tiles (listed before those of full tiles). On the fused kernels a chunk with
both (and no padding or extra mask) runs as two calls, the boundary keys with their element mask as a bias
and the full keys with none (a strided view of k where they are one segment per tile, as a head's own keys
are in residue order), merged by their log-sum-exp (:class:`_Split`). Keys in residue order default to
narrower, taller tiles (:data:`RESIDUE_BLOCK_N`), so fewer of their keys need the element test.
For a shift-invariant mask (a sliding window: a function of k - q) tiles whose keys sit at the same
offsets share one element mask, computed once per call, and their keys are an overlapping strided
view of k and v (no gather), so the chunk costs one fused kernel call.

On CPU without a softcap each chunk runs through ATen's fused flash-attention kernels (forward and
backward) with the mask as an additive 0 / -inf bias. Otherwise the chunk is computed explicitly:
``S = softcap(scale · Q Kᵀ)`` masked to -inf, ``lse = log Σ exp S``, ``P = exp(S - lse)``, ``O = P V``;
backward ``dV = Pᵀ dO``, ``dS = P ⊙ (dO Vᵀ - rowsum(dO ⊙ O))`` (times ``1 - tanh²`` under a softcap),
``dQ = scale · dS K``, ``dK = scale · dSᵀ Q``, with dK, dV scattered back to the gathered keys.
Rows that see no key give zeros and ``lse = -inf``.
"""

from __future__ import annotations

import torch

from attnopt.kernels.layout import acc_dtype
from attnopt.kernels.sparse.plan import Plan
from attnopt.masks import Mask, ResidueOrder

BLOCK_M = 64
BLOCK_N = 64
# Keys in residue order (ResidueOrder): a key tile of n keys spans n·stride positions of the original order, so
# narrower key tiles leave more of each query tile's window pieces as full tiles (no element test), and taller
# query tiles make fewer, larger fused calls (S=8192, H8, D64, stride 8, window 256: 32 chunks, not 80).
RESIDUE_BLOCK_M = 128
RESIDUE_BLOCK_N = 32


def _check_extra(attn_mask, b, hq, sq, sk):
    if attn_mask is None:
        return None
    if attn_mask.dim() != 4 or any(n not in (1, full) for n, full in zip(attn_mask.shape, (b, hq, sq, sk))):
        raise ValueError(f"attn_mask must be 4-D and broadcast to {(b, hq, sq, sk)}; got {tuple(attn_mask.shape)}")
    return attn_mask


class _Chunk:
    """One chunk's operands, laid out ``[c, B·Hkv, rows, ·]`` (rows = G·m, the G query heads stacked)."""

    def __init__(self, plan: Plan, t0, t1, length, q5, k, v, kv_valid, attn_mask, dtype):
        b, hkv, g, _, d = q5.shape
        self.t0, self.t1 = t0, t1
        self.r0, self.r1 = plan.rows(t0, t1)
        c = t1 - t0
        m = (self.r1 - self.r0) // c
        self.shape = (c, b, hkv, g, m)
        idx, pad = plan.keys(t0, t1, length)
        self.idx = idx
        self.first_key = plan.strided(t0, t1)
        self.plan = plan
        # The element mask alone (no padding, no extra mask) of a shared pattern: its bias is cached too.
        self.shared = plan.uniform(t0, t1) and kv_valid is None and attn_mask is None
        # q rows [r0, r1) as [c, B·Hkv, G·m, D].
        self.q = self.rows(q5, dtype)
        # Keys [B, Hkv, Sk, D] -> [c, B·Hkv, L, D].
        self.k = self.gather(k, dtype)
        self.v = self.gather(v, dtype)
        # Masks as (hidden bool, additive float), each broadcasting to [c, B, Hkv, G, m, L].
        hm_hidden = plan.hidden(t0, t1, idx, pad)  # [Hm, c or 1, m, L]
        hidden = None
        if hm_hidden is not None:
            hidden = hm_hidden.permute(1, 0, 2, 3).reshape(hm_hidden.shape[1], 1, *_heads(hm_hidden.shape[0], hkv, g),
                                                           m, length)  # fmt: skip
        if kv_valid is not None:
            pv = ~kv_valid[:, idx]  # [B, c, L]
            pv = pv.permute(1, 0, 2).reshape(c, b, 1, 1, 1, length)
            hidden = pv if hidden is None else hidden | pv
        self.additive = None
        if attn_mask is not None:
            full = attn_mask.expand(attn_mask.shape[0], attn_mask.shape[1], plan.sq, plan.sk)
            extra = _gather_rows_cols(full[:, :, self.r0:self.r1], idx, c, m)  # [B|1, Hq|1, c, m, L]
            extra = extra.permute(2, 0, 1, 3, 4).reshape(c, extra.shape[0], *_heads(extra.shape[1], hkv, g), m, length)
            if extra.dtype == torch.bool:
                hidden = ~extra if hidden is None else hidden | ~extra
            else:
                self.additive = extra
        self.hidden = hidden

    def rows(self, x5: torch.Tensor, dtype) -> torch.Tensor:
        """[B, Hkv, G, Sq, ·] -> this chunk's rows as [c, B·Hkv, G·m, ·]."""
        c, b, hkv, g, m = self.shape
        x = x5[:, :, :, self.r0:self.r1].to(dtype).reshape(b, hkv, g, c, m, -1)
        return x.permute(3, 0, 1, 2, 4, 5).reshape(c, b * hkv, g * m, x.shape[-1])

    def unrows(self, x: torch.Tensor, out5: torch.Tensor) -> None:
        """Writes [c, B·Hkv, G·m, ·] back into rows [r0, r1) of ``out5`` [B, Hkv, G, Sq, ·]."""
        c, b, hkv, g, m = self.shape
        x = x.reshape(c, b, hkv, g, m, -1).permute(1, 2, 3, 0, 4, 5).reshape(b, hkv, g, c * m, -1)
        out5[:, :, :, self.r0:self.r1] = x.to(out5.dtype)

    def gather(self, x: torch.Tensor, dtype, idx: torch.Tensor | None = None) -> torch.Tensor:
        """Keys [B, Hkv, Sk, D] -> [c, B·Hkv, L, D] at ``idx`` [c, L] (default: the chunk's keys); an overlapping
        strided view for evenly spaced windows."""
        c, b, hkv, _, _ = self.shape
        idx = self.idx if idx is None else idx
        length = idx.shape[1]
        if self.first_key is not None and x.dtype == dtype and x.stride(0) == x.shape[1] * x.stride(1):
            sb, sh, sn, sd = x.stride()
            step = (self.r1 - self.r0) // c * sn
            return x.as_strided((c, b * hkv, length, x.shape[-1]), (step, sh, sn, sd), x.storage_offset()
                                + self.first_key * sn)  # fmt: skip
        g = x[:, :, idx.reshape(-1)].to(dtype)  # [B, Hkv, c·L, D]
        return g.reshape(b, hkv, c, -1, x.shape[-1]).permute(2, 0, 1, 3, 4).reshape(c, b * hkv, -1, x.shape[-1])

    def scatter_add(self, dst: torch.Tensor, src: torch.Tensor, idx: torch.Tensor | None = None) -> None:
        """``dst[:, :, idx] += src`` for dst [B, Hkv, Sk, ·], src [c, B·Hkv, L, ·] and ``idx`` [c, L] (default: the
        chunk's keys); padding adds zeros."""
        c, b, hkv, _, _ = self.shape
        src = src.reshape(c, b, hkv, -1, src.shape[-1]).permute(1, 2, 0, 3, 4).reshape(b, hkv, -1, src.shape[-1])
        dst.index_add_(2, (self.idx if idx is None else idx).reshape(-1), src.to(dst.dtype))

    def bias(self, dtype) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """``(bias, blind)``: the additive mask [c or 1, B·Hkv or 1, G·m, L] in ``dtype`` (0 / -inf, plus a
        float attn_mask) and the rows it hides entirely ([same, G·m] bool, None when none), or (None, None)."""
        if self.hidden is None and self.additive is None:
            return None, None
        key = ("bias", self.plan.patterns[self.t0], dtype)
        if self.shared and key in self.plan.cache:
            return self.plan.cache[key]
        bias = self._bias(dtype)
        blind = (bias == float("-inf")).all(-1)
        result = (bias, blind if bool(blind.any()) else None)
        if self.shared:
            self.plan.cache[key] = result
        return result

    def _bias(self, dtype) -> torch.Tensor:
        c, b, hkv, g, m = self.shape
        parts = [x for x in (self.hidden, self.additive) if x is not None]
        shape = torch.broadcast_shapes(*(x.shape for x in parts))
        if self.additive is None:  # a fresh tensor: filled in place
            out = torch.zeros(shape, dtype=dtype, device=parts[0].device).masked_fill_(self.hidden, float("-inf"))
        else:
            out = self.additive.to(dtype)
            if self.hidden is not None:
                out = out.masked_fill(self.hidden, float("-inf"))
        length, tiles = shape[-1], shape[0]
        if shape[1] == 1 and shape[2] == 1:  # same for every batch row and head: broadcast, no copy
            return out.expand(tiles, 1, 1, g, m, length).reshape(tiles, 1, g * m, length)
        return out.expand(tiles, b, hkv, g, m, length).reshape(tiles, b * hkv, g * m, length)

    def scores(self, scale: float, softcap: float):
        """Masked scores [c, B·Hkv, G·m, L] and, under a softcap, tanh(raw / cap) for the backward."""
        c, b, hkv, g, m = self.shape
        s = torch.matmul(self.q, self.k.transpose(-2, -1)) * scale
        tanh = None
        if softcap > 0.0:
            tanh = torch.tanh(s / softcap)
            s = softcap * tanh
        s6 = s.view(c, b, hkv, g, m, s.shape[-1])
        if self.additive is not None:
            s6 += self.additive.to(s.dtype)
        if self.hidden is not None:
            s6.masked_fill_(self.hidden, float("-inf"))
        return s, tanh


class _Split(_Chunk):
    """A chunk (no key padding mask, no extra mask, one element mask for all heads) run as two parts: each tile's
    boundary keys (padded to T) with the element test as an additive bias ``[c, 1, G·m, T]``, and its full keys
    (padded to ``span``) with no bias but the padding ``[c, 1, 1, span]``: a strided view of k where they are one
    evenly spaced segment per tile (in residue order a head's own keys are one contiguous range, the same for
    every tile), else gathered. The forward merges the parts by their log-sum-exp; each part's backward takes the
    merged out and lse, which makes its P and rowsum(dO ⊙ O) those of the whole row."""

    def __init__(self, plan: Plan, t0, t1, length, split, q5, k, v, dtype):
        b, hkv, g = q5.shape[:3]
        self.r0, self.r1 = plan.rows(t0, t1)
        c = t1 - t0
        m = (self.r1 - self.r0) // c
        self.shape = (c, b, hkv, g, m)
        tested, span, first, step = split
        dev = plan.device
        self.q = self.rows(q5, dtype)
        # Boundary part: keys [c, B·Hkv, T, D] gathered; hidden [c, m, T] by the element test and padding.
        n_b = torch.tensor(plan.tested_keys[t0:t1], device=dev)
        idx = plan.keys(t0, t1, length)[0]  # [c, L]: boundary keys first
        self.idx, self.first_key = idx[:, :tested], None
        self.kb, self.vb = self.gather(k, dtype), self.gather(v, dtype)
        q_pos = torch.arange(self.r0, self.r1, device=dev).view(c, m, 1)
        hide = ~plan.mask.allows(q_pos, self.idx[:, None, :], plan.sq, plan.sk, plan.head_ids[0])
        hide |= (torch.arange(tested, device=dev) >= n_b[:, None])[:, None, :]  # past the tile's boundary keys
        blind = hide.all(-1)  # [c, m]: rows that see no boundary key
        bias = torch.zeros(c, 1, 1, m, tested, dtype=dtype, device=dev).masked_fill_(hide[:, None, None], float("-inf"))
        self.bias_b = bias.expand(c, 1, g, m, tested).reshape(c, 1, g * m, tested)
        self.blind_b = blind[:, None, None].expand(c, 1, g, m).reshape(c, 1, g * m) if bool(blind.any()) else None
        # Full part: keys [c, B·Hkv, span, D], a view when evenly spaced, else gathered (positions [n_b, n) of idx).
        n_f = torch.tensor([sum(c1 - c0 for c0, c1 in plan.full_segs[t]) for t in range(t0, t1)], device=dev)
        self.first, self.step = first, step
        if first is not None and all(x.dtype == dtype and _merged_stride(x) is not None for x in (k, v)):
            self.full_idx = first + step * torch.arange(c, device=dev)[:, None] + torch.arange(span, device=dev)
            self.kf, self.vf = (_view(x, first, step, c, span) for x in (k, v))
        else:
            self.first = None
            at = (n_b[:, None] + torch.arange(span, device=dev)).clamp_(max=length - 1)  # [c, span]
            self.full_idx = torch.gather(idx, 1, at)
            self.kf, self.vf = self.gather(k, dtype, self.full_idx), self.gather(v, dtype, self.full_idx)
        self.bias_f = self.blind_f = None
        pad_f = torch.arange(span, device=dev) >= n_f[:, None]  # [c, span]
        if bool(pad_f.any()):
            self.bias_f = torch.zeros(c, 1, 1, span, dtype=dtype, device=dev).masked_fill_(
                pad_f[:, None, None], float("-inf"))
            blind_f = n_f == 0  # [c]: tiles without full keys
            if bool(blind_f.any()):
                self.blind_f = blind_f[:, None, None].expand(c, 1, g * m)

    def forward(self, scale: float, acc) -> tuple[torch.Tensor, torch.Tensor]:
        """``(out [c, B·Hkv, G·m, Dv], lse [c, B·Hkv, G·m])`` of the chunk: both parts merged."""
        o_b, lse_b = _flash(self.q, self.kb, self.vb, self.bias_b, self.blind_b, scale)
        o_f, lse_f = _flash(self.q, self.kf, self.vf, self.bias_f, self.blind_f, scale)
        lse_b, lse_f = lse_b.to(acc), lse_f.to(acc)
        lse = torch.logaddexp(lse_b, lse_f)
        finite = torch.where(lse == float("-inf"), 0.0, lse)  # rows that see no key: weights 0, out 0
        w_b = torch.exp(lse_b - finite).unsqueeze(-1)
        w_f = torch.exp(lse_f - finite).unsqueeze(-1)
        return o_b.to(acc) * w_b + o_f.to(acc) * w_f, lse

    def backward(self, do, o, lse, scale, dq, dk, dv) -> None:
        """Adds the chunk's gradients (given the merged ``o`` and ``lse``) into ``dq``, ``dk``, ``dv``."""
        flash_bwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
        db = flash_bwd(do, self.q, self.kb, self.vb, o, lse, 0.0, False, attn_mask=self.bias_b, scale=scale)
        df = flash_bwd(do, self.q, self.kf, self.vf, o, lse, 0.0, False, attn_mask=self.bias_f, scale=scale)
        self.unrows(db[0] + df[0], dq)
        self.scatter_add(dk, db[1])
        self.scatter_add(dv, db[2])
        _, b, hkv, _, _ = self.shape
        if self.first is not None and self.step == 0:  # every tile's full keys are one range: sum the tiles
            span = self.full_idx.shape[1]
            dk[:, :, self.first:self.first + span] += df[1].sum(0).reshape(b, hkv, span, -1).to(dk.dtype)
            dv[:, :, self.first:self.first + span] += df[2].sum(0).reshape(b, hkv, span, -1).to(dv.dtype)
        else:
            self.scatter_add(dk, df[1], self.full_idx)
            self.scatter_add(dv, df[2], self.full_idx)


def _view(x: torch.Tensor, first: int, step: int, c: int, span: int) -> torch.Tensor:
    """[B, Hkv, Sk, D] -> [c, B·Hkv, span, D], tile i's keys ``first + i·step + j``: a view (see _merged_stride)."""
    b, hkv, _, d = x.shape
    _, _, sn, sd = x.stride()
    return x.as_strided((c, b * hkv, span, d), (step * sn, _merged_stride(x), sn, sd), x.storage_offset() + first * sn)


def _merged_stride(x: torch.Tensor) -> int | None:
    """The stride of x's [B, Hkv] axes viewed as one B·Hkv axis, or None when they do not merge."""
    b, hkv = x.shape[:2]
    if hkv == 1:
        return x.stride(0)
    return x.stride(1) if b == 1 or x.stride(0) == hkv * x.stride(1) else None


def _flash(q, k, v, bias, blind, scale):
    """ATen's fused CPU attention ``(out, lse)``, lse -inf on the rows ``blind`` (the kernel reports 0 there)."""
    o, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, attn_mask=bias, scale=scale)
    if blind is not None:
        lse = lse.masked_fill(blind.expand_as(lse), float("-inf"))
    return o, lse


def _gather_rows_cols(rows: torch.Tensor, idx: torch.Tensor, c: int, m: int) -> torch.Tensor:
    """rows [B|1, H|1, c·m, Sk] -> [B|1, H|1, c, m, L]: tile i's rows at its own key indices ``idx[i]``."""
    r = rows.reshape(rows.shape[0], rows.shape[1], c, m, rows.shape[-1])
    index = idx.view(1, 1, c, 1, -1).expand(r.shape[0], r.shape[1], c, m, idx.shape[-1])
    return torch.gather(r, 4, index)


def _heads(h: int, hkv: int, g: int) -> tuple[int, int]:
    """How a head axis of size 1 or Hq is viewed as (Hkv, G)."""
    return (1, 1) if h == 1 else (hkv, g)


def _fused(q: torch.Tensor, softcap: float) -> bool:
    """Whether chunks run through ATen's fused CPU flash-attention kernels (they take no softcap)."""
    return (q.device.type == "cpu" and softcap == 0.0
            and hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward"))  # fmt: skip


def _setup(mask, q, k, v, block_m, block_n, fused, heads: int, head: int | None = None):
    """The plan of ``q``'s heads (query head ``head`` of ``heads`` alone, or all); the chunk budget counts what a
    chunk materializes: with the fused kernels its rows (q, out) and the element masks of unshared patterns;
    explicitly also its scores, probabilities and their gradient."""
    b, hq, sq, d = q.shape
    rows = b * hq * block_m
    per_key = (0 if mask.shift_invariant else rows) if fused else 3 * rows
    return Plan(mask, sq, k.shape[2], heads, per_key, rows * (d + v.shape[-1]), q.device, block_m, block_n, head)


def _head_groups(mask, hq: int, hkv: int):
    """``(query heads, key/value heads, head)`` slices run together: all heads on one merged map, or each query
    head on its own map (``head``) when the mask's tiles differ by head."""
    if mask.heads_of(hq) == 1:
        yield slice(0, hq), slice(0, hkv), None
        return
    g = hq // hkv
    for h in range(hq):
        yield slice(h, h + 1), slice(h // g, h // g + 1), h


def _heads_of(x, heads: slice):
    """``x`` [B, Hq or 1, ...] at query heads ``heads`` (kept when it broadcasts over heads)."""
    return x if x is None or x.shape[1] == 1 else x[:, heads]


def _sizes(q, k, v, scale):
    """``(B, Hq, Hkv, G, Sq, Sk, D, Dv, scale, accumulation dtype)``; the scale defaults to ``D ** -0.5``."""
    b, hq, sq, d = q.shape
    hkv, sk, dv = k.shape[1], k.shape[2], v.shape[-1]
    return b, hq, hkv, hq // hkv, sq, sk, d, dv, d ** -0.5 if scale is None else scale, acc_dtype(q)


def forward(q, k, v, mask: Mask, kv_valid=None, attn_mask=None, scale=None, softcap=0.0,
            block_m: int | None = None, block_n: int | None = None):  # fmt: skip
    """``(out [B, Hq, Sq, Dv] in q.dtype, lse [B, Hq, Sq] fp32, fp64 for fp64 inputs)``; see the module docstring.
    The tile shape defaults to :func:`_tiles`."""
    block_m, block_n = _tiles(mask, block_m, block_n)
    b, hq, hkv, g, sq, sk, d, dv, scale, acc = _sizes(q, k, v, scale)
    out = torch.zeros(b, hq, sq, dv, dtype=q.dtype, device=q.device)
    lse = torch.full((b, hq, sq, 1), float("-inf"), dtype=acc, device=q.device)
    if q.numel() == 0 or sk == 0:
        return out, lse.squeeze(-1)
    attn_mask = _check_extra(attn_mask, b, hq, sq, sk)
    fused = _fused(q, softcap)
    for heads, kv_heads, head in _head_groups(mask, hq, hkv):
        qh, kh, vh = q[:, heads], k[:, kv_heads], v[:, kv_heads]
        plan = _setup(mask, qh, kh, vh, block_m, block_n, fused, hq, head)
        n_kv, n_g = kh.shape[1], qh.shape[1] // kh.shape[1]
        _forward_heads(plan, qh.reshape(b, n_kv, n_g, sq, d), kh, vh, kv_valid, _heads_of(attn_mask, heads),
                       out[:, heads].view(b, n_kv, n_g, sq, dv), lse[:, heads].view(b, n_kv, n_g, sq, 1), scale,
                       softcap, fused, acc)  # fmt: skip
    return out, lse.squeeze(-1)


def _tiles(mask: Mask, block_m: int | None, block_n: int | None) -> tuple[int, int]:
    """The tile shape: as given, else ``RESIDUE_BLOCK_*`` for keys in residue order and ``BLOCK_*`` otherwise."""
    if isinstance(mask, ResidueOrder):
        return block_m or RESIDUE_BLOCK_M, block_n or RESIDUE_BLOCK_N
    return block_m or BLOCK_M, block_n or BLOCK_N


def _splits(plan, t0, t1, kv_valid, attn_mask, fused):
    """The split of chunk [t0, t1) into boundary and full keys (:meth:`Plan.split`) when it runs as a
    :class:`_Split`: on the fused kernels, with no key padding mask or extra mask; else None."""
    if not fused or kv_valid is not None or attn_mask is not None:
        return None
    return plan.split(t0, t1)


def _forward_heads(plan, q5, k, v, kv_valid, attn_mask, out5, lse5, scale, softcap, fused, acc):
    """The forward of one head group (see :func:`_head_groups`) into ``out5`` and ``lse5``, laid out [B, Hkv, G, Sq, ·]."""
    for t0, t1, length in plan.chunks:
        split = _splits(plan, t0, t1, kv_valid, attn_mask, fused)
        if split is not None:
            sp = _Split(plan, t0, t1, length, split, q5, k, v, q5.dtype)
            o, chunk_lse = sp.forward(scale, acc)
            sp.unrows(o, out5)
            sp.unrows(chunk_lse.unsqueeze(-1), lse5)
            continue
        ch = _Chunk(plan, t0, t1, length, q5, k, v, kv_valid, attn_mask, q5.dtype if fused else acc)
        if fused:
            bias, blind = ch.bias(q5.dtype)
            o, chunk_lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                ch.q, ch.k, ch.v, attn_mask=bias, scale=scale)
            if blind is not None:  # the fused kernel reports lse 0 for rows that see no key
                chunk_lse = chunk_lse.masked_fill(blind.expand_as(chunk_lse), float("-inf"))
        else:
            s, _ = ch.scores(scale, softcap)
            chunk_lse = torch.logsumexp(s, dim=-1)
            p = torch.exp(s - chunk_lse.masked_fill(chunk_lse == float("-inf"), 0.0).unsqueeze(-1))
            o = torch.matmul(p, ch.v)
        ch.unrows(o, out5)
        ch.unrows(chunk_lse.unsqueeze(-1), lse5)


def backward(dout, q, k, v, out, lse, mask: Mask, kv_valid=None, attn_mask=None, scale=None, softcap=0.0,
             block_m: int | None = None, block_n: int | None = None):  # fmt: skip
    """``(dq, dk, dv)`` of :func:`forward` (no gradient for the masks)."""
    block_m, block_n = _tiles(mask, block_m, block_n)
    b, hq, hkv, g, sq, sk, d, dv_dim, scale, acc = _sizes(q, k, v, scale)
    dq = torch.zeros(b, hkv, g, sq, d, dtype=acc, device=q.device)
    dk = torch.zeros(b, hkv, sk, d, dtype=acc, device=q.device)
    dv = torch.zeros(b, hkv, sk, dv_dim, dtype=acc, device=q.device)
    if q.numel() and sk:
        attn_mask = _check_extra(attn_mask, b, hq, sq, sk)
        fused = _fused(q, softcap)
        # Rows that see no key have lse = -inf; with 0 instead, P = exp(-inf - 0) = 0 there.
        lse = lse.masked_fill(lse == float("-inf"), 0.0).unsqueeze(-1)
        dq_h = dq.view(b, hq, sq, d)
        for heads, kv_heads, head in _head_groups(mask, hq, hkv):
            qh, kh, vh = q[:, heads], k[:, kv_heads], v[:, kv_heads]
            plan = _setup(mask, qh, kh, vh, block_m, block_n, fused, hq, head)
            grouped = (b, kh.shape[1], qh.shape[1] // kh.shape[1], sq)  # [B, heads, Sq, ·] -> [B, Hkv, G, Sq, ·]
            _backward_heads(plan, qh.reshape(*grouped, d), kh, vh, dout[:, heads].reshape(*grouped, dv_dim),
                            out[:, heads].reshape(*grouped, dv_dim), lse[:, heads].reshape(*grouped, 1), kv_valid,
                            _heads_of(attn_mask, heads), dq_h[:, heads].view(*grouped, d), dk[:, kv_heads],
                            dv[:, kv_heads], scale, softcap, fused, acc)  # fmt: skip
    return dq.reshape(b, hq, sq, d).to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def _backward_heads(plan, q5, k, v, do5, o5, lse5, kv_valid, attn_mask, dq, dk, dv, scale, softcap, fused, acc):
    """The backward of one head group: adds into ``dq`` [B, Hkv, G, Sq, D] and ``dk``, ``dv`` [B, Hkv, Sk, ·]."""
    for t0, t1, length in plan.chunks:
        dtype = q5.dtype if fused else acc
        split = _splits(plan, t0, t1, kv_valid, attn_mask, fused)
        if split is not None:
            sp = _Split(plan, t0, t1, length, split, q5, k, v, dtype)
            do, o = sp.rows(do5, dtype), sp.rows(o5, dtype)
            sp.backward(do, o, sp.rows(lse5, acc).squeeze(-1), scale, dq, dk, dv)
            continue
        ch = _Chunk(plan, t0, t1, length, q5, k, v, kv_valid, attn_mask, dtype)
        do, o = ch.rows(do5, dtype), ch.rows(o5, dtype)
        chunk_lse = ch.rows(lse5, acc).squeeze(-1)
        if fused:
            cdq, cdk, cdv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
                do, ch.q, ch.k, ch.v, o, chunk_lse, 0.0, False, attn_mask=ch.bias(q5.dtype)[0], scale=scale)
        else:
            s, tanh = ch.scores(scale, softcap)
            p = torch.exp(s - chunk_lse.unsqueeze(-1))
            cdv = torch.matmul(p.transpose(-2, -1), do)
            ds = p * (torch.matmul(do, ch.v.transpose(-2, -1)) - (do * o).sum(-1, keepdim=True))
            if tanh is not None:
                ds = ds * (1.0 - tanh * tanh)
            cdq = torch.matmul(ds, ch.k) * scale
            cdk = torch.matmul(ds.transpose(-2, -1), ch.q) * scale
        ch.unrows(cdq, dq)
        ch.scatter_add(dk, cdk)
        ch.scatter_add(dv, cdv)
