"""Dense reference for block-list attention: the selection applied densely (the oracle of every dynamic path).

    O = softmax(scale · Q Kᵀ, masked to selected blocks ∧ causal ∧ kv_valid) V

Builds the ``[B, Hq, Sq, Sk]`` mask on purpose: small test sizes only. Rows that see no key give zeros and
``lse = -inf``.
"""

from __future__ import annotations

import torch

from attnopt.kernels.dynamic.blocks import causal_offset, dense_blocks, num_blocks, visible
from attnopt.kernels.exact import reference as exact


def dense_mask(q, k, kv_num, kv_idx, block_m: int, block_n: int, causal: int = 0, kv_valid=None) -> torch.Tensor:
    """bool ``[B, Hq or 1, Sq, Sk]``: the selection (block ``(i, j)`` covers queries ``i·block_m ..`` and keys
    ``j·block_n ..``) and the site's own mask."""
    sq, sk = q.shape[2], k.shape[2]
    blocks = dense_blocks(kv_num, kv_idx, num_blocks(sk, block_n))  # [B, H, NQ, NK]
    keep = blocks.repeat_interleave(block_m, 2)[:, :, :sq].repeat_interleave(block_n, 3)[..., :sk]
    qp = torch.arange(sq, device=q.device)[:, None]
    kp = torch.arange(sk, device=q.device)[None, :]
    keep = keep & visible(qp, kp, sk, causal_offset(causal, sq, sk))
    if kv_valid is not None:
        keep = keep & kv_valid[:, None, None, :]
    return keep


def attention_forward(q, k, v, kv_num, kv_idx, block_m, block_n, causal=0, kv_valid=None, scale=None):
    """``(out [B, Hq, Sq, Dv], lse [B, Hq, Sq])``."""
    m = dense_mask(q, k, kv_num, kv_idx, block_m, block_n, causal, kv_valid)
    return exact.attention_forward(q, k, v, m, 0.0, exact.CAUSAL_NONE, scale)


def attention_backward(dout, q, k, v, out, lse, kv_num, kv_idx, block_m, block_n, causal=0, kv_valid=None,
                       scale=None):  # fmt: skip
    """``(dq, dk, dv)`` of :func:`attention_forward`."""
    m = dense_mask(q, k, kv_num, kv_idx, block_m, block_n, causal, kv_valid)
    dq, dk, dv, _ = exact.attention_backward(dout, q, k, v, out, lse, m, 0.0, exact.CAUSAL_NONE, scale)
    return dq, dk, dv
