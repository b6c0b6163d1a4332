"""No allocation on the sparse CPU path grows as S²: the largest tensor made, beside a dense run."""

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from attnopt import masks
from attnopt.kernels.sparse import blockwise
from attnopt.kernels.sparse.structure import recognize


class _Largest(TorchDispatchMode):
    """Records the largest new storage (in bytes) that any op returns while active (views of inputs don't count)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {a.untyped_storage().data_ptr() for a in torch.utils._pytree.tree_leaves((args, kwargs))
                  if isinstance(a, torch.Tensor)}  # fmt: skip
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                self.largest = max(self.largest, t.untyped_storage().nbytes())
        return out


def _largest(fn) -> int:
    with _Largest() as mode:
        fn()
    return mode.largest


def _sparse_step(s, mask, heads=2, dim=32):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, heads, s, dim, generator=g) for _ in range(3))
    kv_valid = torch.ones(1, s, dtype=torch.bool)
    kv_valid[0, -5:] = False

    def run():
        out, lse = blockwise.forward(q, k, v, mask, kv_valid, None, dim ** -0.5)
        blockwise.backward(torch.ones_like(out), q, k, v, out, lse, mask, kv_valid, None, dim ** -0.5)

    return run


def test_sparse_allocations_stay_far_below_dense_and_grow_linearly():
    mask = masks.SlidingWindow(127, 0)
    s = 4096
    sparse = _largest(_sparse_step(s, mask))
    sparse_2s = _largest(_sparse_step(2 * s, mask))
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, s, 32, generator=g, requires_grad=True) for _ in range(3))
    dense_mask = mask.dense(s, s)[0]  # what a dense run needs: S² booleans, before any score

    def dense():
        F.scaled_dot_product_attention(q, k, v, attn_mask=dense_mask).sum().backward()

    dense_bytes = max(_largest(dense), dense_mask.numel())
    s2_fp32 = 2 * s * s * 4  # the [H, S, S] fp32 score matrix of one dense head pair
    assert sparse * 16 < dense_bytes, (sparse, dense_bytes)
    assert sparse * 32 < s2_fp32, (sparse, s2_fp32)
    assert sparse_2s < 2.5 * sparse, (sparse, sparse_2s)  # linear in S, not quadratic


def test_structured_and_neighborhood_block_maps_are_small_at_large_sizes():
    """Metadata only (no attention run): S = 64k tokens, causal, a window, a 2-D neighborhood (S² would be 4 Gi)."""
    s = 1 << 16
    for mask in (masks.causal(), masks.SlidingWindow(2047, 0), masks.Neighborhood(13, grid=(256, 256))):
        largest = _largest(lambda: mask.block_map(s, s, 128, 128))
        assert largest < 16 << 20, (str(mask), largest)


def test_recognizing_a_models_mask_reads_it_in_row_chunks():
    """Exact-sparse checks the site's [B, 1, S, S] mask without a second S x S tensor."""
    s = 2048
    mask = masks.SlidingWindow(511, 0).dense(s, s)[None]  # [1, 1, S, S] bool, as a model would pass it
    additive = torch.zeros(1, 1, s, s).masked_fill(~mask, torch.finfo(torch.float32).min)
    for m in (mask, additive):
        found = []
        largest = _largest(lambda: found.append(recognize(m, 0, 1, 8, s, s)))
        assert found[0][0] == masks.SlidingWindow(511, 0) and found[0][1] is None
        assert largest * 2 < s * s, largest
