"""Dense reference for sparse attention: the oracle the blockwise and Triton paths are tested against.

    O = softmax(softcap(scale · Q Kᵀ) + attn_mask, masked to mask ∧ kv_valid) V

``mask`` is a :class:`attnopt.masks.Mask` (``[Sq, Sk]`` per head), ``kv_valid`` an optional bool
``[B, Sk]`` (key padding: False keys are hidden from every query of that batch row) and
``attn_mask`` an optional extra mask broadcasting to ``[B, Hq, Sq, Sk]`` (bool: True = attend;
float: added to the scores). Rows that see no key give zeros and ``lse = -inf``. This builds the
dense ``[Sq, Sk]`` mask on purpose: small test sizes only.
"""

from __future__ import annotations

import torch

from attnopt.kernels.exact import reference as exact
from attnopt.masks import Mask


def dense_mask(mask: Mask, sq: int, sk: int, heads: int, kv_valid=None, device=None, batch: int = 1) -> torch.Tensor:
    """bool ``[B or 1, Hq or 1, Sq, Sk]``: ``mask`` (per batch row when it depends on the row) and the key padding."""
    rows = range(batch) if mask.batch_dependent(batch) else range(1)
    keep = torch.stack([mask.at_batch(b).dense(sq, sk, heads, device=device) for b in rows])  # [B or 1, Hm, Sq, Sk]
    if kv_valid is not None:
        keep = keep & kv_valid[:, None, None, :].to(device)
    return keep


def combined_mask(mask: Mask, q, k, kv_valid=None, attn_mask=None) -> torch.Tensor:
    """One mask for the exact reference: bool, or additive float with -inf where ``mask`` hides a key."""
    keep = dense_mask(mask, q.shape[-2], k.shape[-2], q.shape[1], kv_valid, q.device, q.shape[0])
    if attn_mask is None:
        return keep
    if attn_mask.dtype == torch.bool:
        return keep & attn_mask
    return attn_mask.masked_fill(~keep, float("-inf"))


def attention_forward(q, k, v, mask: Mask, kv_valid=None, attn_mask=None, scale=None, softcap=0.0):
    """``(out [B, Hq, Sq, Dv] in q.dtype, lse [B, Hq, Sq] fp32)``."""
    m = combined_mask(mask, q, k, kv_valid, attn_mask)
    return exact.attention_forward(q, k, v, m, 0.0, exact.CAUSAL_NONE, scale, None, softcap)


def attention_backward(dout, q, k, v, out, lse, mask: Mask, kv_valid=None, attn_mask=None, scale=None, softcap=0.0):
    """``(dq, dk, dv)`` of :func:`attention_forward` (the exact reference's explicit backward)."""
    m = combined_mask(mask, q, k, kv_valid, attn_mask)
    dq, dk, dv, _ = exact.attention_backward(dout, q, k, v, out, lse, m, 0.0, exact.CAUSAL_NONE, scale, None, False,
                                             softcap)  # fmt: skip
    return dq, dk, dv
