r"""Attention with a traced score_mod in torch ops, tile by tile (any device; the CPU path).

The online softmax of :mod:`attnopt.kernels.exact.cpu_blockwise`, with each score tile passed through the
expression (:func:`attnopt.kernels.exact.score_trace.evaluate`) on broadcast index tensors: the largest
temporaries are tiles ``[B, Hq, rows, cols]``, never ``[Sq, Sk]``. Queries are viewed ``[B, Hkv, G, Sq, D]``
against keys ``[B, Hkv, 1, Sk, D]``, so GQA repeats neither k nor v.

For one element, with ``y = mod(scale · q·k)`` (``-inf`` beyond the causal diagonal) and ``P = exp(y - lse)``::

    dS = P ∘ (dP - delta),   dP = dO Vᵀ,   delta = rowsum(dO ∘ O)
    dscore = dS ∘ mod'(score)     (0 where P = 0)
    dQ = scale · dscore K,   dK = scale · dscoreᵀ Q,   dV = Pᵀ dO

``mod'`` is the expression's derivative (:meth:`~attnopt.codegen.score_expr.ScoreExpr.gradient`), the one the
kernels compute. A captured tensor that needs a gradient gets, from each ``load`` of it, ``dS ∘ d mod / d load``
added at the loaded index (``index_put_`` with accumulation), summed over the tiles.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from attnopt.codegen.score_expr import ScoreExpr
from attnopt.kernels.exact.cpu_blockwise import tile_size
from attnopt.kernels.exact.score_trace import evaluate
from attnopt.kernels.layout import acc_dtype


class _Tiles:
    """One call's operands in the grouped layout, in the accumulation dtype, and its tile loops."""

    def __init__(self, q: Tensor, k: Tensor, v: Tensor, scale: float, causal_offset: Optional[int]):
        b, hq, sq, d = q.shape
        hkv, sk = k.shape[1], k.shape[2]
        self.dtype = acc_dtype(q)
        self.shape = (b, hq, hkv, hq // hkv, sq, sk)
        self.q = q.to(self.dtype).reshape(b, hkv, hq // hkv, sq, d)  # [B, Hkv, G, Sq, D]
        self.k = k.to(self.dtype)[:, :, None]  # [B, Hkv, 1, Sk, D]
        self.v = v.to(self.dtype)[:, :, None]  # [B, Hkv, 1, Sk, Dv]
        self.scale, self.offset = scale, causal_offset
        self.rows, self.cols = tile_size(b * hq, sq, sk)
        dev = q.device
        self.b_idx = torch.arange(b, device=dev, dtype=torch.int32).view(b, 1, 1, 1)
        self.h_idx = torch.arange(hq, device=dev, dtype=torch.int32).view(1, hq, 1, 1)

    def query_tiles(self):
        sq = self.shape[4]
        return [(r0, min(r0 + self.rows, sq)) for r0 in range(0, sq, self.rows)]

    def key_tiles(self, r0: int, r1: int):
        sk = self.shape[5]
        end = sk if self.offset is None else min(sk, r1 - 1 + self.offset + 1)
        return [(c0, min(c0 + self.cols, sk)) for c0 in range(0, max(end, 0), self.cols)]

    def group(self, t: Tensor) -> Tensor:
        """[B, Hq, R, X] -> [B, Hkv, G, R, X] (a view)."""
        b, hq, hkv, g = self.shape[:4]
        return t.view(b, hkv, g, *t.shape[2:])

    def ungroup(self, t: Tensor) -> Tensor:
        """[B, Hkv, G, R, X] -> [B, Hq, R, X]."""
        return t.reshape(self.shape[0], self.shape[1], *t.shape[3:])

    def inputs(self, r0: int, r1: int, c0: int, c1: int) -> tuple[dict, Optional[Tensor]]:
        """The expression's inputs over the tile (``score`` [B, Hq, R, C]) and the causal keep-mask [R, C]."""
        score = self.ungroup(self.q[:, :, :, r0:r1] @ self.k[:, :, :, c0:c1].transpose(-1, -2)) * self.scale
        q_idx = torch.arange(r0, r1, device=score.device, dtype=torch.int32).view(1, 1, -1, 1)
        kv_idx = torch.arange(c0, c1, device=score.device, dtype=torch.int32).view(1, 1, 1, -1)
        keep = None if self.offset is None else (kv_idx <= q_idx + self.offset)[0, 0]
        return dict(score=score, b=self.b_idx, h=self.h_idx, q_idx=q_idx, kv_idx=kv_idx), keep


def _masked(y: Tensor, keep: Optional[Tensor]) -> Tensor:
    return y if keep is None else y.masked_fill(~keep, float("-inf"))


def forward(q: Tensor, k: Tensor, v: Tensor, expr: ScoreExpr, buffers: Sequence[Tensor], scale: float,
            causal_offset: Optional[int] = None) -> tuple[Tensor, Tensor]:
    """``(out [B, Hq, Sq, Dv] in q's dtype, lse [B, Hq, Sq])``; key ``j`` is visible to query ``i`` iff
    ``j <= i + causal_offset`` (all keys for None) and the expression is not ``-inf``."""
    t = _Tiles(q, k, v, scale, causal_offset)
    b, hq, _, _, sq, _ = t.shape
    out = torch.empty((b, hq, sq, v.shape[3]), dtype=q.dtype, device=q.device)
    lse = torch.empty((b, hq, sq), dtype=t.dtype, device=q.device)
    with torch.no_grad():
        for r0, r1 in t.query_tiles():
            m = torch.full((b, hq, r1 - r0), float("-inf"), dtype=t.dtype, device=q.device)
            l = torch.zeros_like(m)
            acc = torch.zeros((b, hq, r1 - r0, v.shape[3]), dtype=t.dtype, device=q.device)
            for c0, c1 in t.key_tiles(r0, r1):
                inputs, keep = t.inputs(r0, r1, c0, c1)
                s = _masked(evaluate(expr, inputs, buffers), keep)  # [B, Hq, R, C]
                m_new = torch.maximum(m, s.amax(-1))
                m_safe = torch.where(m_new == float("-inf"), 0.0, m_new)
                alpha = torch.exp(m - m_safe)
                p = torch.exp(s - m_safe[..., None])
                l = l * alpha + p.sum(-1)
                acc = acc * alpha[..., None] + t.ungroup(t.group(p) @ t.v[:, :, :, c0:c1])
                m = m_new
            empty = l == 0.0
            out[:, :, r0:r1] = (acc / torch.where(empty, 1.0, l)[..., None]).to(q.dtype)
            lse[:, :, r0:r1] = torch.where(empty, float("-inf"), m + torch.log(torch.where(empty, 1.0, l)))
    return out, lse


def backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, expr: ScoreExpr,
             buffers: Sequence[Tensor], scale: float, causal_offset: Optional[int] = None,
             buffer_grads: Sequence[bool] = ()) -> tuple[Tensor, Tensor, Tensor, list]:
    """``(dq, dk, dv, [d buffer or None])`` of :func:`forward` given ``dout`` and its ``out``, ``lse``."""
    t = _Tiles(q, k, v, scale, causal_offset)
    grad_expr = expr.gradient()
    dout = dout.to(t.dtype)
    delta = (dout * out.to(t.dtype)).sum(-1)  # [B, Hq, Sq]
    lse = torch.where(lse == float("-inf"), 0.0, lse.to(t.dtype))  # rows without a key: P = exp(-inf) = 0
    dq = torch.zeros(t.q.shape, dtype=t.dtype, device=q.device)  # [B, Hkv, G, Sq, D]
    dk = torch.zeros(k.shape, dtype=t.dtype, device=q.device)
    dv = torch.zeros(v.shape, dtype=t.dtype, device=q.device)
    loads = _loads(expr, buffer_grads)
    dbufs: list = [torch.zeros_like(b) if need else None for b, need in zip(buffers, buffer_grads)]
    for r0, r1 in t.query_tiles():
        do5 = t.group(dout[:, :, r0:r1])  # [B, Hkv, G, R, Dv]
        for c0, c1 in t.key_tiles(r0, r1):
            with torch.no_grad():
                inputs, keep = t.inputs(r0, r1, c0, c1)
                dmod, (y,) = evaluate(grad_expr, inputs, buffers, extra=(expr.output,))
                p = torch.exp(_masked(y, keep) - lse[:, :, r0:r1, None])  # [B, Hq, R, C]
                dp = t.ungroup(do5 @ t.v[:, :, :, c0:c1].transpose(-1, -2))
                ds = p * (dp - delta[:, :, r0:r1, None])
                dscore = t.group(torch.where(p > 0.0, ds * dmod, 0.0)) * scale  # [B, Hkv, G, R, C]
                dq[:, :, :, r0:r1] += dscore @ t.k[:, :, :, c0:c1]
                dk[:, :, c0:c1] += (dscore.transpose(-1, -2) @ t.q[:, :, :, r0:r1]).sum(2)
                dv[:, :, c0:c1] += (t.group(p).transpose(-1, -2) @ do5).sum(2)
                for buf, index, load_grad in loads:
                    dload, idx = evaluate(load_grad, inputs, buffers, extra=index)
                    dbufs[buf].index_put_(tuple(i.long() for i in idx), torch.where(p > 0.0, ds * dload, 0.0),
                                          accumulate=True)
    dq = t.ungroup(dq).to(q.dtype)
    return dq, dk.to(k.dtype), dv.to(v.dtype), dbufs


def _loads(expr: ScoreExpr, buffer_grads: Sequence[bool]) -> list:
    """``(buffer number, index args, d out / d load)`` of each load of a captured tensor that needs a gradient."""
    wanted = {b.name: i for i, (b, need) in enumerate(zip(expr.buffers, buffer_grads)) if need}
    return [(wanted[n.args[0]], n.args[1:], expr.gradient(wrt=n.name))
            for n in expr.nodes if n.op == "load" and n.args[0] in wanted]
