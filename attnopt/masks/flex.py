"""FlexAttention's ``BlockMask`` as a mask descriptor (docs/functional.md).

A BlockMask is a ``mask_mod`` plus a block structure: per (batch row, head, query block), the key blocks it
visits, split into *full* blocks (every element visible, the mask_mod is not called) and *partial* ones (the
mask_mod decides per element); every other block is skipped. :func:`from_block_mask` gives exactly that
function as a :class:`~attnopt.masks.MaskMod`, evaluated per element like any other::

    visible(b, h, q, k) = full[b, h, q // BQ, k // BK] | (partial[b, h, q // BQ, k // BK] & mask_mod(b, h, q, k))

This module reads the BlockMask's public attributes only; it imports nothing of ``torch.nn.attention``.
"""

from __future__ import annotations

from collections import OrderedDict

import torch

from attnopt.masks.general import MaskMod

# BlockMask -> its descriptor, per object (a BlockMask is built once and called many times; the descriptor's key
# then names it the same way every call). Holds the BlockMask itself, so an id is never reused while cached.
_CACHE: OrderedDict = OrderedDict()
_CACHE_SIZE = 64


def is_block_mask(obj) -> bool:
    """Whether ``obj`` is a FlexAttention BlockMask (by its attributes, without importing FlexAttention)."""
    return all(hasattr(obj, a) for a in ("mask_mod", "BLOCK_SIZE", "kv_num_blocks", "kv_indices", "seq_lengths"))


def _dense(num_blocks: torch.Tensor, indices: torch.Tensor, columns: int) -> torch.Tensor:
    """bool [B, H, query blocks, columns]: the key blocks listed in ``indices[..., :num_blocks]``, on the BlockMask's
    device (where its mask_mod's tensors live: the wrapper is evaluated there)."""
    listed = torch.arange(indices.shape[-1], device=indices.device) < num_blocks.unsqueeze(-1)
    cols = torch.where(listed, indices.long(), columns)  # unlisted entries go to a spare column, dropped below
    out = torch.zeros(*indices.shape[:-1], columns + 1, dtype=torch.bool, device=indices.device)
    return out.scatter(-1, cols, True)[..., :columns]


def from_block_mask(block_mask) -> MaskMod:
    """The mask of a FlexAttention ``BlockMask``: its mask_mod on its partial blocks, its full blocks whole."""
    found = _CACHE.get(id(block_mask))
    if found is not None and found[0] is block_mask:
        _CACHE.move_to_end(id(block_mask))
        return found[1]
    bq, bk = (block_mask.BLOCK_SIZE, block_mask.BLOCK_SIZE) if isinstance(block_mask.BLOCK_SIZE, int) \
        else block_mask.BLOCK_SIZE  # fmt: skip
    columns = -(-int(block_mask.seq_lengths[1]) // int(bk))
    partial = _dense(block_mask.kv_num_blocks, block_mask.kv_indices, columns)
    full = None
    if block_mask.full_kv_num_blocks is not None:
        full = _dense(block_mask.full_kv_num_blocks, block_mask.full_kv_indices, columns)
    inner = block_mask.mask_mod
    per_batch, per_head = partial.shape[0] > 1, partial.shape[1] > 1

    def block_mask_mod(b, h, q_idx, kv_idx):
        at = (b if per_batch else 0, h if per_head else 0, q_idx // bq, kv_idx // bk)
        out = partial[at] & inner(b, h, q_idx, kv_idx)
        return out if full is None else full[at] | out

    mask = MaskMod(block_mask_mod, name=f"BlockMask({getattr(inner, '__name__', 'mask_mod')})")
    _CACHE[id(block_mask)] = (block_mask, mask)
    while len(_CACHE) > _CACHE_SIZE:
        _CACHE.popitem(last=False)
    return mask
