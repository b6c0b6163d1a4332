"""Exact attention forward through the generated Triton kernel: validation, spec choice and launch.

``forward`` is the CUDA implementation behind ``torch.ops.attnopt.attention`` (without dropout) and
matches ``reference.attention_forward``: ``out`` in q's dtype, ``lse`` fp32 natural-log, fully masked
rows give zeros and ``-inf``. q, k, v and the mask are read through their strides (no copies, k and v
never repeated for GQA, broadcast mask dims read with stride 0). Triton is imported only when the
first kernel is loaded.
"""

from __future__ import annotations

import contextlib
import math

import torch

from attnopt.codegen.cache import load_kernel
from attnopt.codegen.render import LOG2E
from attnopt.codegen.spec import CAUSAL_MODES, MAX_HEAD_DIM, default_spec, dtype_name, mask_kind

MAX_BATCH_HEADS = 65535  # the grid's second axis (B * Hq) is limited to 65535 programs on CUDA


def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None = None,
            causal: int = 0, scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns ``(out [B, Hq, Sq, Dv] in q.dtype, lse [B, Hq, Sq] fp32 contiguous)``; see the module docstring.

    ``scale`` defaults to ``1 / sqrt(D)``. Raises ValueError for inputs the kernel does not take.
    """
    mask = _validate(q, k, v, attn_mask, causal)
    b, hq, sq, d = q.shape
    hkv, sk, dv = k.shape[1], k.shape[2], v.shape[3]
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    out = torch.empty((b, hq, sq, dv), dtype=q.dtype, device=q.device)
    lse = torch.empty((b, hq, sq), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse

    spec = default_spec(q, k, v, attn_mask, causal)
    kernel = load_kernel(spec)
    args = dict(
        Q=q, K=k, V=v, Out=out, Lse=lse,
        stride_qb=q.stride(0), stride_qh=q.stride(1), stride_qm=q.stride(2), stride_qd=q.stride(3),
        stride_kb=k.stride(0), stride_kh=k.stride(1), stride_kn=k.stride(2), stride_kd=k.stride(3),
        stride_vb=v.stride(0), stride_vh=v.stride(1), stride_vn=v.stride(2), stride_vd=v.stride(3),
        stride_ob=out.stride(0), stride_oh=out.stride(1), stride_om=out.stride(2), stride_od=out.stride(3),
        num_heads=hq, group=hq // hkv, seq_q=sq, seq_k=sk, qk_scale=scale * LOG2E,
    )
    if mask is not None:
        args.update(
            Mask=mask,
            stride_mask_b=mask.stride(0), stride_mask_h=mask.stride(1),
            stride_mask_m=mask.stride(2), stride_mask_n=mask.stride(3),
        )
    grid = (-(-sq // spec.block_m), b * hq)
    guard = torch.cuda.device(q.device) if q.is_cuda else contextlib.nullcontext()
    with guard:
        kernel[grid](**args, num_warps=spec.num_warps, num_stages=spec.num_stages)
    return out, lse


def _validate(q, k, v, attn_mask, causal) -> torch.Tensor | None:
    """Raises ValueError for unsupported inputs; returns the mask as a [B, Hq, Sq, Sk] strided view (or None).

    Boolean masks are viewed as uint8 (same bytes), so the kernel loads plain bytes.
    """
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be 4-D [B, H, S, D]; got {q.dim()}-D, {k.dim()}-D, {v.dim()}-D")
    dtype_name(q.dtype)
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v must share one dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.device != q.device or v.device != q.device:
        raise ValueError(f"q, k, v must be on one device; got {q.device}, {k.device}, {v.device}")
    b, hq, sq, d = q.shape
    if k.shape[0] != b or v.shape[0] != b or k.shape[1] != v.shape[1] or k.shape[2] != v.shape[2] or k.shape[3] != d:
        raise ValueError(f"incompatible shapes q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if k.shape[1] == 0 or hq % k.shape[1] != 0:
        raise ValueError(f"query heads ({hq}) must be a multiple of key/value heads ({k.shape[1]})")
    for name, dim in (("q/k", d), ("v", v.shape[3])):
        if not 1 <= dim <= MAX_HEAD_DIM:
            raise ValueError(f"{name} head dim must be in 1..{MAX_HEAD_DIM}; got {dim}")
    if causal not in CAUSAL_MODES:
        raise ValueError(f"causal must be one of {CAUSAL_MODES} (none, top-left, bottom-right); got {causal!r}")
    if b * hq > MAX_BATCH_HEADS:
        raise ValueError(f"batch * query heads must be at most {MAX_BATCH_HEADS}; got {b * hq}")
    if attn_mask is None:
        return None
    kind = mask_kind(attn_mask)
    if attn_mask.device != q.device:
        raise ValueError(f"attn_mask must be on {q.device}; got {attn_mask.device}")
    target = (b, hq, sq, k.shape[2])
    try:
        mask = attn_mask.expand(target)
    except RuntimeError as e:
        raise ValueError(f"attn_mask of shape {tuple(attn_mask.shape)} does not broadcast to {target}") from e
    return mask.view(torch.uint8) if kind == "bool" else mask
