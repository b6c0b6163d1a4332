"""The CPU implementation of ``torch.ops.attnopt.attention``: SDPA's CPU flash kernel where it computes the call
exactly, attnopt's blockwise kernel (:mod:`attnopt.kernels.exact.cpu_blockwise`) everywhere else.

:func:`attnopt.kernels.exact.dispatch.choose` decides per call, by rules (see ``dispatch.cpu_refusal``):
SDPA's flash kernel for CPU (``aten._scaled_dot_product_flash_attention_for_cpu`` and its backward, the
kernel ``F.scaled_dot_product_attention`` itself runs on CPU) takes GQA natively, any additive mask of the
query dtype and an ``is_causal`` that is top-left. It cannot run a softcap, attnopt's seeded dropout, a value
head dim different from the query's, empty sequences or a mask's gradient; those run blockwise.

This module adapts the rest to SDPA's conventions, in attnopt's:

* a bool mask (True = attend) becomes the additive 0 / -inf mask SDPA takes, on the mask's own shape;
* rows without a visible key, which SDPA returns with ``lse = 0`` and zeros, get ``lse = -inf`` (the backward
  hands SDPA ``+inf`` there so that their probabilities are ``exp(s - inf) = 0``);
* bottom-right causal with ``Sq > Sk`` is top-left causal on the last ``Sk`` rows (the first rows see no key);
  with ``Sq < Sk`` it is the keys ``[0, Sk - Sq)`` without a causal mask plus the last ``Sq`` keys with a
  top-left one, two SDPA calls merged by their log-sum-exps. The backward calls SDPA's backward on each key
  part with the merged ``out`` and ``lse`` (the global probabilities), which gives each part's exact share.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from attnopt.codegen.spec import CAUSAL_BOTTOM_RIGHT, CAUSAL_NONE
from attnopt.kernels.exact import cpu_blockwise, dispatch
from attnopt.kernels.layout import HIDDEN_BELOW, acc_dtype

_NEG_INF = float("-inf")


def _unit_rows(*tensors: Tensor) -> tuple[Tensor, ...]:
    """Each tensor with a unit stride along its last (head) dim: both implementations read rows of D contiguous
    elements; a view whose head dim is strided (keys stored [B, H, D, S] and transposed) is copied once."""
    return tuple(t if t.stride(-1) == 1 else t.contiguous() for t in tensors)


def forward(q, k, v, attn_mask, dropout_p, causal, scale, seed, softcap) -> tuple[Tensor, Tensor]:
    """``(out, lse)`` of the exact op on CPU, by the implementation :func:`dispatch.choose` picks (and records)."""
    q, k, v = _unit_rows(q, k, v)
    decision = dispatch.choose(q, k, v, attn_mask, causal, scale, dropout_p, softcap)
    if decision.backend == dispatch.SDPA_CPU:
        return sdpa_forward(q, k, v, attn_mask, causal, scale)
    return cpu_blockwise.forward(q, k, v, attn_mask, causal, scale, softcap, dropout_p, seed)


def backward(dout, q, k, v, out, lse, attn_mask, dropout_p, causal, scale, seed, mask_grad, softcap):
    """``(dq, dk, dv, dmask or None)`` on CPU: SDPA's flash backward where it is exact, else blockwise."""
    dout, q, k, v, out = _unit_rows(dout, q, k, v, out)
    refusal = dispatch.cpu_refusal(q, k, v, attn_mask, dropout_p, softcap) or _backward_refusal(attn_mask, lse,
                                                                                                 mask_grad)
    if not refusal and dispatch.enabled():
        return (*sdpa_backward(dout, q, k, v, out, lse, attn_mask, causal, scale), None)
    return cpu_blockwise.backward(dout, q, k, v, out, lse, attn_mask, causal, scale, softcap, dropout_p, seed,
                                  mask_grad)


def _backward_refusal(attn_mask: Optional[Tensor], lse: Tensor, mask_grad: bool) -> str:
    if mask_grad:
        return "the mask's gradient: SDPA returns none"
    if attn_mask is not None and attn_mask.is_floating_point():
        # a row hidden by a huge finite fill averages V; its lse lost log Σ, so exp(s - lse) needs renormalizing
        lost = torch.isfinite(lse) & (lse < HIDDEN_BELOW)
        if bool(lost.any()):
            return "rows masked by a finite fill"
    return ""


def _mask4(attn_mask: Optional[Tensor]) -> Optional[Tensor]:
    return None if attn_mask is None else attn_mask.reshape((1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape))


def _bias(mask4: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    """SDPA's additive form of a mask: a bool mask (True = attend) as 0 / -inf of ``dtype`` in one pass (a
    ``where``, as SDPA converts it), on the mask's own shape or its one shared query row (:func:`_shared_rows`);
    None for a mask that hides nothing (:func:`_hides_nothing`)."""
    if mask4 is None or _hides_nothing(mask4):
        return None
    mask4 = _shared_rows(mask4)
    if mask4.is_floating_point():
        return mask4
    return torch.where(mask4, torch.zeros((), dtype=dtype), torch.full((), _NEG_INF, dtype=dtype))


def _hides_nothing(mask4: Tensor) -> bool:
    """Whether the mask hides no key at all: the padding mask of unpadded inputs, which a traced model
    materializes where its own eager call passes none. Its first row is read first (a mask hiding a key there, as
    causal or padded ones do, costs that row); then one vectorized reduction (min and max) over the mask."""
    if mask4.dtype == torch.bool:
        return bool(mask4[0, 0, 0].all()) and int(mask4.view(torch.uint8).min()) == 1
    return bool((mask4[0, 0, 0] == 0).all()) and float(mask4.amin()) == 0.0 == float(mask4.amax())


def _shared_rows(mask4: Tensor) -> Tensor:
    """``mask4[:, :, :1]`` ([Mb, Mh, 1, Mk]) when every query row of the mask is the same, else ``mask4``.

    Models broadcast a key-padding mask to [B, 1, Sq, Sk] before attention (BERT); SDPA's kernel then reads
    Sq x Sk mask values where Sk suffice (and a bool mask is converted whole). The first and last rows are
    compared first (a mask whose rows differ, causal or per-row, costs two rows), then each key's column min
    and max over the rows (one vectorized pass; a NaN never compares equal, so such a mask stays whole).
    """
    if mask4.shape[2] == 1 or mask4.stride(2) == 0:  # one row, or one row broadcast (an expanded view)
        return mask4[:, :, :1]
    if not torch.equal(mask4[:, :, :1], mask4[:, :, -1:]):
        return mask4
    values = mask4.view(torch.uint8) if mask4.dtype == torch.bool else mask4
    return mask4[:, :, :1] if torch.equal(values.amin(dim=2), values.amax(dim=2)) else mask4


def _dead_rows(mask4: Optional[Tensor], is_causal: bool, lse: Tensor) -> Optional[Tensor]:
    """[B, Hq, Sq] bool: the rows without a visible key, or None when there are none.

    SDPA gives such rows ``lse = 0``; only when some row has exactly that is the mask read (O(mask size)).
    Without a mask every row sees key 0 (top-left causal included).
    """
    if mask4 is None or not bool((lse == 0).any()):
        return None
    visible = mask4 if mask4.dtype == torch.bool else mask4 != _NEG_INF  # [Mb, Mh, Mq, Mk]
    seen = visible.any(dim=-1)  # [Mb, Mh, Mq]
    if is_causal:
        first = visible.to(torch.uint8).argmax(dim=-1)  # the first visible key of each row
        seen = seen & (first <= torch.arange(lse.shape[2]))
    dead = ~seen.expand(lse.shape)
    return dead if bool(dead.any()) else None


def _sdpa(q, k, v, mask4, is_causal: bool, scale) -> tuple[Tensor, Tensor]:
    """One call of SDPA's CPU flash forward in attnopt's conventions (``lse`` contiguous, -inf on dead rows)."""
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q, k, v, 0.0, is_causal, attn_mask=_bias(mask4, q.dtype), scale=scale)
    lse = lse.contiguous()
    dead = _dead_rows(mask4, is_causal, lse)
    if dead is not None:
        out, lse = out.masked_fill(dead[..., None], 0.0), lse.masked_fill(dead, _NEG_INF)
    return out, lse


def _rows(mask4: Optional[Tensor], r0: int) -> Optional[Tensor]:
    """The mask of query rows ``r0:``, or the mask itself when it broadcasts over queries."""
    return mask4 if mask4 is None or mask4.shape[2] == 1 else mask4[:, :, r0:]


def _masks_like(mask4, part):
    """The mask of a key part (``part``: a slice of keys), or the mask itself when it broadcasts over keys."""
    return mask4 if mask4 is None or mask4.shape[3] == 1 else mask4[..., part]


def sdpa_forward(q, k, v, attn_mask, causal: int, scale) -> tuple[Tensor, Tensor]:
    """``(out, lse)`` through SDPA's CPU flash kernel, for a call :func:`dispatch.cpu_refusal` accepts."""
    mask4 = _mask4(attn_mask)
    sq, sk = q.shape[2], k.shape[2]
    if causal != CAUSAL_BOTTOM_RIGHT or sq == sk:
        return _sdpa(q, k, v, mask4, causal != CAUSAL_NONE, scale)
    off = sk - sq
    if off < 0:  # the first -off rows see no key; the rest is top-left causal on a square
        out_t, lse_t = _sdpa(q[:, :, -off:], k, v, _rows(mask4, -off), True, scale)
        out = torch.cat([out_t.new_zeros(out_t.shape[:2] + (-off, out_t.shape[3])), out_t], dim=2)
        lse = torch.cat([lse_t.new_full(lse_t.shape[:2] + (-off,), _NEG_INF), lse_t], dim=2)
        return out, lse
    head, tail = slice(0, off), slice(off, None)
    o1, l1 = _sdpa(q, k[:, :, head], v[:, :, head], _masks_like(mask4, head), False, scale)
    o2, l2 = _sdpa(q, k[:, :, tail], v[:, :, tail], _masks_like(mask4, tail), True, scale)
    lse = torch.logaddexp(l1, l2)
    safe = lse.masked_fill(lse == _NEG_INF, 0.0)
    acc = acc_dtype(q)
    out = o1.to(acc) * torch.exp(l1 - safe)[..., None] + o2.to(acc) * torch.exp(l2 - safe)[..., None]
    return out.to(q.dtype), lse


def _sdpa_bwd(dout, q, k, v, out, lse, mask4, is_causal: bool, scale) -> tuple[Tensor, Tensor, Tensor]:
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        dout, q, k, v, out, lse, 0.0, is_causal, attn_mask=_bias(mask4, q.dtype), scale=scale)


def sdpa_backward(dout, q, k, v, out, lse, attn_mask, causal: int, scale) -> tuple[Tensor, Tensor, Tensor]:
    """``(dq, dk, dv)`` through SDPA's CPU flash backward, from attnopt's ``out`` and ``lse``."""
    mask4 = _mask4(attn_mask)
    lse = lse.masked_fill(lse == _NEG_INF, float("inf"))  # rows without a visible key: P = exp(s - inf) = 0
    sq, sk = q.shape[2], k.shape[2]
    if causal != CAUSAL_BOTTOM_RIGHT or sq == sk:
        return _sdpa_bwd(dout, q, k, v, out, lse, mask4, causal != CAUSAL_NONE, scale)
    off = sk - sq
    if off < 0:
        r = slice(-off, None)
        dq_t, dk, dv = _sdpa_bwd(dout[:, :, r], q[:, :, r], k, v, out[:, :, r], lse[:, :, r], _rows(mask4, -off),
                                 True, scale)
        return torch.cat([torch.zeros_like(q[:, :, : -off]), dq_t], dim=2), dk, dv
    head, tail = slice(0, off), slice(off, None)
    dq1, dk1, dv1 = _sdpa_bwd(dout, q, k[:, :, head], v[:, :, head], out, lse, _masks_like(mask4, head), False, scale)
    dq2, dk2, dv2 = _sdpa_bwd(dout, q, k[:, :, tail], v[:, :, tail], out, lse, _masks_like(mask4, tail), True, scale)
    return dq1 + dq2, torch.cat([dk1, dk2], dim=2), torch.cat([dv1, dv2], dim=2)
