r"""Exact attention on CPU in plain PyTorch ops, one block of keys at a time (FlashAttention-2's algorithm).

The forward walks the keys in blocks of :func:`block_size` columns, keeps each query row's running max ``m``
and sum ``l`` and rescales the output accumulator (the online softmax); it returns ``out`` and
``lse = m + log l``. The backward recomputes each block's probabilities from ``lse`` (``P = exp(S - lse)``)
and accumulates ``dQ``, ``dK``, ``dV`` (and the additive mask's gradient). Every tensor op is vectorized
over batch and heads; the largest temporary is one block of scores ``[B, Hq, Sq, block]``, never
``[Sq, Sk]``. It computes every feature of the exact op (see :mod:`attnopt.kernels.exact.reference` for the
semantics): masks (bool or additive, any broadcast shape), the causal alignments (key blocks and query rows
a causal mask hides entirely are skipped), softcap, GQA without repeating k and v (queries are viewed as
``[B, Hkv, group, Sq, D]``), dropout and fully masked rows (zeros, ``lse = -inf``).

Dropout draws the reference's keep-mask (``torch.rand`` of ``[B, Hq, Sq, Sk]`` from a generator seeded by
``seed``), so that the CPU op stays a pure function of its seed: only with ``dropout_p > 0`` is an
``[Sq, Sk]``-sized tensor (the bool keep-mask) allocated.

A row whose every key is hidden by a huge finite fill (``finfo.min``) averages V, and fp32 cannot hold its
``lse = m + log l``; the backward renormalizes such rows (``lse < HIDDEN_BELOW``) by their recomputed sum, as
the reference's softmax does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from attnopt.codegen.spec import CAUSAL_BOTTOM_RIGHT, CAUSAL_NONE
from attnopt.kernels.layout import HIDDEN_BELOW, acc_dtype

SCORE_BUDGET = 1 << 21  # elements of one block of scores [B, Hq, Sq, block]: 8 MiB in fp32
MIN_BLOCK, MAX_BLOCK = 32, 512


def block_size(rows: int, sk: int) -> int:
    """Keys per block: a power of two whose block of scores (``rows`` = B·Hq·Sq rows) fits ``SCORE_BUDGET``."""
    want = SCORE_BUDGET // max(rows, 1)
    size = 1 << max(int(math.log2(max(want, 1))), 0)
    return max(MIN_BLOCK, min(MAX_BLOCK, size, 1 << max(sk - 1, 0).bit_length()))


@dataclass
class _Problem:
    """One call's operands in the blockwise layout: q as [B, Hkv, G, Sq, D] in the accumulation dtype."""

    q: Tensor  # [B, Hkv, G, Sq, D]
    k: Tensor  # [B, Hkv, Sk, D]
    v: Tensor  # [B, Hkv, Sk, Dv]
    scale: float
    softcap: float
    offset: Optional[int]  # key j is visible to query i iff j <= i + offset; None without a causal mask
    additive: Optional[Tensor]  # the additive mask as [Mb, Mh, 1|G, Mq, Mk] (acc dtype), or None
    hidden: Optional[Tensor]  # ~bool mask as [Mb, Mh, 1|G, Mq, Mk], or None
    drop: Optional[Tensor]  # dropout scale (keep / (1 - p)) per element as [B, Hkv, G, Sq, Sk] bool, or None
    dropout_p: float

    @property
    def sq(self) -> int:
        return self.q.shape[3]

    @property
    def sk(self) -> int:
        return self.k.shape[2]

    def first_row(self, n0: int) -> int:
        """The first query row that sees key ``n0`` (every later row sees it too)."""
        return 0 if self.offset is None else min(max(0, n0 - self.offset), self.sq)

    def blocks(self):
        """``(n0, n1, r0)`` for each key block ``[n0, n1)`` some row ``>= r0`` sees."""
        step = block_size(self.q.shape[0] * self.q.shape[1] * self.q.shape[2] * self.sq, self.sk)
        for n0 in range(0, self.sk, step):
            r0 = self.first_row(n0)
            if r0 >= self.sq:
                return
            yield n0, min(n0 + step, self.sk), r0


def _mask5(mask: Tensor, hkv: int, group: int) -> Tensor:
    """A mask broadcasting to [B, Hq, Sq, Sk] as a 5-D view [Mb, Mh, 1|G, Mq, Mk] broadcasting to the query layout."""
    m4 = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))
    if m4.shape[1] == 1:
        return m4.unsqueeze(2)
    return m4.reshape(m4.shape[0], hkv, group, m4.shape[2], m4.shape[3])


def _rows_cols(t: Optional[Tensor], r0: int, n0: int, n1: int) -> Optional[Tensor]:
    """Rows ``r0:`` and keys ``n0:n1`` of a broadcastable 5-D tensor (dims of size 1 stay)."""
    if t is None:
        return None
    rows = slice(r0, None) if t.shape[3] > 1 else slice(None)
    cols = slice(n0, n1) if t.shape[4] > 1 else slice(None)
    return t[:, :, :, rows, cols]


def prepare(q, k, v, attn_mask, causal, scale, softcap, dropout_p, seed) -> _Problem:
    b, hq, sq, d = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    acc = acc_dtype(q)
    offset = None if causal == CAUSAL_NONE else (sk - sq if causal == CAUSAL_BOTTOM_RIGHT else 0)
    additive = hidden = drop = None
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            hidden = _mask5(~attn_mask, hkv, hq // hkv)  # on the mask's own shape
        else:
            additive = _mask5(attn_mask.to(acc), hkv, hq // hkv)
    if dropout_p > 0.0:
        drop = _dropout_keep((b, hq, sq, sk), dropout_p, seed).view(b, hkv, hq // hkv, sq, sk)
    return _Problem(q.to(acc).reshape(b, hkv, hq // hkv, sq, d), k.to(acc), v.to(acc), scale, softcap, offset,
                    additive, hidden, drop, dropout_p)


def _dropout_keep(shape, dropout_p: float, seed: Optional[Tensor]) -> Tensor:
    """The reference's dropout keep-mask for ``shape``: the same generator draws, a pure function of ``seed``."""
    if seed is None:
        raise ValueError("attention with dropout_p > 0 needs a seed tensor so that backward can replay the mask")
    gen = torch.Generator(device="cpu")
    gen.manual_seed(int(seed.item()))
    return torch.rand(shape, generator=gen) >= dropout_p


def _scores(pb: _Problem, n0: int, n1: int, r0: int) -> tuple[Tensor, Optional[Tensor]]:
    """``(s, t)``: the masked scores of rows ``r0:`` and keys ``[n0, n1)`` as [B, Hkv, G, R, n] and, with a
    softcap, ``t = tanh(scale · QKᵀ / cap)`` (for the backward)."""
    kb = pb.k[:, :, None, n0:n1]  # [B, Hkv, 1, n, D]
    s = torch.matmul(pb.q[:, :, :, r0:], kb.transpose(-2, -1))  # [B, Hkv, G, R, n]
    t = None
    if pb.softcap > 0.0:
        t = s.mul_(pb.scale / pb.softcap).tanh_()
        s = t * pb.softcap
    else:
        s.mul_(pb.scale)
    if pb.additive is not None:
        s.add_(_rows_cols(pb.additive, r0, n0, n1))
    if pb.hidden is not None:
        s.masked_fill_(_rows_cols(pb.hidden, r0, n0, n1), float("-inf"))
    if pb.offset is not None:
        diag_end = min(pb.sq, max(r0, n1 - 1 - pb.offset))  # rows >= diag_end see the whole block
        if diag_end > r0:
            i = torch.arange(r0, diag_end)[:, None]
            j = torch.arange(n0, n1)[None, :]
            s[:, :, :, : diag_end - r0].masked_fill_(j > i + pb.offset, float("-inf"))
    return s, t


def forward(q: Tensor, k: Tensor, v: Tensor, attn_mask: Optional[Tensor] = None, causal: int = CAUSAL_NONE,
            scale: float = 1.0, softcap: float = 0.0, dropout_p: float = 0.0,
            seed: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """``(out [B, Hq, Sq, Dv] in q.dtype, lse [B, Hq, Sq] fp32 or fp64)``, the reference's conventions."""
    pb = prepare(q, k, v, attn_mask, causal, scale, softcap, dropout_p, seed)
    b, hkv, g, sq, _ = pb.q.shape
    m = pb.q.new_full((b, hkv, g, sq), float("-inf"))  # running row max
    l = pb.q.new_zeros((b, hkv, g, sq))  # running row sum of exp(s - m)
    acc = pb.q.new_zeros((b, hkv, g, sq, pb.v.shape[-1]))  # running unnormalized output
    for n0, n1, r0 in pb.blocks():
        s, _ = _scores(pb, n0, n1, r0)
        m_old = m[..., r0:]
        m_new = torch.maximum(m_old, s.amax(dim=-1))
        m_safe = m_new.masked_fill(m_new == float("-inf"), 0.0)  # rows with nothing visible yet
        p = s.sub_(m_safe[..., None]).exp_()  # [B, Hkv, G, R, n]
        alpha = torch.exp(m_old - m_safe)
        l[..., r0:] = l[..., r0:] * alpha + p.sum(dim=-1)
        if pb.drop is not None:
            p = p * _rows_cols(pb.drop, r0, n0, n1) / (1.0 - pb.dropout_p)
        acc[..., r0:, :] = acc[..., r0:, :] * alpha[..., None] + torch.matmul(p, pb.v[:, :, None, n0:n1])
        m[..., r0:] = m_new
    m = m.masked_fill(m == float("-inf"), 0.0)
    out = acc / l.masked_fill(l == 0, 1.0)[..., None]  # rows without a visible key: acc = 0 -> 0
    lse = m + torch.log(l)  # log 0 = -inf for those rows
    hq = hkv * g
    return out.reshape(b, hq, sq, -1).to(q.dtype), lse.reshape(b, hq, sq)


def _row_scale(pb: _Problem, lse: Tensor) -> Optional[Tensor]:
    """1 / Σ_j exp(s - lse) for rows whose ``lse`` lost ``log l`` to a huge finite fill (``lse < HIDDEN_BELOW``),
    1 elsewhere, as [B, Hkv, G, Sq]; None when no row needs it (one pass over the keys otherwise)."""
    if pb.additive is None:
        return None
    lost = torch.isfinite(lse) & (lse < HIDDEN_BELOW)
    if not bool(lost.any()):
        return None
    total = torch.zeros_like(lse)
    for n0, n1, r0 in pb.blocks():
        s, _ = _scores(pb, n0, n1, r0)
        total[..., r0:] += s.sub_(lse[..., r0:, None]).exp_().sum(dim=-1)
    return torch.where(lost, 1.0 / total, torch.ones_like(total))


def _reduce_to(t: Tensor, shape) -> Tensor:
    """Sums ``t`` over the dims where ``shape`` (same rank) has size 1."""
    dims = tuple(i for i, n in enumerate(shape) if n == 1 and t.shape[i] != 1)
    return t.sum(dim=dims, keepdim=True) if dims else t


def _merge_group(t: Tensor) -> Tensor:
    """[B, Hkv, G, R, X] -> [B, Hkv, G·R, X] (a copy only when the rows are a strided slice)."""
    b, hkv, g, r, x = t.shape
    return t.reshape(b, hkv, g * r, x)


def backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
             attn_mask: Optional[Tensor] = None, causal: int = CAUSAL_NONE, scale: float = 1.0, softcap: float = 0.0,
             dropout_p: float = 0.0, seed: Optional[Tensor] = None,
             mask_grad: bool = False) -> tuple[Tensor, Tensor, Tensor, Optional[Tensor]]:
    """``(dq, dk, dv, dmask)`` of :func:`forward` from its ``out`` and ``lse``; ``dmask`` (the additive mask's
    gradient, in its own shape and dtype) is None unless ``mask_grad``."""
    pb = prepare(q, k, v, attn_mask, causal, scale, softcap, dropout_p, seed)
    b, hkv, g, sq, _ = pb.q.shape
    acc = pb.q.dtype
    lse5 = lse.to(acc).reshape(b, hkv, g, sq)
    row_scale = _row_scale(pb, lse5)
    lse5 = lse5.masked_fill(lse5 == float("-inf"), float("inf"))  # rows without a visible key: P = 0
    do5 = dout.to(acc).reshape(b, hkv, g, sq, -1)
    delta = (do5 * out.to(acc).reshape(do5.shape)).sum(dim=-1)  # [B, Hkv, G, Sq]
    dq, dk, dv = torch.zeros_like(pb.q), torch.zeros_like(pb.k), torch.zeros_like(pb.v)
    dmask = torch.zeros_like(pb.additive) if mask_grad else None
    for n0, n1, r0 in pb.blocks():
        s, t = _scores(pb, n0, n1, r0)
        p = s.sub_(lse5[..., r0:, None]).exp_()  # [B, Hkv, G, R, n]
        if row_scale is not None:
            p.mul_(row_scale[..., r0:, None])
        dp = torch.matmul(do5[:, :, :, r0:], pb.v[:, :, None, n0:n1].transpose(-2, -1))  # [B, Hkv, G, R, n]
        pd = p
        if pb.drop is not None:
            keep = _rows_cols(pb.drop, r0, n0, n1) / (1.0 - dropout_p)
            pd, dp = p * keep, dp.mul_(keep)
        dv[:, :, n0:n1] += torch.matmul(_merge_group(pd).transpose(-2, -1), _merge_group(do5[:, :, :, r0:]))
        ds = dp.sub_(delta[..., r0:, None]).mul_(p)  # dS = P (dP - delta)
        if dmask is not None:
            _rows_cols(dmask, r0, n0, n1).add_(_reduce_to(ds, _rows_cols(dmask, r0, n0, n1).shape))
        if t is not None:
            ds.mul_(1.0 - t * t)
        dq[:, :, :, r0:] += torch.matmul(ds, pb.k[:, :, None, n0:n1])
        dk[:, :, n0:n1] += torch.matmul(_merge_group(ds).transpose(-2, -1), _merge_group(pb.q[:, :, :, r0:]))
    hq = hkv * g
    dq = (dq * scale).reshape(b, hq, sq, -1).to(q.dtype)
    if dmask is not None:
        dmask = dmask.reshape(attn_mask.shape).to(attn_mask.dtype)
    return dq, (dk * scale).to(k.dtype), dv.to(v.dtype), dmask
