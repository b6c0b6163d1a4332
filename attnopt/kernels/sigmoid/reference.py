r"""Plain PyTorch reference for sigmoid attention: the oracle of the fused sigmoid kernels.

Semantics::

    O = σ(scale · Q Kᵀ + b + mask) V          b = -log(Sk) unless given
    Q: [B, Hq, Sq, D]   K: [B, Hkv, Sk, D]   V: [B, Hkv, Sk, Dv]   Hq % Hkv == 0

There is no normalization over the keys: every visible key contributes ``σ(score) v_j`` on its own,
so ``b = -log(Sk)`` keeps the total weight of a row near that of softmax at initialization (Ramapuram
et al., 2024). ``attn_mask`` broadcasts to ``[B, Hq, Sq, Sk]``: boolean (True = attend) or additive
(added to the scores; ``-inf`` gives weight 0). ``causal`` takes the exact path's codes (none, top-left,
bottom-right). Masked-out keys contribute exactly 0, so a row with no visible key is 0.

Backward, with ``P = σ(S)`` (0 where masked)::

    dV = Pᵀ dO      dS = (dO Vᵀ) ⊙ P ⊙ (1 - P)      dQ = scale · dS K      dK = scale · dSᵀ Q      dmask = dS

Computed in fp32 (fp64 for fp64 inputs) and cast back to the input dtype; this oracle materializes
the ``[Sq, Sk]`` score matrix on purpose.
"""

from __future__ import annotations

import math

import torch

from attnopt.kernels.exact.reference import CAUSAL_NONE, causal_keep, default_scale


def default_bias(sk: int) -> float:
    """``-log(Sk)`` (0 for an empty key set, where it is never used)."""
    return -math.log(sk) if sk > 0 else 0.0


def _acc(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype == torch.float64 else t.float()


def _expand_kv(t: torch.Tensor, hq: int) -> torch.Tensor:
    return t.repeat_interleave(hq // t.shape[1], dim=1) if t.shape[1] != hq else t


def _group_sum(t: torch.Tensor, hkv: int) -> torch.Tensor:
    b, hq = t.shape[:2]
    return t.reshape(b, hkv, hq // hkv, *t.shape[2:]).sum(dim=2)


def _reduce_to(t: torch.Tensor, shape) -> torch.Tensor:
    """Sum ``t`` over the dimensions along which a tensor of ``shape`` was broadcast to ``t.shape``."""
    lead = t.dim() - len(shape)
    t = t.sum(dim=tuple(range(lead))) if lead else t
    dims = tuple(i for i, n in enumerate(shape) if n == 1 and t.shape[i] != 1)
    return t.sum(dim=dims, keepdim=True) if dims else t


def weights(q, k, attn_mask=None, causal=CAUSAL_NONE, scale=None, bias=None) -> torch.Tensor:
    """P = σ(scale · Q Kᵀ + b + mask) [B, Hq, Sq, Sk] in the accumulation dtype, 0 at masked keys."""
    scale = default_scale(q.shape[-1]) if scale is None else scale
    bias = default_bias(k.shape[-2]) if bias is None else bias
    s = torch.matmul(_acc(q), _expand_kv(_acc(k), q.shape[1]).transpose(-2, -1)) * scale + bias
    keep = causal_keep(q.shape[-2], k.shape[-2], causal, q.device)
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            keep = attn_mask if keep is None else keep & attn_mask
        else:
            s = s + attn_mask.to(s.dtype)  # a float64 fill beyond fp32's range becomes -inf
    p = torch.sigmoid(s)
    return p if keep is None else p.masked_fill(~keep, 0.0)


def sigmoid_attention(q, k, v, attn_mask=None, causal=CAUSAL_NONE, scale=None, bias=None) -> torch.Tensor:
    """Returns ``out [B, Hq, Sq, Dv]`` in q's dtype."""
    p = weights(q, k, attn_mask, causal, scale, bias)
    return torch.matmul(p, _expand_kv(_acc(v), q.shape[1])).to(q.dtype)


def sigmoid_attention_backward(dout, q, k, v, attn_mask=None, causal=CAUSAL_NONE, scale=None, bias=None,
                               mask_grad=False):  # fmt: skip
    """Gradients ``(dq, dk, dv, dmask)`` of :func:`sigmoid_attention`; ``dmask`` is None unless ``mask_grad``."""
    scale = default_scale(q.shape[-1]) if scale is None else scale
    hq, hkv = q.shape[1], k.shape[1]
    p = weights(q, k, attn_mask, causal, scale, bias)
    dof, vf, kf = _acc(dout), _expand_kv(_acc(v), hq), _expand_kv(_acc(k), hq)
    dv = torch.matmul(p.transpose(-2, -1), dof)
    ds = torch.matmul(dof, vf.transpose(-2, -1)) * p * (1.0 - p)
    dmask = _reduce_to(ds, attn_mask.shape).to(attn_mask.dtype) if mask_grad else None
    dq = torch.matmul(ds, kf) * scale
    dk = torch.matmul(ds.transpose(-2, -1), _acc(q)) * scale
    return dq.to(q.dtype), _group_sum(dk, hkv).to(k.dtype), _group_sum(dv, hkv).to(v.dtype), dmask
