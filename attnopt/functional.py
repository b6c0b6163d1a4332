"""attnopt as an attention library: one call runs every variant on raw tensors (docs/functional.md).

    out = attnopt.attention(q, k, v)                                   # exact, SDPA's layout and semantics
    out = attnopt.attention(q, k, v, mask=masks.SlidingWindow(127, 0))  # a descriptor: only its tiles are visited
    out = attnopt.attention(q, k, v, mask=block_mask)                  # a FlexAttention BlockMask (or a mask_mod)
    out = attnopt.attention(q, k, v, is_causal=True, variant=attnopt.Linear("elu"))

Every path is one ``torch.ops.attnopt.*`` custom op (fake implementations and autograd included), so the call is
differentiable, compiles under ``torch.compile(fullgraph=True)`` and exports with ``torch.export``. The Python side
(turning a mask into the op's key string) runs once per compilation: under dynamo it is a constant.
"""

from __future__ import annotations

import math
import operator
from typing import Any

import torch

import attnopt.kernels.linear.ops  # noqa: F401  (registers torch.ops.attnopt.linear_attention)
import attnopt.kernels.sigmoid.ops  # noqa: F401  (registers torch.ops.attnopt.sigmoid_attention)
import attnopt.kernels.sparse.ops  # noqa: F401  (registers torch.ops.attnopt.sparse_attention*)
from attnopt import masks
from attnopt.kernels.exact.ops import check_mask_dtype, new_seed
from attnopt.kernels.exact.reference import CAUSAL_NONE, CAUSAL_TOP_LEFT
from attnopt.kernels.exact import score_mod as score_mod_kernels
from attnopt.kernels.layout import assume_constant_result
from attnopt.kernels.linear.reference import EPS, feature_map
from attnopt.masks.flex import from_block_mask, is_block_mask
from attnopt.policy import Exact, Keep, Linear, Sigmoid, Sparse, parse_variant
from attnopt.variants.linear import rms_norm, site_log_decay


def attention(q, k, v, *positional, mask=None, score_mod=None, variant=None, is_causal: bool = False,
              scale: float | None = None, enable_gqa: bool = False, return_lse: bool = False, attn_mask=None,
              dropout_p: float = 0.0):  # fmt: skip
    """Attention through attnopt's kernels, for every variant; SDPA's layout.

    q [B, Hq, Sq, D], k [B, Hkv, Sk, D], v [B, Hkv, Sk, Dv] (or 3-D without B), Hq a multiple of Hkv: grouped-query
    attention runs natively (k and v are never repeated), so ``enable_gqa`` (SDPA's and FlexAttention's flag) is
    accepted and not needed.

    ``mask``: a tensor with SDPA's semantics (bool True = attend, or additive; ``attn_mask`` is its old name), an
    :mod:`attnopt.masks` descriptor (the kernels visit only its tiles), a FlexAttention ``BlockMask`` or a
    ``mask_mod(b, h, q_idx, kv_idx)`` callable (evaluated per element, as FlexAttention does).
    ``is_causal``: causal aligned top-left (SDPA's ``is_causal``, FlexAttention's ``q_idx >= kv_idx``); combine
    with a descriptor freely. For bottom-right alignment pass ``mask=attnopt.masks.causal()``.
    ``score_mod(score, b, h, q_idx, kv_idx)``: FlexAttention's score modification, compiled into the exact kernels.
    ``variant``: None or :class:`attnopt.Exact` (the same function), :class:`attnopt.Sparse` (its mask on top of
    ``mask``), :class:`attnopt.Linear`, :class:`attnopt.Sigmoid`, or a policy string (``"linear:relu"``).
    ``return_lse``: also return the log-sum-exp of the scaled scores, [B, Hq, Sq] fp32 (softmax variants only),
    differentiable (one more kernel call when q or k requires grad).
    ``dropout_p``: attention dropout (exact attention with a tensor mask or none).
    """
    if positional:
        raise TypeError(f"attnopt.attention takes q, k, v positionally and the rest by keyword; got {len(positional)} "
                        "more positional argument(s): write attention(q, k, v, mask=..., is_causal=..., scale=...)")  # fmt: skip
    if attn_mask is not None:
        if mask is not None:
            raise ValueError("attnopt.attention: pass the mask once, as mask= (attn_mask= is its SDPA name)")
        mask = attn_mask
    q, k, v, squeeze = _batched(q, k, v)
    _check_heads(q, k)
    if is_block_mask(mask) and tuple(mask.seq_lengths) != (q.shape[2], k.shape[2]):
        raise ValueError(f"attnopt.attention: the BlockMask was built for Sq, Sk = {tuple(mask.seq_lengths)}; the call "
                         f"has {q.shape[2]}, {k.shape[2]}: build it with create_block_mask(mask_mod, B, H, "
                         f"{q.shape[2]}, {k.shape[2]})")  # fmt: skip
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    variant = _as_variant(variant)
    if return_lse and isinstance(variant, (Linear, Sigmoid)):
        raise ValueError(f"attnopt.attention: return_lse=True needs a softmax variant; {variant.name} attention has no "
                         "log-sum-exp (drop return_lse, or use variant=None / Exact / Sparse)")  # fmt: skip
    if score_mod is not None:
        out, lse = _score_mod(q, k, v, score_mod, mask, variant, is_causal, scale, enable_gqa, dropout_p)
    elif isinstance(variant, Linear):
        out, lse = _linear(q, k, v, mask, variant, is_causal, scale, dropout_p), None
    elif isinstance(variant, Sigmoid):
        out, lse = _sigmoid(q, k, v, mask, variant, is_causal, scale, dropout_p), None
    else:
        run = _softmax(mask, variant, is_causal, scale, dropout_p)
        out, lse = run(q, k, v, dropout_p)
        lse = _lse_with_gradient(run, q, k, lse, scale, mask) if return_lse else lse
    if squeeze:
        out, lse = out.squeeze(0), None if lse is None else lse.squeeze(0)
    return (out, lse) if return_lse else out


def _batched(q, k, v):
    if q.dim() not in (3, 4) or k.dim() != q.dim() or v.dim() != q.dim():
        raise ValueError(f"attnopt.attention takes 3-D or 4-D q, k, v; got {q.dim()}-D, {k.dim()}-D, {v.dim()}-D")
    if q.dim() == 3:
        return q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), True
    return q, k, v, False


def _check_heads(q, k) -> None:
    hq, hkv = q.shape[1], k.shape[1]
    if hkv == 0 or hq % hkv:
        raise ValueError(f"attnopt.attention: q has {hq} heads and k, v {hkv}; grouped-query attention needs Hq a "
                         "multiple of Hkv")  # fmt: skip


@assume_constant_result
def _parsed(text: str):
    """The variant of a policy string (parsed in plain Python: a constant under dynamo)."""
    return parse_variant(text)


def _as_variant(variant: Any):
    if variant is None:
        return Exact()
    if isinstance(variant, str):
        variant = _parsed(variant)
    if isinstance(variant, Keep):
        return Exact()
    if not isinstance(variant, (Exact, Sparse, Linear, Sigmoid)):
        raise TypeError(f"attnopt.attention: variant must be None, attnopt.Exact(), Sparse(...), Linear(...), "
                        f"Sigmoid(...) or a policy string such as 'linear:relu'; got {variant!r}")  # fmt: skip
    return variant


def is_descriptor(mask) -> bool:
    """Whether ``mask`` is a mask descriptor, a FlexAttention BlockMask or a mask_mod (not a tensor, not None)."""
    if isinstance(mask, masks.Mask) or is_block_mask(mask):
        return True
    return callable(mask) and not isinstance(mask, torch.Tensor)


def as_descriptor(mask) -> masks.Mask:
    """``mask`` (see :func:`is_descriptor`) as an :mod:`attnopt.masks` descriptor."""
    if isinstance(mask, masks.Mask):
        return mask
    return from_block_mask(mask) if is_block_mask(mask) else masks.from_mask_mod(mask)


def _portable(mask):
    """``mask`` as :func:`_constant_key` takes it, read field by field (which dynamo traces even for a descriptor built
    inside the compiled function, whose object it cannot hand over): a descriptor with a dict form as that dict, a
    mask_mod as ``("MaskMod", fn, heads, name, batch)``, a combination as ``(kind, parts)``; anything else as it is
    (a BlockSparse, a BlockMask: built outside the compiled function)."""
    if isinstance(mask, masks.Mask):
        described = mask.to_dict()
        if described is not None:
            return described
    if isinstance(mask, masks.MaskMod):
        return ("MaskMod", mask.fn, mask.heads, mask.name, mask.batch)
    if isinstance(mask, (masks.And, masks.Or)):
        return (type(mask).__name__, tuple(_portable(p) for p in mask.parts))
    return mask


def _rebuilt(portable) -> masks.Mask:
    """The descriptor of a :func:`_portable` form."""
    if isinstance(portable, dict):
        return masks.from_dict(portable)
    if isinstance(portable, tuple) and portable[0] == "MaskMod":
        return masks.MaskMod(*portable[1:])
    if isinstance(portable, tuple):
        kind = masks.And if portable[0] == "And" else masks.Or
        return kind(tuple(_rebuilt(p) for p in portable[1]))
    return as_descriptor(portable)


def static(value):
    """``value`` (ints, or dicts, lists and tuples of them) with every symbolic int made a plain one: dynamo's automatic
    dynamic shapes turns the sizes, and the int fields of a mask passed to a compiled function, into symbols when a
    call recompiles; a mask is a constant of the graph (the compiled call then guards on those values)."""
    if isinstance(value, dict):
        return {key: static(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        items = [static(item) for item in value]
        return items if isinstance(value, list) else tuple(items)
    if isinstance(value, bool) or not isinstance(value, (int, torch.SymInt)):
        return value
    return operator.index(value)  # (int() leaves a symbol symbolic under dynamo; operator.index specializes it)


def _mask_key(mask, extra, is_causal: bool) -> str:
    """The sparse op's key of ``mask`` and ``extra`` (descriptors or None; one at least), with top-left causal when
    ``is_causal``. The op checks it against the call's sizes (which may stay symbolic under dynamo)."""
    return _constant_key(static(_portable(mask)), static(_portable(extra)), is_causal)


@assume_constant_result
def _constant_key(mask, extra, is_causal: bool) -> str:
    """:func:`_mask_key`'s work, a constant under dynamo: the descriptors are rebuilt and serialized here, in plain
    Python, once per compilation."""
    parts = [_rebuilt(m) for m in (mask, extra) if m is not None]
    if is_causal:
        parts.append(masks.causal("top-left"))
    return (parts[0] if len(parts) == 1 else masks.And(tuple(parts))).key()


def _no_dropout(dropout_p: float, what: str) -> None:
    if dropout_p:
        raise ValueError(f"attnopt.attention: {what} has no attention dropout; pass dropout_p=0 (dropout runs in "
                         "exact attention with a tensor mask or none)")  # fmt: skip


def _softmax(mask, variant, is_causal, scale, dropout_p):
    """Exact and sparse attention: the checked call, ``run(q, k, v, dropout_p) -> (out, lse)`` (a closure, so the
    lse's gradient can call it again)."""
    extra = variant.mask if isinstance(variant, Sparse) else None  # a descriptor, or "auto" (the site's own mask)
    if extra == "auto":
        extra = None
    causal = CAUSAL_TOP_LEFT if is_causal else CAUSAL_NONE
    if extra is None and isinstance(variant, Sparse) and not is_descriptor(mask):
        _no_dropout(dropout_p, "exact-sparse attention (Sparse('auto'))")
        tensor = _tensor_mask(mask, is_causal)
        return lambda q, k, v, p: torch.ops.attnopt.sparse_attention_auto(q, k, v, tensor, causal, scale)
    descriptor = mask if is_descriptor(mask) else None
    if descriptor is None and extra is None:
        tensor = _tensor_mask(mask, is_causal)
        return lambda q, k, v, p: torch.ops.attnopt.attention(q, k, v, tensor, float(p), causal, scale,
                                                              new_seed() if p > 0.0 else None)  # fmt: skip
    _no_dropout(dropout_p, "attention under a mask descriptor (the sparse kernels)")
    tensor = None if descriptor is not None else _tensor_mask(mask, False)
    if tensor is not None and tensor.dim() < 4:  # the sparse op reads a 4-D mask; SDPA broadcasts leading dims
        tensor = tensor.reshape((1,) * (4 - tensor.dim()) + tuple(tensor.shape))
    key = _mask_key(descriptor, extra, bool(is_causal))
    return lambda q, k, v, p: torch.ops.attnopt.sparse_attention(q, k, v, tensor, None, key, scale)


def _lse_with_gradient(run, q, k, lse, scale: float, mask):
    """``lse`` carrying its gradient (the ops' backward differentiates the output only).

    ``d lse_i / d s_ij = P_ij`` with ``s = scale·q kᵀ``: dq_i gets ``scale·dlse_i·(P k)_i`` and dk_j
    ``scale·Σ_i dlse_i P_ij q_i``. One more call with the keys as values gives ``P k``, and its backward through
    those values ``Pᵀ(scale·dlse·q)``; the surrogate below has exactly these gradients and is zero in value.
    A floating-point mask that requires grad would need ``dlse_i P_ij`` as well: its lse stays detached.
    """
    if not torch.is_grad_enabled() or not (q.requires_grad or k.requires_grad):
        return lse.detach()
    if isinstance(mask, torch.Tensor) and mask.requires_grad:
        return lse.detach()
    pk, _ = run(q.detach(), k.detach(), k, 0.0)  # [B, Hq, Sq, D]: P k, differentiable through its values only
    surrogate = scale * ((q * pk.detach()).sum(-1) + (q.detach() * pk).sum(-1))
    return lse.detach() + (surrogate - surrogate.detach()).to(lse.dtype)


def _tensor_mask(mask, is_causal: bool):
    """``mask`` as the ops' ``attn_mask`` (a tensor or None), checked as SDPA checks it."""
    if mask is not None and not isinstance(mask, torch.Tensor):
        raise TypeError(f"attnopt.attention: mask must be a tensor, an attnopt.masks descriptor, a FlexAttention "
                        f"BlockMask or a mask_mod callable; got {type(mask).__name__}")  # fmt: skip
    check_mask_dtype(mask)
    if is_causal and mask is not None:
        raise ValueError("attnopt.attention: pass either a mask tensor or is_causal=True, not both (as SDPA); for "
                         "both, pass mask=attnopt.masks.causal('top-left') with the tensor under variant=Sparse(...)")  # fmt: skip
    return mask


def _linear(q, k, v, mask, variant: Linear, is_causal: bool, scale: float, dropout_p: float):
    _no_dropout(dropout_p, "linear attention")
    causal = _linear_causal(mask, variant, is_causal, q.shape[2], k.shape[2])
    if variant.decay == "lightning":
        raise ValueError("attnopt.attention: Linear(decay='lightning') needs a layer index, which a direct call has "
                         "not; pass the decays themselves: Linear(decay=λ) or one λ per query head")  # fmt: skip
    log_decay = None if variant.decay is None else site_log_decay(q, variant.decay, None, None)
    if log_decay is not None and not causal:
        raise ValueError("attnopt.attention: a decaying Linear weighs keys by their distance back from the query; "
                         "it needs is_causal=True (or Linear(causal=True))")  # fmt: skip
    out = torch.ops.attnopt.linear_attention(feature_map(q, variant.feature_map), feature_map(k, variant.feature_map),
                                             v, log_decay, causal, variant.normalize is True, scale, EPS, None,
                                             None)[0]  # fmt: skip
    return rms_norm(out) if variant.normalize == "rms" else out


def _linear_causal(mask, variant: Linear, is_causal: bool, sq: int, sk: int) -> bool:
    """Whether linear attention runs causal: ``is_causal`` or a causal descriptor (when Sq == Sk), else the
    variant's own ``causal``; any other mask is refused (linear attention has no scores to mask)."""
    if isinstance(mask, masks.Mask) and sq == sk and mask in (masks.causal(), masks.causal("top-left")):
        mask, is_causal = None, True
    if mask is not None:
        raise ValueError(f"attnopt.attention: linear attention has no score matrix, so it takes no mask (got "
                         f"{type(mask).__name__}); for causal attention pass is_causal=True, for padded keys zero "
                         "their values and features, or use a softmax variant")  # fmt: skip
    if variant.causal is False and is_causal:
        raise ValueError("attnopt.attention: Linear(causal=False) contradicts is_causal=True; drop one")
    causal = bool(is_causal or variant.causal)
    if causal and sq != sk:
        raise ValueError(f"attnopt.attention: causal linear attention needs as many queries as keys (Sq {sq}, Sk "
                         f"{sk}); continue a sequence through attnopt.generate's recurrent states instead")  # fmt: skip
    return causal


def _sigmoid(q, k, v, mask, variant: Sigmoid, is_causal: bool, scale: float, dropout_p: float):
    _no_dropout(dropout_p, "sigmoid attention")
    if is_descriptor(mask):
        raise ValueError(f"attnopt.attention: sigmoid attention takes a mask tensor, not the descriptor {mask}; pass "
                         "mask=descriptor.dense(Sq, Sk, heads)[None] (bool, True = attend) or is_causal=True")  # fmt: skip
    tensor = _tensor_mask(mask, is_causal)
    causal = CAUSAL_TOP_LEFT if is_causal else CAUSAL_NONE
    return torch.ops.attnopt.sigmoid_attention(q, k, v, tensor, causal, scale, variant.bias)


def _score_mod(q, k, v, score_mod, mask, variant, is_causal: bool, scale: float, enable_gqa: bool, dropout_p: float):
    """FlexAttention's score_mod, compiled into the exact kernels: ``(out, lse)``."""
    if not isinstance(variant, Exact):
        raise ValueError(f"attnopt.attention: score_mod runs in the exact softmax kernels, not with {variant.name} "
                         "attention; drop variant= (or put the mask in mask=)")  # fmt: skip
    _no_dropout(dropout_p, "attention with a score_mod")
    if mask is not None and not is_descriptor(mask):
        raise ValueError("attnopt.attention: with a score_mod, give the mask as a descriptor, a BlockMask or a "
                         "mask_mod (a tensor mask becomes part of the score_mod: score + bias[b, h, q_idx, kv_idx])")  # fmt: skip
    mask = None if mask is None else as_descriptor(mask)
    if is_causal and mask is not None:
        mask, is_causal = mask & masks.causal("top-left"), False
    return score_mod_kernels.attention(q, k, v, score_mod, mask=mask, scale=scale, enable_gqa=enable_gqa,
                                       is_causal=is_causal)


def varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k=None, *, is_causal: bool = False, scale: float | None = None,
                     enable_gqa: bool = False, return_lse: bool = False):  # fmt: skip
    """Packed variable-length sequences (``flash_attn_varlen_func``'s layout): q ``[Tq, Hq, D]``, k ``[Tk, Hkv, D]``,
    v ``[Tk, Hkv, Dv]`` hold the documents end to end, ``cu_seqlens_q`` = ``[0, n0, n0 + n1, ...]`` (``cu_seqlens_k``:
    the keys', None: the same). Each query sees the keys of its own document only (causal per document, aligned
    bottom-right within it, with ``is_causal``): :class:`attnopt.masks.Document`, whose tiles across documents the
    kernels never visit. Returns ``[Tq, Hq, Dv]`` (and the lse ``[Hq, Tq]``). The offsets are read on the host:
    under ``torch.compile`` pass them as lists (a tensor's values would be data-dependent)."""
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError(f"varlen_attention takes packed q, k, v [tokens, heads, D]; got {q.dim()}-D, {k.dim()}-D, "
                         f"{v.dim()}-D")  # fmt: skip
    mask = masks.Document.from_cu_seqlens(cu_seqlens_q, cu_seqlens_k, causal=bool(is_causal))
    out = attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), mask=mask, scale=scale,
                    enable_gqa=enable_gqa, return_lse=return_lse)  # fmt: skip
    if return_lse:
        return out[0].transpose(0, 1), out[1]
    return out.transpose(0, 1)
