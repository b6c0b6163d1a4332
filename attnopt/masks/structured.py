"""Structured masks: sliding windows, neighborhoods, blocks, global+local, strided heads, packed documents.

Positions are 0-based; ``q`` indexes queries (``Sq`` of them) and ``k`` keys (``Sk``). Each class
docstring states its predicate (docs/architecture.md, Masks). Tile statuses come from
interval arithmetic on the descriptor, key spans from closed forms, so a block map costs O(1) per
tile pair it looks at and never builds an ``[Sq, Sk]`` tensor.

One mask family per module (each draws itself through :class:`~attnopt.masks.base.Mask`): this module gathers
them under one name, in the order they register with :func:`~attnopt.masks.base.register_type`.
"""

from attnopt.masks.sliding_window import SlidingWindow, TopLeft, causal
from attnopt.masks.document import Document
from attnopt.masks.grid import Grid
from attnopt.masks.neighborhood import Neighborhood
from attnopt.masks.blocked import Blocked
from attnopt.masks.global_local import GlobalLocal
from attnopt.masks.strided import Strided
from attnopt.masks.residue import ResidueOrder, residue_order

__all__ = ["Blocked", "Document", "GlobalLocal", "Grid", "Neighborhood", "ResidueOrder", "SlidingWindow", "Strided",
           "TopLeft", "causal", "residue_order"]  # fmt: skip
