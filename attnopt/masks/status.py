"""The status of a tile or an element under a mask, and tile arithmetic: what the block maps are made of
(a module of its own so that :mod:`attnopt.masks.blockmap` needs nothing of the mask classes)."""

import torch

EMPTY, PARTIAL, FULL = 0, 1, 2
STATUS_DTYPE = torch.int8


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)
