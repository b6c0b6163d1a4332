"""What a generated attention kernel is specialized to: :class:`KernelSpec`.

A spec holds every compile-time decision of one kernel: the variant, the direction (the forward,
or one of the three backward kernels), head dims, dtype, causal mode, the kinds of mask and score
bias, key-padding lengths, softcap, dropout, the GQA group, the tile shape and the launch
configuration. Everything else (batch, heads, sequence lengths, strides, scale, the softcap value,
the dropout probability and seed) is a runtime argument. The spec's :attr:`KernelSpec.key` is a
stable hash of its fields, so the kernel's name and its file in the on-disk cache follow from the
spec alone.

Directions:

* ``fwd``: ``(out, lse)`` from ``q, k, v``; one program per query tile.
* ``bwd_pre``: the backward's preprocessing, ``delta = rowsum(dO ∘ O)`` and ``lse`` in base 2.
* ``bwd_dkdv``: ``dK, dV`` for one key tile, iterating over the query tiles of every query head of
  the tile's GQA group (no atomics).
* ``bwd_dq``: ``dQ`` for one query tile, iterating over the key tiles; with ``write_ds`` it also
  stores the score gradient ``dS`` (the gradient of an additive mask or bias).

This module imports neither torch nor triton at module level.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass

from attnopt.codegen.score_expr import parse

CAUSAL_NONE = 0
CAUSAL_TOP_LEFT = 1
CAUSAL_BOTTOM_RIGHT = 2

VARIANTS = ("exact",)
DIRECTIONS = ("fwd", "bwd_pre", "bwd_dkdv", "bwd_dq")
DTYPES = ("float16", "bfloat16", "float32")
CAUSAL_MODES = (CAUSAL_NONE, CAUSAL_TOP_LEFT, CAUSAL_BOTTOM_RIGHT)
CAUSAL_NAMES = {CAUSAL_NONE: "none", CAUSAL_TOP_LEFT: "top-left", CAUSAL_BOTTOM_RIGHT: "bottom-right"}
MASKS = ("none", "bool", "additive")
BIASES = ("none", "tensor", "alibi", "relpos")
MAX_HEAD_DIM = 256
MAX_BLOCK = 256
MAX_GROUP = 256
NUM_WARPS = (1, 2, 4, 8, 16)
MAX_STAGES = 8


def next_pow2(n: int) -> int:
    """The smallest power of two >= ``n`` (1 for n <= 1)."""
    return 1 << max(n - 1, 0).bit_length()


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_pow2(value: int) -> bool:
    return value > 0 and value & (value - 1) == 0


@dataclass(frozen=True, kw_only=True)
class KernelSpec:
    """The compile-time parameters of one generated kernel; see the module docstring.

    ``mask`` is the kind of the attention-mask tensor (boolean, True = attend, or additive).
    ``bias`` is an additive score term that is not a mask: ``tensor`` (any broadcastable
    ``[B, H, Sq, Sk]`` tensor), ``alibi`` (``-slope_h * |j - i - (Sk - Sq)|`` from per-head slopes,
    the FlashAttention-2 convention) or ``relpos`` (``table[bucket[j - i + Sq - 1], h]``: a relative
    position bias gathered from its bucket table). ``key_padding``: key ``j`` of batch row ``b`` is
    visible only if ``j < kv_lens[b]``. ``group`` is the number of query heads per key/value head.
    ``strided_kv``: the forward reads K and V through per-element pointers (any strides and alignment,
    every GPU) instead of tensor descriptors (TMA on sm_90+: 16-byte aligned bases and row strides, unit
    head-dim stride), see :mod:`attnopt.kernels.exact.render_fwd`; the backward kernels always use pointers.
    ``score_mod``: the canonical text of a traced score modification (:mod:`attnopt.codegen.score_expr`)
    applied to each scaled score before the mask, ``""`` for none; it names the kernel, and a spec without
    one serializes exactly as before the field existed (same JSON, key and source).
    """

    variant: str = "exact"
    direction: str = "fwd"
    head_dim: int
    head_dim_v: int
    dtype: str
    causal: int
    mask: str
    bias: str = "none"
    key_padding: bool = False
    softcap: bool = False
    dropout: bool = False
    group: int = 1
    write_ds: bool = False
    strided_kv: bool = False
    score_mod: str = ""
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int

    def __post_init__(self) -> None:
        _check_choice("variant", self.variant, VARIANTS)
        _check_choice("direction", self.direction, DIRECTIONS)
        _check_choice("dtype", self.dtype, DTYPES)
        _check_choice("mask", self.mask, MASKS)
        _check_choice("bias", self.bias, BIASES)
        if not _is_int(self.causal) or self.causal not in CAUSAL_MODES:
            raise ValueError(
                f"KernelSpec.causal must be one of {CAUSAL_MODES} (none, top-left, bottom-right); got {self.causal!r}"
            )
        for name in ("key_padding", "softcap", "dropout", "write_ds", "strided_kv"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"KernelSpec.{name} must be a bool; got {getattr(self, name)!r}")
        if self.write_ds and self.direction != "bwd_dq":
            raise ValueError(f"KernelSpec.write_ds must be False for direction {self.direction!r} (only bwd_dq)")
        if self.strided_kv and self.direction != "fwd":
            raise ValueError(f"KernelSpec.strided_kv must be False for direction {self.direction!r} (only fwd)")
        for name in ("head_dim", "head_dim_v"):
            value = getattr(self, name)
            if not _is_int(value) or not 1 <= value <= MAX_HEAD_DIM:
                raise ValueError(f"KernelSpec.{name} must be an int in 1..{MAX_HEAD_DIM}; got {value!r}")
        self._check_score_mod()
        if not _is_int(self.group) or not 1 <= self.group <= MAX_GROUP:
            raise ValueError(f"KernelSpec.group must be an int in 1..{MAX_GROUP}; got {self.group!r}")
        for name in ("block_m", "block_n"):
            value = getattr(self, name)
            if not _is_int(value) or not _is_pow2(value) or not 16 <= value <= MAX_BLOCK:
                raise ValueError(f"KernelSpec.{name} must be a power of two in 16..{MAX_BLOCK}; got {value!r}")
        if not _is_int(self.num_warps) or self.num_warps not in NUM_WARPS:
            raise ValueError(f"KernelSpec.num_warps must be one of {NUM_WARPS}; got {self.num_warps!r}")
        if not _is_int(self.num_stages) or not 1 <= self.num_stages <= MAX_STAGES:
            raise ValueError(f"KernelSpec.num_stages must be an int in 1..{MAX_STAGES}; got {self.num_stages!r}")

    def _check_score_mod(self) -> None:
        if not isinstance(self.score_mod, str):
            raise ValueError(f"KernelSpec.score_mod must be a str; got {self.score_mod!r}")
        if not self.score_mod:
            return
        if self.softcap or self.bias != "none":
            raise ValueError("KernelSpec.score_mod excludes softcap and bias (write them into the score_mod)")
        if self.direction == "bwd_pre":
            raise ValueError("KernelSpec.score_mod must be empty for direction 'bwd_pre' (it reads no scores)")
        parse(self.score_mod)  # ValueError for text that is not a score expression

    @property
    def block_d(self) -> int:
        """Padded q/k head dim: the next power of two, at least 16 (``tl.dot`` needs K >= 16)."""
        return max(16, next_pow2(self.head_dim))

    @property
    def block_dv(self) -> int:
        """Padded v head dim: the next power of two, at least 16."""
        return max(16, next_pow2(self.head_dim_v))

    @property
    def itemsize(self) -> int:
        """Bytes per element of q, k, v."""
        return 4 if self.dtype == "float32" else 2

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        if not self.score_mod:
            del data["score_mod"]  # specs without one keep their JSON, key and kernel name
        return data

    @classmethod
    def from_dict(cls, data: dict) -> KernelSpec:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown KernelSpec fields {unknown}; known fields are {sorted(known)}")
        return cls(**data)

    def to_json(self) -> str:
        """Canonical JSON: sorted keys, no whitespace; the input of :attr:`key`."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    def replace(self, **changes) -> KernelSpec:
        """A copy with ``changes`` applied (validated like a new spec)."""
        return dataclasses.replace(self, **changes)

    @property
    def key(self) -> str:
        """First 12 hex digits of the sha256 of :meth:`to_json`: stable across processes and machines."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()[:12]

    @property
    def name(self) -> str:
        """The generated kernel's function name, also its module and cache file name."""
        return f"attnopt_{self.variant}_{self.direction}_{self.key}"


TILE_FIELDS = ("block_m", "block_n", "num_warps", "num_stages")


def _check_choice(field: str, value, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"KernelSpec.{field} must be one of {allowed}; got {value!r}")


_TORCH_DTYPES = {"torch.float16": "float16", "torch.bfloat16": "bfloat16", "torch.float32": "float32"}


MAX_BATCH_HEADS = 65535  # a launch grid's second axis (B * H programs) holds at most 65535 on CUDA


def inputs_refusal(q, k, v, max_head_dim: int) -> str | None:
    """Why a generated kernel family cannot take ``q``, ``k``, ``v`` [B, H, S, D] (dtypes, head dims above
    ``max_head_dim``, too many batch rows times heads), or None."""
    if _TORCH_DTYPES.get(str(q.dtype)) is None or k.dtype != q.dtype or v.dtype != q.dtype:
        return f"the kernels take float16, bfloat16 or float32 q, k, v of one dtype; got {q.dtype}, {k.dtype}, {v.dtype}"
    if q.shape[-1] > max_head_dim or v.shape[-1] > max_head_dim:
        return f"head dims above {max_head_dim} (got {q.shape[-1]}, {v.shape[-1]})"
    if q.shape[0] * q.shape[1] > MAX_BATCH_HEADS:
        return f"batch * heads above {MAX_BATCH_HEADS} (got {q.shape[0] * q.shape[1]})"
    return None


def dtype_name(dtype) -> str:
    """The spec dtype string of a torch dtype; ValueError for dtypes the generated kernels do not take."""
    name = _TORCH_DTYPES.get(str(dtype))
    if name is None:
        raise ValueError(f"attnopt kernels take float16, bfloat16 or float32 tensors; got {dtype}")
    return name


def mask_kind(attn_mask) -> str:
    """``"none"``, ``"bool"`` or ``"additive"`` for an optional torch mask tensor."""
    if attn_mask is None:
        return "none"
    if str(attn_mask.dtype) == "torch.bool":
        return "bool"
    if attn_mask.is_floating_point():
        return "additive"
    raise ValueError(f"attn_mask must be bool (True = attend) or floating point (additive); got {attn_mask.dtype}")


def default_tiles(direction: str, dtype: str, head_dim: int, head_dim_v: int) -> dict:
    """The deterministic tile shape and launch configuration used without a GPU-specific choice.

    Forward and ``bwd_dq`` (a query tile of ``block_m`` rows streams key tiles of ``block_n``):
    16-bit inputs use 64x64 tiles up to head dim 128 and 64x32 above; fp32 (twice the registers
    and shared memory per element) uses 64x32 up to 64 and 32x32 above. ``bwd_dkdv`` holds two
    ``[block_n, D]`` fp32 accumulators per key tile and streams query tiles: 64 keys by 32 queries,
    32x32 above head dim 128 or in fp32 above 64. ``bwd_pre`` only reads O and dO: 64 rows.
    Head dims above 128 run with 8 warps, the rest with 4; 2 pipeline stages, 1 for fp32 above
    head dim 128 (whose two stages would need about 160 KiB of shared memory).
    """
    widest = max(next_pow2(head_dim), next_pow2(head_dim_v))
    if direction == "bwd_pre":
        return dict(block_m=64, block_n=16, num_warps=4, num_stages=1)
    if direction == "bwd_dkdv":
        small = widest <= (64 if dtype == "float32" else 128)
        block_m, block_n = (32, 64) if small else (32, 32)
    elif dtype == "float32":
        block_m, block_n = (64, 32) if widest <= 64 else (32, 32)
    else:
        block_m, block_n = (64, 64) if widest <= 128 else (64, 32)
    return dict(
        block_m=block_m,
        block_n=block_n,
        num_warps=8 if widest > 128 else 4,
        num_stages=1 if dtype == "float32" and widest > 128 else 2,
    )


def default_spec(q, k, v, attn_mask, causal: int, **features) -> KernelSpec:
    """The deterministic spec for a call: its features (``direction``, ``bias``, ``key_padding``,
    ``softcap``, ``dropout``, ``write_ds`` as keyword arguments) with :func:`default_tiles`."""
    dtype = dtype_name(q.dtype)
    direction = features.get("direction", "fwd")
    return KernelSpec(
        head_dim=q.shape[-1],
        head_dim_v=v.shape[-1],
        dtype=dtype,
        causal=causal,
        mask=mask_kind(attn_mask),
        group=q.shape[1] // k.shape[1] if k.shape[1] else 1,
        **features,
        **default_tiles(direction, dtype, q.shape[-1], v.shape[-1]),
    )


class GeneratedSpec:
    """What the specs of the other generated kernels (sigmoid, block-sparse, linear) share.

    A mixin for a frozen dataclass: the padded head dim, the canonical JSON, its hash :attr:`key` and the
    kernel's :attr:`name` ``attnopt_<FAMILY>_<role>_<key>``, where ``<role>`` is the value of the field
    named by ``ROLE`` (the direction or kind of kernel); and the validation of the fields every such spec
    has, with errors that name the spec class and the field.
    """

    FAMILY = ""  # the variant in the kernel name: "sigmoid", "sparse", "linear"
    ROLE = "direction"  # the field naming which of the family's kernels this is

    @property
    def block_d(self) -> int:
        """Padded q/k head dim: the next power of two, at least 16 (``tl.dot`` needs K >= 16)."""
        return max(16, next_pow2(self.head_dim))

    def to_json(self) -> str:
        """Canonical JSON: sorted keys, no whitespace; the input of :attr:`key`."""
        return json.dumps(dataclasses.asdict(self), sort_keys=True, separators=(",", ":"))

    @property
    def key(self) -> str:
        """First 12 hex digits of the sha256 of :meth:`to_json`: stable across processes and machines."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()[:12]

    @property
    def name(self) -> str:
        """The generated kernel's function name, also its module and cache file name."""
        return f"attnopt_{self.FAMILY}_{getattr(self, self.ROLE)}_{self.key}"

    def _fail(self, field: str, expected: str) -> None:
        raise ValueError(f"{type(self).__name__}.{field} must be {expected}; got {getattr(self, field)!r}")

    def _check_choices(self, **allowed: tuple) -> None:
        """Each named field holds one of its allowed values."""
        for field, values in allowed.items():
            if getattr(self, field) not in values:
                self._fail(field, f"one of {tuple(values)}")

    def _check_bools(self, *fields: str) -> None:
        for field in fields:
            if not isinstance(getattr(self, field), bool):
                self._fail(field, "a bool")

    def _check_head_dims(self, max_head_dim: int = MAX_HEAD_DIM) -> None:
        for field in ("head_dim", "head_dim_v"):
            value = getattr(self, field)
            if not _is_int(value) or not 1 <= value <= max_head_dim:
                self._fail(field, f"an int in 1..{max_head_dim}")

    def _check_tiles(self, fields=("block_m", "block_n")) -> None:
        """Tile sizes are powers of two in 16..MAX_BLOCK (16: the smallest ``tl.dot`` operand)."""
        for field in fields:
            value = getattr(self, field)
            if not _is_int(value) or not _is_pow2(value) or not 16 <= value <= MAX_BLOCK:
                self._fail(field, f"a power of two in 16..{MAX_BLOCK}")

    def _check_launch(self) -> None:
        if not _is_int(self.num_warps) or self.num_warps not in NUM_WARPS:
            self._fail("num_warps", f"one of {NUM_WARPS}")
        if not _is_int(self.num_stages) or not 1 <= self.num_stages <= MAX_STAGES:
            self._fail("num_stages", f"an int in 1..{MAX_STAGES}")


class PaddedValueDim:
    """``block_dv`` for specs that pad the value head dim whole (the linear spec tiles it as a field)."""

    @property
    def block_dv(self) -> int:
        """Padded v head dim: the next power of two, at least 16."""
        return max(16, next_pow2(self.head_dim_v))
