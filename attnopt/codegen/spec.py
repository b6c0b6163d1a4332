"""What a generated attention kernel is specialized to: :class:`KernelSpec`.

A spec holds every compile-time decision of one kernel (variant, direction, head dims, dtype, causal
mode, mask kind, tile shape, launch configuration). Everything else (batch, heads, sequence lengths,
strides, scale) is a runtime argument. The spec's :attr:`KernelSpec.key` is a stable hash of its
fields, so the kernel's name and its file in the on-disk cache follow from the spec alone.

This module imports neither torch nor triton at module level.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass

CAUSAL_NONE = 0
CAUSAL_TOP_LEFT = 1
CAUSAL_BOTTOM_RIGHT = 2

VARIANTS = ("exact",)
DIRECTIONS = ("fwd",)
DTYPES = ("float16", "bfloat16", "float32")
CAUSAL_MODES = (CAUSAL_NONE, CAUSAL_TOP_LEFT, CAUSAL_BOTTOM_RIGHT)
MASKS = ("none", "bool", "additive")
MAX_HEAD_DIM = 256
MAX_BLOCK = 256
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
    """The compile-time parameters of one generated kernel; see the module docstring."""

    variant: str = "exact"
    direction: str = "fwd"
    head_dim: int
    head_dim_v: int
    dtype: str
    causal: int
    mask: str
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int

    def __post_init__(self) -> None:
        _check_choice("variant", self.variant, VARIANTS)
        _check_choice("direction", self.direction, DIRECTIONS)
        _check_choice("dtype", self.dtype, DTYPES)
        _check_choice("mask", self.mask, MASKS)
        if not _is_int(self.causal) or self.causal not in CAUSAL_MODES:
            raise ValueError(
                f"KernelSpec.causal must be one of {CAUSAL_MODES} (none, top-left, bottom-right); got {self.causal!r}"
            )
        for name in ("head_dim", "head_dim_v"):
            value = getattr(self, name)
            if not _is_int(value) or not 1 <= value <= MAX_HEAD_DIM:
                raise ValueError(f"KernelSpec.{name} must be an int in 1..{MAX_HEAD_DIM}; got {value!r}")
        for name in ("block_m", "block_n"):
            value = getattr(self, name)
            if not _is_int(value) or not _is_pow2(value) or not 16 <= value <= MAX_BLOCK:
                raise ValueError(f"KernelSpec.{name} must be a power of two in 16..{MAX_BLOCK}; got {value!r}")
        if not _is_int(self.num_warps) or self.num_warps not in NUM_WARPS:
            raise ValueError(f"KernelSpec.num_warps must be one of {NUM_WARPS}; got {self.num_warps!r}")
        if not _is_int(self.num_stages) or not 1 <= self.num_stages <= MAX_STAGES:
            raise ValueError(f"KernelSpec.num_stages must be an int in 1..{MAX_STAGES}; got {self.num_stages!r}")

    @property
    def block_d(self) -> int:
        """Padded q/k head dim: the next power of two, at least 16 (``tl.dot`` needs K >= 16)."""
        return max(16, next_pow2(self.head_dim))

    @property
    def block_dv(self) -> int:
        """Padded v head dim: the next power of two, at least 16."""
        return max(16, next_pow2(self.head_dim_v))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

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

    @property
    def key(self) -> str:
        """First 12 hex digits of the sha256 of :meth:`to_json`: stable across processes and machines."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()[:12]

    @property
    def name(self) -> str:
        """The generated kernel's function name, also its module and cache file name."""
        return f"attnopt_{self.variant}_{self.direction}_{self.key}"


def _check_choice(field: str, value, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"KernelSpec.{field} must be one of {allowed}; got {value!r}")


_TORCH_DTYPES = {"torch.float16": "float16", "torch.bfloat16": "bfloat16", "torch.float32": "float32"}


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


def default_spec(q, k, v, attn_mask, causal: int) -> KernelSpec:
    """The deterministic spec for a call: tile shape from the padded head dim and the dtype.

    16-bit inputs use 64x64 tiles up to head dim 128 and 64x32 above; fp32 (twice the registers
    and shared memory per element) uses 64x32 up to 64 and 32x32 above. Head dims above 128 run
    with 8 warps, the rest with 4; 2 pipeline stages, 1 for fp32 above head dim 128 (whose two
    stages would need about 160 KiB of shared memory).
    """
    dtype = dtype_name(q.dtype)
    widest = max(next_pow2(q.shape[-1]), next_pow2(v.shape[-1]))
    if dtype == "float32":
        block_m, block_n = (64, 32) if widest <= 64 else (32, 32)
    else:
        block_m, block_n = (64, 64) if widest <= 128 else (64, 32)
    return KernelSpec(
        head_dim=q.shape[-1],
        head_dim_v=v.shape[-1],
        dtype=dtype,
        causal=causal,
        mask=mask_kind(attn_mask),
        block_m=block_m,
        block_n=block_n,
        num_warps=8 if widest > 128 else 4,
        num_stages=1 if dtype == "float32" and widest > 128 else 2,
    )
