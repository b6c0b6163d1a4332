"""What a chunked linear-attention kernel is specialized to (:class:`LinearSpec`) and its tile choices per GPU
(:func:`specs`); the kernels themselves are in :mod:`attnopt.kernels.linear.render`.

This module imports neither torch nor triton.
"""

from __future__ import annotations

from dataclasses import dataclass

from attnopt.codegen.spec import DTYPES, GeneratedSpec, next_pow2

KINDS = ("state", "out", "grad")
MAX_HEAD_DIM = 128  # the tiles of :func:`specs` are measured up to here
CHUNK = 64


@dataclass(frozen=True, kw_only=True)
class LinearSpec(GeneratedSpec):
    """The compile-time parameters of one generated linear-attention kernel (the kinds are described in
    :mod:`attnopt.kernels.linear.render`)."""

    FAMILY = "linear"
    ROLE = "kind"

    kind: str
    head_dim: int
    head_dim_v: int
    dtype: str
    causal: bool
    normalize: bool
    decay: bool
    reverse: bool = False
    chunk: int = CHUNK
    block_dv: int
    block_dt: int = 0  # grad only: the key-dim columns of dq, dk one program computes (0 for other kinds)
    num_warps: int
    num_stages: int

    def __post_init__(self) -> None:
        self._check_choices(kind=KINDS, dtype=DTYPES)
        self._check_bools("causal", "normalize", "decay", "reverse")
        self._check_head_dims(MAX_HEAD_DIM)
        self._check_tiles(("chunk", "block_dv") + (("block_dt",) if self.kind == "grad" else ()))
        if self.kind != "grad" and self.block_dt:
            raise ValueError(f"LinearSpec.block_dt applies to the grad kernel only; got {self.block_dt!r}")
        if self.kind == "grad" and self.block_dt > self.block_d:
            raise ValueError(f"LinearSpec.block_dt must be at most block_d {self.block_d}; got {self.block_dt!r}")
        if self.decay and not self.causal:
            raise ValueError("LinearSpec.decay needs causal")
        if self.reverse and self.kind != "state":
            raise ValueError("LinearSpec.reverse applies to the state kernel only")
        self._check_launch()


def default_spec(kind: str, head_dim: int, head_dim_v: int, dtype: str, causal: bool, normalize: bool,
                 decay: bool, reverse: bool = False, capability: tuple[int, int] | None = None) -> LinearSpec:  # fmt: skip
    """The first of :func:`specs`: the tiles launched unless the compiler rejects them."""
    return specs(kind, head_dim, head_dim_v, dtype, causal, normalize, decay, reverse, capability)[0]


def specs(kind: str, head_dim: int, head_dim_v: int, dtype: str, causal: bool, normalize: bool, decay: bool,
          reverse: bool = False, capability: tuple[int, int] | None = None) -> list[LinearSpec]:  # fmt: skip
    """The kernel's tile configurations, most preferred first (the launcher falls back down the list).

    State and out kernels tile the value dim by 64 (16-bit up to head dim 64) or 32 (fp32, wider heads, or the
    reverse pass, whose operands are fp32: a [D, 64] fp32 state crowds the registers), then smaller. The
    grad kernel tiles the key dim by ``block_dt`` (its program's columns of dq, dk and rows of the states)
    and walks the value dim ``block_dv`` at a time. Measured with ptxas (bf16, causal, head dims 64 and
    128): on sm_90+ (and without a GPU, ``capability`` None) 64 x 32, 8 warps: about 216 registers and
    92 KiB, no spill (taking the whole value dim spilled and needed 256 KiB at head dim 128); on sm_80-sm_89,
    where mma.sync holds the A operands in registers, 16 key-dim columns by the whole value dim up to head
    dim 64 and by 16 above, 4 warps (every wider tile spilled there).
    """
    widest = max(16, next_pow2(head_dim), next_pow2(head_dim_v))
    full_dv, block_d = max(16, next_pow2(head_dim_v)), max(16, next_pow2(head_dim))
    stages = 1 if dtype == "float32" else 2
    if kind == "grad":
        if capability is not None and capability < (9, 0):  # mma.sync: A operands in registers
            tiles = [(min(full_dv, 64 if widest <= 64 else 16), 16, 4)]
        else:
            tiles = [(min(full_dv, 32), min(block_d, 64), 8), (min(full_dv, 32), min(block_d, 32), 8)]
        tiles.append((16, 16, 4))
    else:
        first = min(full_dv, 64 if dtype != "float32" and not reverse and widest <= 64 else 32)
        tiles = [(bv, 0, 4) for bv in (first, first // 2) if bv >= 16]
    return [LinearSpec(kind=kind, head_dim=head_dim, head_dim_v=head_dim_v, dtype=dtype, causal=causal,
                       normalize=normalize, decay=decay, reverse=reverse, block_dv=bv, block_dt=bt, num_warps=w,
                       num_stages=stages) for bv, bt, w in dict.fromkeys(tiles)]  # fmt: skip
