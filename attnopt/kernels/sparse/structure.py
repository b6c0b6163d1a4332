"""Recognizing a site's own mask as a structured one at run time (exact-sparse).

Hugging Face models build their masks as dense tensors (``[B, 1, Sq, Sk]``, or ``[B, 1, 1, Sk]`` padding
beside a causal flag; bool or additive 0 / large negative): plain causal, Mistral's and Gemma 2's sliding windows, each combined with key
padding. :func:`recognize` finds a descriptor ``SlidingWindow(left, right)`` and a key padding
``kv_valid [B, Sk]`` with

    mask[b, 0, i, j] == SlidingWindow(left, right)(i, j) ∧ kv_valid[b, j]     for every b, i, j

or says there is none. It reads the mask in row chunks (O(chunk · Sk) temporaries, never a second
``[Sq, Sk]`` tensor), three passes: the column-wise OR gives ``kv_valid``; the extreme offsets
``j - i'`` of visible pairs give ``left`` and ``right``; a full comparison verifies the candidate.
Every element is checked, so a mask that differs anywhere (a document mask, a random mask, a
per-head mask) is never taken for a window: the caller runs the exact kernel instead.

Additive masks count as hidden where the value is ``<= HIDDEN_BELOW`` (``-inf``, ``finfo.min``,
``-1e9``, ...) and visible where it is exactly 0; any other value means the mask is not a pure mask.
A row hidden everywhere by a finite fill is a softmax over equal scores in the original (uniform
weights), not zeros, so such masks are not recognized either.
"""

from __future__ import annotations

import torch

from attnopt.codegen.spec import CAUSAL_BOTTOM_RIGHT, CAUSAL_NONE, CAUSAL_TOP_LEFT
from attnopt.kernels.layout import HIDDEN_BELOW
from attnopt.masks import SlidingWindow, causal as causal_mask

_CHUNK_ELEMENTS = 1 << 20  # mask elements read at once: temporaries of a few MiB


def _keep_rows(attn_mask: torch.Tensor, r0: int, r1: int, causal: int, sq: int, sk: int):
    """bool [Bm, r1 - r0, Sk] visible keys of rows [r0, r1), or None when a value is neither 0 nor hidden."""
    rows = attn_mask[:, 0, r0:r1]
    if rows.dtype == torch.bool:
        keep = rows
    else:
        keep = rows == 0
        if not (keep | (rows <= HIDDEN_BELOW)).all():
            return None
    if causal != CAUSAL_NONE:
        offset = sk - sq if causal == CAUSAL_BOTTOM_RIGHT else 0
        i = torch.arange(r0, r1, device=rows.device)[:, None]
        keep = keep & (torch.arange(sk, device=rows.device)[None, :] <= i + offset)
    return keep.expand(rows.shape[0], r1 - r0, sk)


def recognize(attn_mask: torch.Tensor | None, causal: int, b: int, hq: int, sq: int, sk: int):
    """``(SlidingWindow, kv_valid bool [B, Sk] or None)`` equal to the site's mask, or None; see the module docstring."""
    if attn_mask is None:
        if causal == CAUSAL_BOTTOM_RIGHT or (causal == CAUSAL_TOP_LEFT and sq == sk):
            return causal_mask(), None
        return None
    if attn_mask.dim() != 4 or attn_mask.shape[1] != 1 or attn_mask.shape[0] not in (1, b):
        return None
    if attn_mask.shape[2] not in (1, sq) or attn_mask.shape[3] not in (1, sk) or sq == 0 or sk == 0:
        return None
    attn_mask = attn_mask.expand(attn_mask.shape[0], 1, sq, sk)  # a view: key padding broadcasts over rows
    if causal == CAUSAL_TOP_LEFT and sq > sk:
        return None  # j <= i with Sq > Sk is not a bottom-right window
    step = max(1, _CHUNK_ELEMENTS // (sk * attn_mask.shape[0]))
    device = attn_mask.device

    # Pass 1: kv_valid[b, j] = some query sees key j; extreme offsets j - i' of the visible pairs.
    kv = torch.zeros(attn_mask.shape[0], sk, dtype=torch.bool, device=device)
    j = torch.arange(sk, device=device)
    left, right = None, None
    for r0 in range(0, sq, step):
        r1 = min(r0 + step, sq)
        keep = _keep_rows(attn_mask, r0, r1, causal, sq, sk)
        if keep is None:
            return None
        kv |= keep.any(1)
        any_row = keep.any(-1)  # [Bm, rows]
        if not any_row.any():
            continue
        i = torch.arange(r0, r1, device=device)[None, :] + (sk - sq)
        first = keep.to(torch.uint8).argmax(-1)  # first visible key of each row (rows without one: masked below)
        last = (sk - 1) - keep.flip(-1).to(torch.uint8).argmax(-1)
        chunk_left = int(torch.where(any_row, i - first, -sk).max())
        chunk_right = int(torch.where(any_row, last - i, -sk).max())
        left = chunk_left if left is None else max(left, chunk_left)
        right = chunk_right if right is None else max(right, chunk_right)
    if left is None or right < 0:
        return None
    if attn_mask.dtype != torch.bool and not _rows_all_visible_somewhere(attn_mask, causal, sq, sk, step):
        return None
    window = SlidingWindow(None if left >= sk - 1 else max(left, 0), None if right >= sq - 1 else right)
    if window.left is None and window.right is None and bool(kv.all()):
        return None  # no structure to exploit: dense attention

    # Pass 2: every element equals window ∧ kv_valid.
    for r0 in range(0, sq, step):
        r1 = min(r0 + step, sq)
        keep = _keep_rows(attn_mask, r0, r1, causal, sq, sk)
        q_idx = torch.arange(r0, r1, device=device)[:, None]
        want = window.allows(q_idx, j[None, :], sq, sk)[None] & kv[:, None, :]
        if not torch.equal(keep, want.expand_as(keep)):
            return None
    kv_valid = None if bool(kv.all()) else kv.expand(b, sk).contiguous()
    return window, kv_valid


def _rows_all_visible_somewhere(attn_mask, causal, sq, sk, step) -> bool:
    """Whether every query row of an additive mask sees at least one key."""
    for r0 in range(0, sq, step):
        keep = _keep_rows(attn_mask, r0, min(r0 + step, sq), causal, sq, sk)
        if not keep.any(-1).all():
            return False
    return True
