"""NATTEN-style neighborhood attention: ``na1d``, ``na2d``, ``na3d`` on attnopt's sparse kernels (docs/functional.md).

    out = attnopt.na2d(q, k, v, kernel_size=7)                    # q, k, v [B, H', W', heads, D]
    out = attnopt.na3d(q, k, v, (3, 5, 5), dilation=(1, 2, 2), is_causal=(True, False, False))

NATTEN's layout (``[B, *spatial, heads, D]``) and semantics, per axis (:class:`attnopt.masks.Neighborhood`):
windows of ``kernel_size`` shifted, not clipped, at the borders (every query sees exactly ``kernel_size``
keys per axis); ``dilation`` d splits the axis into d interleaved groups, each attending within itself;
``stride`` s lets groups of s queries share their leader's window; ``is_causal`` (one bool per axis) keeps the
keys at or before the query, back to ``kernel_size`` before its leader. ``additional_keys``/``additional_values``
``[B, N_add, heads_kv, D]`` are attended by every query besides its neighborhood (one softmax over both): they
run as the mask's global tokens, in the same kernel call.
"""

from __future__ import annotations

import math

import torch

import attnopt.kernels.sparse.ops  # noqa: F401  (registers torch.ops.attnopt.sparse_attention)
from attnopt.functional import static
from attnopt.kernels.layout import assume_constant_result
from attnopt.masks import Neighborhood


# Spatial tiles hold at most this many tokens (a kernel tile's rows): the sparse ops run the grid's tokens tile by tile,
# so a query tile's neighborhood is a few dense key tiles, as in NATTEN's fused kernels.
TILE_TOKENS = 64


def spatial_tile(grid: tuple) -> tuple | None:
    """The tile shape the ops reorder a 2-D or 3-D grid's tokens into (None: row-major): sides doubled in turn, from
    the last axis, while they divide the grid and the tile holds at most :data:`TILE_TOKENS` tokens (near-square
    tiles: an isotropic neighborhood then spans the fewest)."""
    if len(grid) < 2:
        return None
    tile = [1] * len(grid)
    grown = True
    while grown:
        grown = False
        for a in reversed(range(len(grid))):
            if grid[a] % (2 * tile[a]) == 0 and 2 * math.prod(tile) <= TILE_TOKENS:
                tile[a] *= 2
                grown = True
    return tuple(tile) if math.prod(tile) > 1 else None


@assume_constant_result
def _mask_key(kernel_size, stride, dilation, is_causal, grid: tuple, extra: int) -> str:
    """The sparse op's key of the neighborhood (global tokens: the additional keys, first); a constant under dynamo."""
    mask = Neighborhood(kernel_size, dilation, stride, is_causal, grid=grid, global_tokens=extra,
                        tile=spatial_tile(grid))  # fmt: skip
    mask.check(math.prod(grid) + extra, math.prod(grid) + extra, 1)
    return mask.key()


def _as_args(value):
    """An int, a bool, or a list of them as a tuple (the mask's per-axis form)."""
    return tuple(value) if isinstance(value, list) else value


def neighborhood_attention(q, k, v, kernel_size, stride=1, dilation=1, is_causal=False, additional_keys=None,
                           additional_values=None, scale=None):  # fmt: skip
    """Neighborhood attention over the 1 to 3 spatial axes of ``q`` ``[B, *spatial, Hq, D]`` (k, v ``[B, *spatial,
    Hkv, D]``, Hq a multiple of Hkv); returns ``[B, *spatial, Hq, Dv]``. See the module docstring."""
    ndim = q.dim() - 3
    if ndim not in (1, 2, 3) or k.dim() != q.dim() or v.dim() != q.dim():
        raise ValueError(f"neighborhood attention takes q, k, v [B, *spatial, heads, D] with 1 to 3 spatial axes; got "
                         f"{q.dim()}-D, {k.dim()}-D, {v.dim()}-D")  # fmt: skip
    spatial = tuple(q.shape[1:-2])
    if tuple(k.shape[1:-2]) != spatial or tuple(v.shape[1:-2]) != spatial:
        raise ValueError(f"neighborhood attention: q, k and v must share their token layout; got {spatial}, "
                         f"{tuple(k.shape[1:-2])}, {tuple(v.shape[1:-2])}")  # fmt: skip
    b, hq, n = q.shape[0], q.shape[-2], math.prod(spatial)
    qh = q.reshape(b, n, hq, q.shape[-1]).transpose(1, 2)  # [B, Hq, N, D]
    kh = k.reshape(b, n, k.shape[-2], k.shape[-1]).transpose(1, 2)
    vh = v.reshape(b, n, v.shape[-2], v.shape[-1]).transpose(1, 2)
    extra = _check_additional(additional_keys, additional_values, k, v)
    if extra:
        # The additional keys lead the sequence as global tokens; their query rows are zeros whose outputs are
        # dropped (and whose zero gradient adds nothing to dk, dv).
        qh = torch.cat([qh.new_zeros(b, hq, extra, qh.shape[-1]), qh], dim=2)
        kh = torch.cat([additional_keys.transpose(1, 2), kh], dim=2)
        vh = torch.cat([additional_values.transpose(1, 2), vh], dim=2)
    # The mask is a constant of a compiled graph: symbolic ints (the grid, or arguments that changed between calls)
    # are made static here.
    args = static((_as_args(kernel_size), _as_args(stride), _as_args(dilation), _as_args(is_causal), spatial, extra))
    key = _mask_key(*args)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    out, _ = torch.ops.attnopt.sparse_attention(qh, kh, vh, None, None, key, scale)
    return out[:, :, extra:].transpose(1, 2).reshape(b, *spatial, hq, v.shape[-1])


def _check_additional(keys, values, k, v) -> int:
    """The number of additional keys (0 without); ValueError unless both are given, ``[B, N_add, Hkv, D]``."""
    if keys is None and values is None:
        return 0
    if keys is None or values is None:
        raise ValueError("neighborhood attention: pass additional_keys and additional_values together")
    want_k = (k.shape[0], keys.shape[1] if keys.dim() == 4 else -1, k.shape[-2], k.shape[-1])
    want_v = (v.shape[0], want_k[1], v.shape[-2], v.shape[-1])
    if keys.dim() != 4 or tuple(keys.shape) != want_k or tuple(values.shape) != want_v:
        raise ValueError(f"neighborhood attention: additional_keys and additional_values must be [B, N_add, heads_kv, "
                         f"D] like k and v, e.g. {want_k} and {want_v}; got {tuple(keys.shape)} and "
                         f"{tuple(values.shape)}")  # fmt: skip
    return keys.shape[1]


def na1d(query, key, value, kernel_size, stride=1, dilation=1, is_causal=False, additional_keys=None,
         additional_values=None, scale=None):  # fmt: skip
    """1-D neighborhood attention, NATTEN's ``na1d``: q, k, v ``[B, L, heads, D]``."""
    _check_dims("na1d", query, 1)
    return neighborhood_attention(query, key, value, kernel_size, stride, dilation, is_causal, additional_keys,
                                  additional_values, scale)  # fmt: skip


def na2d(query, key, value, kernel_size, stride=1, dilation=1, is_causal=False, additional_keys=None,
         additional_values=None, scale=None):  # fmt: skip
    """2-D neighborhood attention, NATTEN's ``na2d``: q, k, v ``[B, H, W, heads, D]``."""
    _check_dims("na2d", query, 2)
    return neighborhood_attention(query, key, value, kernel_size, stride, dilation, is_causal, additional_keys,
                                  additional_values, scale)  # fmt: skip


def na3d(query, key, value, kernel_size, stride=1, dilation=1, is_causal=False, additional_keys=None,
         additional_values=None, scale=None):  # fmt: skip
    """3-D neighborhood attention, NATTEN's ``na3d``: q, k, v ``[B, T, H, W, heads, D]``."""
    _check_dims("na3d", query, 3)
    return neighborhood_attention(query, key, value, kernel_size, stride, dilation, is_causal, additional_keys,
                                  additional_values, scale)  # fmt: skip


def _check_dims(name: str, q, ndim: int) -> None:
    if q.dim() != ndim + 3:
        raise ValueError(f"{name} takes q, k, v [B, {', '.join('XYZ'[:ndim])}, heads, D] ({ndim + 3}-D); got a "
                         f"{q.dim()}-D query")  # fmt: skip
