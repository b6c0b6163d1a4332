"""Plain PyTorch reference for exact attention: the oracle every exact kernel is tested against.

Semantics::

    O = dropout(softmax(softcap(scale * Q Kᵀ) + mask)) V,   softcap(s) = cap · tanh(s / cap)  (cap > 0)
    Q: [B, Hq, Sq, D]   K: [B, Hkv, Sk, D]   V: [B, Hkv, Sk, Dv]   Hq % Hkv == 0

* ``attn_mask`` broadcasts to ``[B, Hq, Sq, Sk]``; boolean means True = attend, floating point is
  added to the scores.
* ``causal``: ``CAUSAL_NONE``, ``CAUSAL_TOP_LEFT`` (query i sees keys j <= i, SDPA's ``is_causal``)
  or ``CAUSAL_BOTTOM_RIGHT`` (j <= i + Sk - Sq, the FlashAttention-2 convention).
* A row whose every key is masked out yields zeros and ``lse = -inf`` (not NaN).
* Dropout keeps an element where ``rand >= dropout_p`` with ``rand`` drawn from a generator seeded by
  ``seed``, so the backward regenerates exactly the forward's mask.

Everything is computed in fp32 (fp64 for fp64 inputs) and cast back to the input dtype. This file is only the
oracle and the CPU implementation; it materializes the [Sq, Sk] score matrix on purpose.
"""

from __future__ import annotations

import math

import torch

from attnopt.codegen.spec import CAUSAL_BOTTOM_RIGHT, CAUSAL_NONE, CAUSAL_TOP_LEFT  # the causal codes of every op


def default_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)


def causal_keep(sq: int, sk: int, causal: int, device: torch.device) -> torch.Tensor | None:
    """Boolean [Sq, Sk] matrix of visible keys for ``causal``, or None when there is no causal mask."""
    if causal == CAUSAL_NONE:
        return None
    offset = sk - sq if causal == CAUSAL_BOTTOM_RIGHT else 0
    i = torch.arange(sq, device=device)[:, None]
    j = torch.arange(sk, device=device)[None, :]
    return j <= i + offset


def dropout_keep(shape, dropout_p: float, seed: torch.Tensor | None, device) -> torch.Tensor:
    """The dropout keep-mask for ``shape``, a pure function of ``seed`` (a 0-d int64 tensor)."""
    if seed is None:
        raise ValueError("attention with dropout_p > 0 needs a seed tensor so that backward can replay the mask")
    gen = torch.Generator(device=device)
    gen.manual_seed(int(seed.item()))
    return torch.rand(shape, generator=gen, device=device) >= dropout_p


def _acc(t: torch.Tensor) -> torch.Tensor:
    """Upcast to the accumulation dtype: fp32, or fp64 for fp64 inputs."""
    return t if t.dtype == torch.float64 else t.float()


def _expand_kv(t: torch.Tensor, hq: int) -> torch.Tensor:
    return t.repeat_interleave(hq // t.shape[1], dim=1) if t.shape[1] != hq else t


def _scores(q, k, attn_mask, causal, scale, softcap=0.0):
    """Masked, scaled (and softcapped) fp32 scores [B, Hq, Sq, Sk]."""
    kf = _expand_kv(_acc(k), q.shape[1])
    s = torch.matmul(_acc(q), kf.transpose(-2, -1)) * scale
    if softcap > 0.0:
        s = softcap * torch.tanh(s / softcap)
    keep = causal_keep(q.shape[-2], k.shape[-2], causal, q.device)
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            keep = attn_mask if keep is None else keep & attn_mask
        else:
            s = s + _acc(attn_mask)
    if keep is not None:
        s = s.masked_fill(~keep, float("-inf"))
    return s


def _softmax_lse(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row softmax of ``s`` and its logsumexp, with rows of all -inf giving p = 0 and lse = -inf.

    p is normalized by its row sum (exp(s - max) / Σ), not computed as exp(s - lse): when every score of a
    row is about finfo.min (a fully masked row with a finite fill), lse = max + log(Sk) rounds to max and
    exp(s - lse) would sum to Sk instead of 1.
    """
    if s.shape[-1] == 0:  # no keys at all: every row is fully masked
        return s, s.new_full(s.shape[:-1], float("-inf"))
    m = s.amax(dim=-1, keepdim=True)
    m = m.masked_fill(m == float("-inf"), 0.0)
    e = torch.exp(s - m)
    denom = e.sum(dim=-1, keepdim=True)
    p = e / denom.masked_fill(denom == 0, 1.0)
    return p, (m + torch.log(denom)).squeeze(-1)


def attention_forward(q, k, v, attn_mask=None, dropout_p=0.0, causal=CAUSAL_NONE, scale=None, seed=None, softcap=0.0):
    """Returns ``(out [B, Hq, Sq, Dv] in q.dtype, lse [B, Hq, Sq] fp32)``."""
    scale = default_scale(q.shape[-1]) if scale is None else scale
    s = _scores(q, k, attn_mask, causal, scale, softcap)
    p, lse = _softmax_lse(s)
    if dropout_p > 0.0:
        p = p * dropout_keep(p.shape, dropout_p, seed, q.device) / (1.0 - dropout_p)
    out = torch.matmul(p, _expand_kv(_acc(v), q.shape[1]))
    return out.to(q.dtype), lse


def _reduce_to(t: torch.Tensor, shape) -> torch.Tensor:
    """Sum ``t`` over the dimensions along which a tensor of ``shape`` was broadcast to ``t.shape``."""
    lead = t.dim() - len(shape)
    t = t.sum(dim=tuple(range(lead))) if lead else t
    dims = tuple(i for i, n in enumerate(shape) if n == 1 and t.shape[i] != 1)
    return t.sum(dim=dims, keepdim=True) if dims else t


def _group_sum(t: torch.Tensor, hkv: int) -> torch.Tensor:
    """[B, Hq, ...] -> [B, Hkv, ...] summing the query heads of each GQA group."""
    b, hq = t.shape[:2]
    return t.reshape(b, hkv, hq // hkv, *t.shape[2:]).sum(dim=2)


def attention_backward(dout, q, k, v, out, lse, attn_mask=None, dropout_p=0.0, causal=CAUSAL_NONE, scale=None,
                       seed=None, mask_grad=False, softcap=0.0):
    """Gradients ``(dq, dk, dv, dmask)`` of :func:`attention_forward`; ``dmask`` is None unless requested.

    With P = exp(S - lse), P̃ = P ⊙ keep / (1 - p) and O = P̃ V:
    dV = P̃ᵀ dO,  dP = (dO Vᵀ) ⊙ keep / (1 - p),  dS = P ⊙ (dP - rowsum(dO ⊙ O)),
    dQ = scale · dS' K,  dK = scale · dS'ᵀ Q,  dmask = dS (additive masks only), where with a softcap
    dS' = dS ⊙ (1 - tanh²(scale · QKᵀ / cap)) and dS' = dS without.
    """
    scale = default_scale(q.shape[-1]) if scale is None else scale
    hq, hkv = q.shape[1], k.shape[1]
    p, _ = _softmax_lse(_scores(q, k, attn_mask, causal, scale, softcap))
    dof, vf = _acc(dout), _expand_kv(_acc(v), hq)
    dp = torch.matmul(dof, vf.transpose(-2, -1))
    pd = p
    if dropout_p > 0.0:
        keep = dropout_keep(p.shape, dropout_p, seed, q.device) / (1.0 - dropout_p)
        pd, dp = p * keep, dp * keep
    dv = torch.matmul(pd.transpose(-2, -1), dof)
    delta = (dof * _acc(out)).sum(dim=-1, keepdim=True)
    ds = p * (dp - delta)
    dmask = _reduce_to(ds, attn_mask.shape).to(attn_mask.dtype) if mask_grad else None
    if softcap > 0.0:
        raw = torch.matmul(_acc(q), _expand_kv(_acc(k), hq).transpose(-2, -1)) * scale
        ds = ds * (1.0 - torch.tanh(raw / softcap) ** 2)
    dq = torch.matmul(ds, _expand_kv(_acc(k), hq)) * scale
    dk = torch.matmul(ds.transpose(-2, -1), _acc(q)) * scale
    return dq.to(q.dtype), _group_sum(dk, hkv).to(k.dtype), _group_sum(dv, hkv).to(v.dtype), dmask
