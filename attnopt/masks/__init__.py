"""Mask descriptors for sparse attention (docs/architecture.md, Masks).

    from attnopt import masks
    m = masks.SlidingWindow(255, 0) & masks.causal()
    m.allows(q_idx, kv_idx, sq, sk)          # element test on index tensors
    m.block_map(8192, 8192, 64, 64)          # runs of key tiles per query tile, O(S/block) metadata
    m.tile_count(64, 64)                     # sympy closed form of the key tiles per query tile
    m.density(8192, 8192); print(m.draw(16, 16)); m.png("mask.png", 64, 64, block=(16, 16))
    masks.Neighborhood(13, grid=(128, 128), tile=(8, 8))   # 2-D NATTEN neighborhood, run on 8x8 spatial tiles
    masks.Document((100, 28), causal=True)                  # packed sequences, each causal on its own
    masks.causal("top-left")                                # SDPA's is_causal (masks.causal() is bottom-right)

Importing this package needs torch only (sympy and matplotlib are imported when used).
"""

from attnopt.masks.base import EMPTY, FULL, PARTIAL, And, Mask, Or, from_dict, lookup
from attnopt.masks.blockmap import KIND_BITS, KIND_FULL, KIND_PARTIAL, BlockMap, build
from attnopt.masks.general import BlockSparse, MaskMod, from_mask_mod
from attnopt.masks.flex import from_block_mask
from attnopt.masks.sliding_window import SlidingWindow, TopLeft, causal
from attnopt.masks.document import Document
from attnopt.masks.neighborhood import Neighborhood
from attnopt.masks.blocked import Blocked
from attnopt.masks.global_local import GlobalLocal
from attnopt.masks.strided import Strided
from attnopt.masks.residue import ResidueOrder, residue_order
from attnopt.masks.dynamic import Dynamic

__all__ = [
    "EMPTY", "FULL", "KIND_BITS", "KIND_FULL", "KIND_PARTIAL", "PARTIAL", "And", "BlockMap", "BlockSparse",
    "Blocked", "Document", "Dynamic", "GlobalLocal", "Mask", "MaskMod", "Neighborhood", "Or", "ResidueOrder",
    "SlidingWindow", "Strided", "TopLeft", "build", "causal", "from_block_mask", "from_dict", "from_mask_mod", "lookup",
    "residue_order",
]  # fmt: skip
