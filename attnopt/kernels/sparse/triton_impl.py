"""Sparse attention through the generated Triton kernels (:mod:`attnopt.kernels.sparse.render`): spec choice and launch.

``forward`` and ``backward`` are the CUDA implementations of ``torch.ops.attnopt.sparse_attention``
and its backward and match :mod:`attnopt.kernels.sparse.reference`. q, k, v, the extra mask and the
key padding are read through their strides (no copies; k and v never repeated for GQA). The block
map is built on the host in O(S/block) memory (:mod:`attnopt.masks.blockmap`), copied to the device
once per map, and its transpose (the backward's dK/dV order) once more. Triton is imported only when
the first kernel loads; under ``TRITON_INTERPRET=1`` the kernels run on CPU tensors (tests).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import weakref

import torch

from attnopt.codegen.spec import MAX_BATCH_HEADS
from attnopt.kernels.launch import device_capability, launch_first
from attnopt.kernels.sparse.render import SparseKernelSpec, arg_names, load_kernel
from attnopt.kernels.sparse.tiles import configs
from attnopt.masks import And, BlockSparse, Mask, Or
from attnopt.masks.expr import Expr, TritonOps

_DTYPES = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32"}
_DEVICE_MAPS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def supports(q: torch.Tensor, attn_mask: torch.Tensor | None = None) -> bool:
    """Whether the generated kernels take this call (else the blockwise path runs)."""
    on_device = q.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"
    extra_ok = attn_mask is None or (attn_mask.dim() == 4 and (attn_mask.dtype == torch.bool or attn_mask.is_floating_point()))
    return on_device and q.dtype in _DTYPES and q.shape[-1] <= 256 and extra_ok


def _layouts(mask: Mask) -> list[BlockSparse]:
    if isinstance(mask, BlockSparse):
        return [mask]
    if isinstance(mask, (And, Or)):
        return [leaf for p in mask.parts for leaf in _layouts(p)]
    return []


def predicate_source(mask: Mask) -> tuple[str, list[BlockSparse]]:
    """The Triton source of ``mask``'s element test and the BlockSparse masks whose layouts it reads.

    The source is the test expression, after one ``name = value`` line per intermediate the mask names
    (see :mod:`attnopt.masks.expr`)."""
    leaves = list(dict.fromkeys(_layouts(mask)))
    names = {leaf: (f"Layout{i}", f"layout{i}_stride_h", f"layout{i}_stride_m", leaf.layout.shape[0])
             for i, leaf in enumerate(leaves)}  # fmt: skip
    ops = TritonOps(names)
    expr = mask.predicate(Expr("rows2"), Expr("cols2"), Expr("off_h"), Expr("seq_q"), Expr("seq_k"), ops)
    return "\n".join([f"{name} = {src}" for name, src in ops.bindings] + [expr.src]), leaves


def _spec(direction, q, v, mask, bmap, kv_valid, attn_mask, softcap, warps, stages):
    if mask.traceable:
        source, leaves = predicate_source(mask)
    else:
        source, leaves = "", []
    extra = "none" if attn_mask is None else ("bool" if attn_mask.dtype == torch.bool else "additive")
    spec = SparseKernelSpec(
        direction=direction, head_dim=q.shape[-1], head_dim_v=v.shape[-1], dtype=_DTYPES[q.dtype],
        block_m=bmap.block_m, block_n=bmap.block_n, predicate=source, mask=str(mask),
        layouts=tuple(int(leaf.layout.shape[0]) for leaf in leaves), bits=bmap.tile_bits is not None,
        head_maps=bmap.heads > 1, padding=kv_valid is not None, extra=extra, softcap=softcap > 0.0,
        num_warps=warps, num_stages=stages,
    )  # fmt: skip
    return spec, leaves


def _device_map(bmap, device, transposed: bool = False):
    """The block map's tensors on ``device`` (cached per map), transposed for the dK/dV kernel."""
    per_map = _DEVICE_MAPS.setdefault(bmap, {})
    key = (str(device), transposed)
    if key not in per_map:
        m = bmap.transpose() if transposed else bmap
        bits = None if m.tile_bits is None else m.tile_bits.to(device=device, dtype=torch.uint8).contiguous()
        per_map[key] = (m.runs.to(device).contiguous(), m.num_runs.to(device).contiguous(), bits, m.runs.shape[1],
                        m.runs.shape[2])  # fmt: skip
    return per_map[key]


def _common_args(spec, leaves, q, k, v, kv_valid, attn_mask, runs, scale, softcap) -> dict:
    b, hq, sq, _ = q.shape
    runs_t, num_t, bits, n_rows, max_runs = runs
    args = dict(
        Q=q, K=k, V=v, Runs=runs_t, NumRuns=num_t,
        stride_qb=q.stride(0), stride_qh=q.stride(1), stride_qm=q.stride(2), stride_qd=q.stride(3),
        stride_kb=k.stride(0), stride_kh=k.stride(1), stride_kn=k.stride(2), stride_kd=k.stride(3),
        stride_vb=v.stride(0), stride_vh=v.stride(1), stride_vn=v.stride(2), stride_vd=v.stride(3),
        num_heads=hq, group=hq // k.shape[1], seq_q=sq, seq_k=k.shape[2], n_rows=n_rows, max_runs=max_runs,
        scale=float(scale), softcap=float(softcap) if softcap > 0.0 else 1.0,
    )  # fmt: skip
    if spec.bits:
        args["Bits"] = bits
    if spec.padding:
        kv = kv_valid.to(q.device).view(torch.uint8)
        args.update(KvValid=kv, stride_kv_b=kv.stride(0))
    if spec.extra != "none":
        x = attn_mask.expand(b, hq, sq, k.shape[2])
        x = x.view(torch.uint8) if x.dtype == torch.bool else x
        args.update(Extra=x, stride_xb=x.stride(0), stride_xh=x.stride(1), stride_xm=x.stride(2), stride_xn=x.stride(3))
    for i, leaf in enumerate(leaves):
        lay = leaf.layout.to(device=q.device, dtype=torch.uint8).contiguous()
        args.update({f"Layout{i}": lay, f"layout{i}_stride_h": lay.stride(0), f"layout{i}_stride_m": lay.stride(1)})
    return args


def _candidates(direction, q, k, v, mask, kv_valid, attn_mask, softcap, blocks) -> dict:
    """``{spec: (block map, layouts)}`` for the direction's tile configurations (:mod:`.tiles`, most preferred
    first; ``blocks`` (block_m, block_n) given: those tiles only), each with its own block map."""
    sq, sk, hq = q.shape[2], k.shape[2], q.shape[1]
    tiles = configs(direction, _DTYPES[q.dtype], q.shape[-1], v.shape[-1], device_capability(q))
    if blocks[0]:
        tiles = [(*blocks, *tiles[0][2:])]
    out = {}
    for bm, bn, warps, stages in tiles:
        bmap = mask.block_map(sq, sk, bm, bn, hq)
        spec, leaves = _spec(direction, q, v, mask, bmap, kv_valid, attn_mask, softcap, warps, stages)
        out.setdefault(spec, (bmap, leaves))
    return out


def _launch(spec, grid, args, device):
    kernel = load_kernel(spec)
    names = arg_names(spec)
    missing = [n for n in names if n not in args]
    if missing:
        raise RuntimeError(f"internal: no value for kernel arguments {missing}")
    guard = torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
    with guard:
        kernel[grid](**{n: args[n] for n in names}, num_warps=spec.num_warps, num_stages=spec.num_stages)


def _validate(q, k, v, kv_valid, attn_mask):
    if q.dtype not in _DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"the sparse kernels take float16, bfloat16 or float32 q, k, v of one dtype; got "
                         f"{q.dtype}, {k.dtype}, {v.dtype}")  # fmt: skip
    if q.shape[0] * q.shape[1] > MAX_BATCH_HEADS:
        raise ValueError(f"batch * query heads must be at most {MAX_BATCH_HEADS}; got {q.shape[0] * q.shape[1]}")
    if attn_mask is not None:
        try:
            attn_mask.expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])
        except RuntimeError as e:
            raise ValueError(f"attn_mask of shape {tuple(attn_mask.shape)} does not broadcast to "
                             f"{(q.shape[0], q.shape[1], q.shape[2], k.shape[2])}") from e  # fmt: skip


def forward(q, k, v, mask: Mask, kv_valid=None, attn_mask=None, scale=None, softcap=0.0, block_m=None, block_n=None):
    """``(out [B, Hq, Sq, Dv] in q.dtype, lse [B, Hq, Sq] fp32)``."""
    _validate(q, k, v, kv_valid, attn_mask)
    b, hq, sq, d = q.shape
    sk = k.shape[2]
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    out = torch.empty(b, hq, sq, v.shape[-1], dtype=q.dtype, device=q.device)
    lse = torch.empty(b, hq, sq, dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse
    candidates = _candidates("fwd", q, k, v, mask, kv_valid, attn_mask, softcap, (block_m, block_n))

    def launch(spec) -> None:
        bmap, leaves = candidates[spec]
        args = _common_args(spec, leaves, q, k, v, kv_valid, attn_mask, _device_map(bmap, q.device), scale, softcap)
        args.update(Out=out, Lse=lse, stride_ob=out.stride(0), stride_oh=out.stride(1), stride_om=out.stride(2),
                    stride_od=out.stride(3))  # fmt: skip
        _launch(spec, (-(-sq // spec.block_m), b * hq), args, q.device)

    launch_first(list(candidates), launch, str(q.device))
    return out, lse


def backward(dout, q, k, v, out, lse, mask: Mask, kv_valid=None, attn_mask=None, scale=None, softcap=0.0,
             block_m=None, block_n=None):  # fmt: skip
    """``(dq, dk, dv)``: the dQ kernel over the block map, the dK/dV kernel over its transpose."""
    _validate(q, k, v, kv_valid, attn_mask)
    b, hq, sq, d = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    if q.numel() == 0 or sk == 0:
        return dq, dk, dv
    lse = lse.float().contiguous()
    delta = (dout.float() * out.float()).sum(-1).contiguous()  # [B, Hq, Sq] rowsum(dO ⊙ O)
    grads = dict(DO=dout, Lse=lse, Delta=delta, stride_ob=dout.stride(0), stride_oh=dout.stride(1),
                 stride_om=dout.stride(2), stride_od=dout.stride(3))  # fmt: skip
    blocks = (block_m, block_n)
    candidates = _candidates("dq", q, k, v, mask, kv_valid, attn_mask, softcap, blocks)

    def launch_dq(spec) -> None:
        bmap, leaves = candidates[spec]
        args = _common_args(spec, leaves, q, k, v, kv_valid, attn_mask, _device_map(bmap, q.device), scale, softcap)
        args.update(grads, DQ=dq, stride_dqb=dq.stride(0), stride_dqh=dq.stride(1), stride_dqm=dq.stride(2),
                    stride_dqd=dq.stride(3))  # fmt: skip
        _launch(spec, (-(-sq // spec.block_m), b * hq), args, q.device)

    launch_first(list(candidates), launch_dq, str(q.device))
    kv_candidates = _candidates("dkdv", q, k, v, mask, kv_valid, attn_mask, softcap, blocks)

    def launch_dkdv(spec) -> None:
        bmap, leaves = kv_candidates[spec]
        runs = _device_map(bmap, q.device, transposed=True)  # the dK/dV order: query tiles per key tile
        args = _common_args(spec, leaves, q, k, v, kv_valid, attn_mask, runs, scale, softcap)
        args.update(grads, DK=dk, DV=dv,
                    stride_dkb=dk.stride(0), stride_dkh=dk.stride(1), stride_dkn=dk.stride(2), stride_dkd=dk.stride(3),
                    stride_dvb=dv.stride(0), stride_dvh=dv.stride(1), stride_dvn=dv.stride(2), stride_dvd=dv.stride(3))  # fmt: skip
        _launch(spec, (-(-sk // spec.block_n), b * hkv), args, q.device)

    launch_first(list(kv_candidates), launch_dkdv, str(q.device))
    return dq, dk, dv


def arch_spec(spec: SparseKernelSpec, capability: tuple[int, int]) -> SparseKernelSpec:
    """The spec this launcher runs on a GPU of compute ``capability`` for the kernel ``spec`` names: its tiles
    from :func:`attnopt.kernels.sparse.tiles.configs` (``attnopt kernels build`` compiles it per target; the
    spec's block-map flags, ``bits`` and ``head_maps``, do not depend on the tiles)."""
    bm, bn, warps, stages = configs(spec.direction, spec.dtype, spec.head_dim, spec.head_dim_v, tuple(capability))[0]
    return dataclasses.replace(spec, block_m=bm, block_n=bn, num_warps=warps, num_stages=stages)
