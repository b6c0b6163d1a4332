"""Recognizing a key-padding mask, so the kernels take per-row lengths instead of an ``[Sq, Sk]`` mask.

Hugging Face and BERT-style models pass right padding as a mask broadcast over heads and queries:
boolean ``[B, 1, 1, Sk]`` (True = attend) or additive (0 = attend, ``-inf`` or a large negative fill
= padding). Such a mask is exactly ``kv_lens[b] = number of attended keys of row b`` when the attended
keys of every row form a prefix. :func:`key_padding_lengths` checks that in O(B·Sk) (it reads one
``[B, Sk]`` slice of the mask, never an ``Sq x Sk`` matrix) and returns the lengths, or None when the
mask is anything else (left padding, holes, per-head or per-query variation, a finite bias that is not
masking), in which case the mask path runs.

A finite fill is equivalent to ``-inf`` only when its softmax weight underflows to zero, and only in
rows that keep at least one key (a row whose every key has a finite fill averages V, see the
reference, whereas ``kv_lens = 0`` gives zeros). The fill must therefore be at most
:data:`FILL_FRACTION` of the mask dtype's most negative value (Hugging Face fills with
``finfo(dtype).min``), and a finite-fill mask with an empty row is not converted.
"""

from __future__ import annotations

import torch

FILL_FRACTION = 0.5  # a finite fill counts as padding when <= FILL_FRACTION * finfo(mask dtype).min


def key_padding_lengths(attn_mask: torch.Tensor, shape: tuple[int, int, int, int]) -> torch.Tensor | None:
    """``kv_lens`` [B] int32 equivalent to ``attn_mask`` broadcast to ``shape = (B, Hq, Sq, Sk)``, or None.

    The mask must be constant along heads and queries (size 1 or stride 0 there once broadcast),
    boolean or floating point, and hold for every batch row a prefix of attended keys followed by
    padding only; see the module docstring.
    """
    b, hq, sq, sk = shape
    if b * hq * sq * sk == 0 or attn_mask.dim() > 4:
        return None
    if not (attn_mask.dtype == torch.bool or attn_mask.is_floating_point()):
        return None
    try:
        full = attn_mask.expand(shape)  # [B, Hq, Sq, Sk] view, no copy
    except RuntimeError:
        return None
    if (hq > 1 and full.stride(1) != 0) or (sq > 1 and full.stride(2) != 0):
        return None  # varies along heads or queries: not a key-padding mask
    row = full[:, 0, 0, :]  # [B, Sk]
    if row.dtype == torch.bool:
        keep = row
        ok = torch.ones((), dtype=torch.bool, device=row.device)
    else:
        keep = row == 0
        padding = row == float("-inf")
        finite = (row <= FILL_FRACTION * torch.finfo(row.dtype).min) & ~padding
        # every entry attends or pads (none is a finite score bias), and no row is emptied by a finite fill
        # (such a row averages V; kv_lens = 0 would give zeros)
        ok = (keep | padding | finite).all() & ~(finite.any(dim=1) & ~keep.any(dim=1)).any()
    ok = ok & (keep[:, 1:] <= keep[:, :-1]).all()  # once padding starts, no attended key follows
    if not bool(ok):  # the one device-to-host sync of the check
        return None
    return keep.sum(dim=1, dtype=torch.int32)  # [B]
