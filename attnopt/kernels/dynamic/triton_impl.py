"""Block-list attention through the generated Triton kernels (:mod:`attnopt.kernels.dynamic.render`).

``forward`` and ``backward`` are the CUDA implementations behind ``torch.ops.attnopt.block_sparse_attention``
(and ``dynamic_attention``), matching :mod:`attnopt.kernels.dynamic.reference`. q, k, v are read through their
strides (GQA without repeating k and v); a selection with one head is read with head stride 0; the key padding
as uint8. The tiles are the selection's blocks: powers of two in 16..128 (:func:`refusal`).
"""

from __future__ import annotations

import contextlib

import torch

from attnopt.codegen.spec import dtype_name, inputs_refusal
from attnopt.kernels.dynamic.render import MAX_HEAD_DIM, block_refusal, load, specs
from attnopt.kernels.launch import device_capability, launch_first


def refusal(q, k, v, block_m: int, block_n: int) -> str | None:
    """Why the kernels cannot take these inputs, or None."""
    return inputs_refusal(q, k, v, MAX_HEAD_DIM) or block_refusal(block_m, block_n)


def _check(q, k, v, block_m, block_n) -> None:
    why = refusal(q, k, v, block_m, block_n)
    if why:
        raise ValueError(f"block-sparse attention on {q.device}: {why}")


def _common(q, k, v, kv_num, kv_idx, kv_valid, scale) -> dict:
    hq, sq, d = q.shape[1], q.shape[2], q.shape[3]
    args = dict(Q=q, K=k, V=v, KvNum=kv_num, KvIdx=kv_idx, num_heads=hq, group=hq // k.shape[1], seq_q=sq,
                seq_k=k.shape[2], scale=d ** -0.5 if scale is None else float(scale))  # fmt: skip
    for name, t, dims in (("q", q, "bhmd"), ("k", k, "bhnd"), ("v", v, "bhnd")):
        args.update({f"stride_{name}{c}": t.stride(i) for i, c in enumerate(dims)})
    shared = kv_num.shape[1] == 1  # one selection for every head: head stride 0
    args.update(stride_num_b=kv_num.stride(0), stride_num_h=0 if shared else kv_num.stride(1),
                stride_idx_b=kv_idx.stride(0), stride_idx_h=0 if shared else kv_idx.stride(1),
                stride_idx_m=kv_idx.stride(2))  # fmt: skip
    if kv_valid is not None:
        args["Valid"] = kv_valid.contiguous().view(torch.uint8)
    return args


def _launch(direction, q, v, causal, valid, block_m, block_n, args) -> None:
    candidates = specs(direction, q.shape[-1], v.shape[-1], dtype_name(q.dtype), causal, valid, block_m, block_n,
                       device_capability(q))  # fmt: skip

    def launch(spec) -> None:
        grid = (-(-q.shape[2] // block_m) * (block_m // spec.block_r), q.shape[0] * q.shape[1])
        guard = torch.cuda.device(q.device) if q.is_cuda else contextlib.nullcontext()
        with guard:
            load(spec)[grid](**args, num_warps=spec.num_warps, num_stages=spec.num_stages)

    launch_first(candidates, launch, str(q.device))


def forward(q, k, v, kv_num, kv_idx, block_m, block_n, causal=0, kv_valid=None, scale=None):
    """``(out [B, Hq, Sq, Dv] in q.dtype, lse [B, Hq, Sq] fp32)``."""
    _check(q, k, v, block_m, block_n)
    b, hq, sq, _ = q.shape
    out = torch.empty(b, hq, sq, v.shape[-1], dtype=q.dtype, device=q.device)
    lse = torch.empty(b, hq, sq, dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse.fill_(float("-inf"))
    args = _common(q, k, v, kv_num.contiguous(), kv_idx.contiguous(), kv_valid, scale)
    args.update(Out=out, Lse=lse, **{f"stride_o{c}": out.stride(i) for i, c in enumerate("bhmd")})
    _launch("fwd", q, v, causal, kv_valid is not None, block_m, block_n, args)
    return out, lse


def backward(dout, q, k, v, out, lse, kv_num, kv_idx, block_m, block_n, causal=0, kv_valid=None, scale=None):
    """``(dq, dk, dv)`` on the forward's lists (dK and dV accumulated in fp32 with atomics)."""
    _check(q, k, v, block_m, block_n)
    dq = torch.empty_like(q)
    dk = torch.zeros(k.shape, dtype=torch.float32, device=q.device)
    dv = torch.zeros(v.shape, dtype=torch.float32, device=q.device)
    if q.numel() and k.shape[2]:
        delta = (dout.float() * out.float()).sum(-1).contiguous()  # rowsum(dO ⊙ O) [B, Hq, Sq]
        args = _common(q, k, v, kv_num.contiguous(), kv_idx.contiguous(), kv_valid, scale)
        args.update(DO=dout, Lse=lse.float().contiguous(), Delta=delta, DQ=dq, DK=dk, DV=dv)
        for name, t, dims in (("do", dout, "bhmd"), ("dq", dq, "bhmd"), ("dk", dk, "bhnd"), ("dv", dv, "bhnd")):
            args.update({f"stride_{name}{c}": t.stride(i) for i, c in enumerate(dims)})
        _launch("bwd", q, v, causal, kv_valid is not None, block_m, block_n, args)
    else:
        dq.zero_()
    return dq, dk.to(k.dtype), dv.to(v.dtype)


def arch_spec(spec, capability: tuple[int, int]):
    """The spec this launcher runs on a GPU of compute ``capability`` for the kernel ``spec`` names (the first of
    :func:`attnopt.kernels.dynamic.render.specs` there; ``attnopt kernels build`` compiles it per target)."""
    return specs(spec.direction, spec.head_dim, spec.head_dim_v, spec.dtype, spec.causal, spec.valid, spec.block_m,
                 spec.block_n, tuple(capability))[0]  # fmt: skip
