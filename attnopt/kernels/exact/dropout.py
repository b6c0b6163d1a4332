"""The dropout keep-mask of the generated attention kernels, materialized (for tests and debugging).

Element ``(bh, i, j)`` of ``[B * Hq, Sq, Sk]`` is kept where
``tl.rand(seed, philox_offset + (bh * Sq + i) * Sk + j) >= dropout_p``: the same Philox draw as the
``dropout_keep`` lines rendered by :mod:`attnopt.kernels.exact.render_common`. Importing this module imports triton.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

BLOCK = 1024


@triton.jit(do_not_specialize=["seed", "philox_offset"])
def _keep_mask_kernel(Keep, numel, dropout_p, seed, philox_offset):
    """Keep [numel] uint8 (flat [B * Hq, Sq, Sk]). Grid: (cdiv(numel, BLOCK),)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # [BLOCK] flat element index
    kept = tl.rand(seed, philox_offset + offs) >= dropout_p  # [BLOCK]
    tl.store(Keep + offs, kept.to(tl.uint8), mask=offs < numel)


def keep_mask(shape: tuple[int, int, int, int], dropout_p: float, seed: int, philox_offset: int,
              device: torch.device) -> torch.Tensor:
    keep = torch.empty(shape, dtype=torch.uint8, device=device)
    if keep.numel():
        guard = torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
        with guard:
            _keep_mask_kernel[(triton.cdiv(keep.numel(), BLOCK),)](keep, keep.numel(), dropout_p, seed, philox_offset)
    return keep.view(torch.bool)
