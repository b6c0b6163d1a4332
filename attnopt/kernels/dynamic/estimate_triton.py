"""The estimators on CUDA: generated Triton kernels for ``pooled`` and ``antidiagonal``, torch for the rest.

:func:`estimate` is what the dynamic-sparse ops call for CUDA tensors: the kernels of
:mod:`attnopt.kernels.dynamic.estimate_render` when they take the inputs (:func:`refusal`), else the torch
estimator of :mod:`attnopt.kernels.dynamic.estimate` (which keeps its tensors on q's device). Both give the same
``[B, Hq, NQ, NK]`` fp32 probabilities; the kernels read q and k through their strides (GQA without repeating
k), take the causal rule as a run-time offset, launch one grid per call and never synchronize with the host.
"""

from __future__ import annotations

import contextlib

import torch

from attnopt.codegen.spec import dtype_name, inputs_refusal
from attnopt.kernels.dynamic import estimate as torch_estimators
from attnopt.kernels.dynamic.blocks import num_blocks
from attnopt.kernels.dynamic.estimate_render import MAX_HEAD_DIM, AntidiagonalSpec, PooledSpec, load
from attnopt.kernels.dynamic.render import block_refusal
from attnopt.kernels.launch import launch_first

ESTIMATORS = ("pooled", "antidiagonal")
POOL_ELEMENTS = 4096  # elements of a pooling step's [tile, ROWS, BLOCK_D] rows (32 fp32 registers a thread, 4 warps)


def refusal(name: str, q, k, block_m: int, block_n: int, params: dict) -> str | None:
    """Why the Triton kernels do not estimate ``name`` for these inputs (the torch estimator does), or None."""
    if name not in ESTIMATORS:
        return f"no Triton kernel for estimator {name!r} (Triton: {', '.join(ESTIMATORS)})"
    found = inputs_refusal(q, k, k, MAX_HEAD_DIM)
    if found:
        return found
    found = block_refusal(block_m, block_n)
    if found:
        return found
    allowed = {"pooled": {"rows", "sub"}, "antidiagonal": {"stride"}}[name]
    if set(params) - allowed:
        return f"{name} takes no options {sorted(set(params) - allowed)} (the torch estimator names the problem)"
    if name == "pooled":
        return _pooled_refusal(block_m, params.get("rows", 4), params.get("sub"))
    stride = params.get("stride", 16)
    if name == "antidiagonal" and (not isinstance(stride, int) or stride < 1 or block_m % stride or block_n % stride):
        return f"antidiagonal: stride {stride} must divide block_m {block_m} and block_n {block_n}"
    return None


def _pooled_refusal(block_m: int, rows, sub) -> str | None:
    """Why the Triton ``pooled`` does not take these options (the torch estimator runs them), or None."""
    if not isinstance(rows, int) or isinstance(rows, bool) or rows < 1:
        return f"pooled: rows must be a positive int; got {rows!r}"
    if sub is not None and (not isinstance(sub, int) or sub < 16 or sub & (sub - 1) or block_m % sub):
        return f"the Triton pooled takes sub-blocks that are powers of two from 16 dividing block_m; got sub={sub!r}"
    return None


def estimate(name: str, q, k, block_m: int, block_n: int, offset: int | None, scale: float | None = None,
             **params) -> torch.Tensor:  # fmt: skip
    """``[B, Hq, NQ, NK]`` fp32 block probabilities by estimator ``name``: the Triton kernel when
    :func:`refusal` has no objection, else the torch estimator."""
    if refusal(name, q, k, block_m, block_n, params) is not None:
        return torch_estimators.estimate(name, q, k, block_m, block_n, offset, scale, **params)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    run = pooled if name == "pooled" else antidiagonal
    return run(q.detach(), k.detach(), block_m, block_n, offset, scale, **params)


def pooled_specs(dtype: str, head_dim: int, causal: bool, block_m: int, block_n: int) -> list[PooledSpec]:
    """Launch configurations, most preferred first: 32 query blocks per program (the key pooling, repeated per
    program, is amortized over them), 16 key blocks per step; then 16 query blocks."""
    block_d = max(16, 1 << (head_dim - 1).bit_length())
    out = []
    for tile_q, warps in ((32, 4), (16, 4)):
        rows = max(1, min(block_m, block_n, POOL_ELEMENTS // (tile_q * block_d)))
        out.append(PooledSpec(dtype=dtype, head_dim=head_dim, causal=causal, block_m=block_m, block_n=block_n,
                              tile_q=tile_q, tile_k=16, rows=rows, num_warps=warps, num_stages=1))  # fmt: skip
    return out


def antidiagonal_specs(dtype: str, head_dim: int, causal: bool, block_m: int, block_n: int,
                       stride: int) -> list[AntidiagonalSpec]:  # fmt: skip
    """Launch configurations, most preferred first: 16 strided rows per program (at least a query block's), 64
    strided columns per step (at least a key block's), 32 for fp32 or head dims above 128 (registers)."""
    tile_r = max(16, block_m // stride)
    small = dtype == "float32" or head_dim > 128
    configs = [(max(32 if small else 64, block_n // stride), 4), (max(16, block_n // stride), 4)]
    return [AntidiagonalSpec(dtype=dtype, head_dim=head_dim, causal=causal, block_m=block_m, block_n=block_n,
                             stride=stride, tile_r=tile_r, tile_c=c, num_warps=w, num_stages=1)
            for c, w in dict.fromkeys(configs)]  # fmt: skip


def _args(q, k, out, offset, scale) -> dict:
    args = dict(Q=q, K=k, Out=out, num_heads=q.shape[1], group=q.shape[1] // k.shape[1], seq_q=q.shape[2],
                seq_k=k.shape[2], scale=scale)  # fmt: skip
    for name, t, dims in (("q", q, "bhmd"), ("k", k, "bhnd"), ("o", out, "bhmn")):
        args.update({f"stride_{name}{c}": t.stride(i) for i, c in enumerate(dims)})
    if offset is not None:
        args["causal_offset"] = offset
    return args


def _run(candidates, rows_of, q, k, out, offset, scale) -> torch.Tensor:
    """Launches the first candidate that compiles; ``rows_of(spec)``: the grid's first axis."""
    if out.numel() == 0 or k.shape[2] == 0:
        return out
    args = _args(q, k, out, offset, scale)

    def launch(spec) -> None:
        guard = torch.cuda.device(q.device) if q.is_cuda else contextlib.nullcontext()
        with guard:
            load(spec)[(rows_of(spec), q.shape[0] * q.shape[1])](**args, num_warps=spec.num_warps,
                                                                  num_stages=spec.num_stages)  # fmt: skip

    launch_first(candidates, launch, str(q.device))
    return out


def _empty(q, k, block_m, block_n) -> torch.Tensor:
    b, hq, sq, _ = q.shape
    return torch.zeros(b, hq, num_blocks(sq, block_m), num_blocks(k.shape[2], block_n), dtype=torch.float32,
                       device=q.device)  # fmt: skip


def pooled(q, k, block_m: int, block_n: int, offset: int | None, scale: float, rows: int = 4,
           sub: int | None = None) -> torch.Tensor:  # fmt: skip
    """The ``pooled`` estimator (see :func:`attnopt.kernels.dynamic.estimate.pooled`): its block logits (per query
    sub-block of ``sub`` rows) by the Triton kernel, the near blocks, the masked softmax and the mean over
    sub-blocks by torch on q's device (``O(NQ · NK)`` elementwise and the near blocks' small matmuls)."""
    block_q = block_m if sub is None else sub
    candidates = pooled_specs(dtype_name(q.dtype), q.shape[-1], offset is not None, block_q, block_n)
    nq = num_blocks(q.shape[2], block_q)
    logits = _run(candidates, lambda spec: -(-nq // spec.tile_q), q, k, _empty(q, k, block_q, block_n), offset,
                  scale)  # fmt: skip
    return torch_estimators.pooled_probabilities(logits, q, k, block_m, block_n, offset, scale, rows, sub)


def antidiagonal(q, k, block_m: int, block_n: int, offset: int | None, scale: float, stride: int = 16):
    """The ``antidiagonal`` estimator (see :func:`attnopt.kernels.dynamic.estimate.antidiagonal`) by the Triton
    kernel."""
    candidates = antidiagonal_specs(dtype_name(q.dtype), q.shape[-1], offset is not None, block_m, block_n, stride)
    rows = num_blocks(q.shape[2], block_m) * (block_m // stride)  # strided query rows (padded blocks included)
    return _run(candidates, lambda spec: -(-rows // spec.tile_r), q, k, _empty(q, k, block_m, block_n), offset,
                scale)  # fmt: skip


def arch_spec(spec, capability: tuple[int, int]):
    """The spec this launcher runs on a GPU of compute ``capability`` (the first candidate on every GPU; ``attnopt
    kernels build`` compiles it per target)."""
    return spec
