"""The status of a tile or an element under a mask, and tile arithmetic: what the block maps are made of
(a module of its own so that :mod:`attnopt.masks.blockmap` needs nothing of the mask classes)."""

import torch

EMPTY, PARTIAL, FULL = 0, 1, 2
STATUS_DTYPE = torch.int8


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def status_of(full: torch.Tensor, nonempty: torch.Tensor) -> torch.Tensor:
    """STATUS_DTYPE statuses: FULL where ``full``, else PARTIAL where ``nonempty``, else EMPTY."""
    return torch.where(full, FULL, torch.where(nonempty, PARTIAL, EMPTY)).to(STATUS_DTYPE)


def with_globals(g: int, qs, qe, ks, ke, local) -> torch.Tensor:
    """Status when queries ``< g`` see every key and keys ``< g`` are seen by every query.

    ``local(qs, qe, ks, ke)`` is the status of the other pairs, asked on tiles clipped to ``>= g``.
    """
    if g == 0:
        return local(qs, qe, ks, ke)
    inner = local(torch.clamp(qs, min=g), torch.clamp(qe, min=g + 1), torch.clamp(ks, min=g), torch.clamp(ke, min=g + 1))
    all_global = (qe <= g) | (ke <= g)
    any_global = (qs < g) | (ks < g)
    inner = torch.where(any_global & (inner == EMPTY), PARTIAL, inner).to(STATUS_DTYPE)
    return torch.where(all_global, FULL, inner).to(STATUS_DTYPE)
