"""Sigmoid attention through the generated Triton kernels: validation, spec choice and launches.

``forward`` and ``backward`` are the CUDA implementations behind ``torch.ops.attnopt.sigmoid_attention``
and its backward, matching :mod:`attnopt.kernels.sigmoid.reference`. q, k, v and the mask are read
through their strides (GQA without repeating k and v; broadcast mask dims read with stride 0; boolean
masks as uint8). ``bias`` None means ``-log(Sk)``. The gradient of an additive mask is the score
gradient ``dS``, stored by the ``bwd_q`` kernel into a ``[B, Hq, Sq, Sk]`` fp32 buffer (O(S²) memory,
only when asked) and summed over the mask's broadcast dims. See :mod:`attnopt.kernels.sigmoid.render`.
"""

from __future__ import annotations

import contextlib
import math

import torch

from attnopt.codegen.spec import dtype_name, inputs_refusal
from attnopt.kernels.launch import device_capability, launch_first
from attnopt.kernels.sigmoid.render import MAX_HEAD_DIM, load, specs


def supported(q, k, v, attn_mask) -> str | None:
    """Why the kernels cannot take these inputs (the op then runs the reference), or None."""
    refusal = inputs_refusal(q, k, v, MAX_HEAD_DIM)
    if refusal:
        return refusal
    if attn_mask is not None and not (attn_mask.dtype == torch.bool or attn_mask.is_floating_point()):
        return f"masks are bool or floating point; got {attn_mask.dtype}"
    return None


def _mask(attn_mask, q, k) -> tuple[torch.Tensor | None, str]:
    """The mask as a strided [B, Hq, Sq, Sk] view (bool as uint8) and its kind."""
    if attn_mask is None:
        return None, "none"
    target = (q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    try:
        mask = attn_mask.expand(target)
    except RuntimeError as e:
        raise ValueError(f"attn_mask of shape {tuple(attn_mask.shape)} does not broadcast to {target}") from e
    if attn_mask.dtype == torch.bool:
        return mask.view(torch.uint8), "bool"
    return mask, "additive"


def _common(q, k, v, attn_mask, scale, bias) -> tuple[dict, str]:
    _, hq, sq, d = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    mask, kind = _mask(attn_mask, q, k)
    if bias is None:
        bias = -math.log(sk) if sk else 0.0  # the default -log(Sk); unused without keys
    args = dict(Q=q, K=k, V=v, num_heads=hq, group=hq // hkv, seq_q=sq, seq_k=sk,
                scale=1.0 / math.sqrt(d) if scale is None else float(scale), bias=float(bias))  # fmt: skip
    for name, t, dims in (("q", q, "bhmd"), ("k", k, "bhnd"), ("v", v, "bhnd")):
        args.update({f"stride_{name}{c}": t.stride(i) for i, c in enumerate(dims)})
    if mask is not None:
        args["Mask"] = mask
        args.update({f"stride_mask_{c}": mask.stride(i) for i, c in enumerate("bhmn")})
    return args, kind


def _launch(candidates, grid, args, like):
    """Launches the first of ``candidates`` the GPU takes (a rejected one falls back to the next, see
    :func:`attnopt.kernels.launch.launch_first`); ``grid(spec)`` is its launch grid."""

    def launch(spec) -> None:
        guard = torch.cuda.device(like.device) if like.is_cuda else contextlib.nullcontext()
        with guard:
            load(spec)[grid(spec)](**args, num_warps=spec.num_warps, num_stages=spec.num_stages)

    launch_first(candidates, launch, str(like.device))


def forward(q, k, v, attn_mask=None, causal=0, scale=None, bias=None) -> torch.Tensor:
    """Returns ``out [B, Hq, Sq, Dv]`` in q's dtype."""
    b, hq, sq, d = q.shape
    dv = v.shape[-1]
    out = torch.empty((b, hq, sq, dv), dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out
    args, kind = _common(q, k, v, attn_mask, scale, bias)
    args["Out"] = out
    args.update({f"stride_o{c}": out.stride(i) for i, c in enumerate("bhmd")})
    candidates = specs("fwd", d, dv, dtype_name(q.dtype), causal, kind, capability=device_capability(q))
    _launch(candidates, lambda spec: (-(-sq // spec.block_m), b * hq), args, q)
    return out


def backward(dout, q, k, v, attn_mask=None, causal=0, scale=None, bias=None, mask_grad=False):
    """Returns ``(dq, dk, dv, dmask)``; ``dmask``, the gradient of the additive ``attn_mask`` in its own
    shape and dtype, is None unless ``mask_grad``."""
    b, hq, sq, d = q.shape
    hkv, sk, dv = k.shape[1], k.shape[2], v.shape[-1]
    if mask_grad and (attn_mask is None or not attn_mask.is_floating_point()):
        raise ValueError("mask_grad needs an additive (floating point) attn_mask")
    dq = torch.zeros_like(q)
    ds = torch.zeros((b, hq, sq, sk), dtype=torch.float32, device=q.device) if mask_grad else None
    dk = torch.zeros((b, hq, sk, d), dtype=torch.float32, device=q.device)
    dvh = torch.zeros((b, hq, sk, dv), dtype=torch.float32, device=q.device)
    if sq > 0 and sk > 0 and b * hq > 0:
        args, kind = _common(q, k, v, attn_mask, scale, bias)
        args["DO"] = dout
        args.update({f"stride_do{c}": dout.stride(i) for i, c in enumerate("bhmd")})
        kv = dict(args, DK=dk, DV=dvh, **{f"stride_dk{c}": dk.stride(i) for i, c in enumerate("bhnd")},
                  **{f"stride_dv{c}": dvh.stride(i) for i, c in enumerate("bhnd")})  # fmt: skip
        cap = device_capability(q)
        candidates = specs("bwd_kv", d, dv, dtype_name(q.dtype), causal, kind, capability=cap)
        _launch(candidates, lambda spec: (-(-sk // spec.block_n), b * hq), kv, q)
        qargs = dict(args, DQ=dq, **{f"stride_dq{c}": dq.stride(i) for i, c in enumerate("bhmd")})
        if mask_grad:
            qargs["DS"] = ds
        candidates = specs("bwd_q", d, dv, dtype_name(q.dtype), causal, kind, mask_grad, cap)
        _launch(candidates, lambda spec: (-(-sq // spec.block_m), b * hq), qargs, q)
    dk = dk.reshape(b, hkv, hq // hkv, sk, d).sum(dim=2).to(k.dtype)
    dvk = dvh.reshape(b, hkv, hq // hkv, sk, dv).sum(dim=2).to(v.dtype)
    dmask = ds.sum_to_size(attn_mask.shape).to(attn_mask.dtype) if mask_grad else None  # over broadcast dims
    return dq, dk, dvk, dmask


def arch_spec(spec, capability: tuple[int, int]):
    """The spec this launcher runs on a GPU of compute ``capability`` for the kernel ``spec`` names (the first
    of :func:`attnopt.kernels.sigmoid.render.specs` there; ``attnopt kernels build`` compiles it per target)."""
    return specs(spec.direction, spec.head_dim, spec.head_dim_v, spec.dtype, spec.causal, spec.mask, spec.write_ds,
                 tuple(capability))[0]  # fmt: skip
