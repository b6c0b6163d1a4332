"""Tile configurations of the sparse kernels: one table, keyed by GPU generation and head dim, read by the launcher.

A configuration is ``(block_m, block_n, num_warps, num_stages)``: ``block_m`` query rows by ``block_n`` keys
per tile (the block map is built for it; for ``dkdv`` ``block_n`` is the resident key tile and the query
tiles stream), the warps of a program and Triton's pipeline depth. :func:`configs` lists them most
preferred first; the launcher falls back down the list when the compiler rejects one
(:func:`attnopt.kernels.launch.launch_first`).

The 16-bit rows up to head dim 128 were checked by compiling for sm_80 and sm_90a at 64 and 128 (a sliding window
and a 2-D neighborhood, bf16; ``_notes/other_sass.md``): no spill, no wgmma serialization, shared memory
within the generation's per-block limit (the head-dim-256 rows are not measured yet). Reasons per row:

* ``dkdv`` (its tiles run transposed, see :mod:`.render`): 32 queries by 64 resident keys, 4 warps, 8 from
  head dim 128. The fixed 64x64, 4 warps, 2 stages config spilled 24-160 B on sm_90a and serialized its
  wgmma (C7512) at head dim 128; after the transposition 64x64 still spilled 250 B at head dim 128
  (8 warps, 2 or 3 stages), and FlexAttention's 128 resident keys, 8 warps, 3 stages took 264 KiB of
  shared memory and spilled: these kernels keep the tile's K, V and both fp32 accumulators live
  across the nested group, run and tile loops.
* ``dq`` at 8 warps from head dim 128 (4 warps sat at 255 registers); on sm_80 at head dim 64, 64x32
  (64x64 spilled with 4 or 8 warps).
* sm_100 (tcgen05): 8 warps at head dim 128 for every direction (4 spilled 76-728 B on sm_100a) and
  ``dkdv`` with 1 stage (2 spilled 112 B); the neighborhood ``dq``/``dkdv`` at head dim 128 still spill
  8-20 B there (not yet tuned: the checked targets are sm_80 and sm_90a).
* fp32 inputs (twice the bytes per element, no 16-bit tensor-core path) keep the small tiles.
"""

from __future__ import annotations

from attnopt.codegen.spec import next_pow2

Config = tuple[int, int, int, int]

# {(generation, widest padded head dim up to): {direction: first choice}} for 16-bit inputs; sm_80 covers sm_86/89.
TABLE: dict[tuple[str, int], dict[str, Config]] = {
    ("sm90", 64): {"fwd": (64, 64, 4, 2), "dq": (64, 64, 4, 2), "dkdv": (32, 64, 4, 2)},
    ("sm90", 128): {"fwd": (64, 64, 4, 2), "dq": (64, 64, 8, 2), "dkdv": (32, 64, 8, 2)},
    ("sm90", 256): {"fwd": (64, 32, 8, 2), "dq": (64, 32, 8, 2), "dkdv": (32, 64, 8, 2)},
    ("sm100", 64): {"fwd": (64, 64, 4, 2), "dq": (64, 64, 4, 2), "dkdv": (32, 64, 4, 2)},
    ("sm100", 128): {"fwd": (64, 64, 8, 2), "dq": (64, 64, 8, 2), "dkdv": (32, 64, 8, 1)},
    ("sm100", 256): {"fwd": (64, 32, 8, 2), "dq": (64, 32, 8, 2), "dkdv": (32, 64, 8, 2)},
    ("sm80", 64): {"fwd": (64, 64, 4, 2), "dq": (64, 32, 4, 2), "dkdv": (32, 64, 4, 2)},
    ("sm80", 128): {"fwd": (64, 64, 4, 2), "dq": (64, 64, 8, 2), "dkdv": (32, 64, 8, 2)},
    ("sm80", 256): {"fwd": (64, 32, 8, 2), "dq": (64, 32, 8, 2), "dkdv": (32, 64, 8, 2)},
}
FALLBACKS: tuple[Config, ...] = ((64, 64, 4, 2), (64, 32, 4, 2), (32, 32, 4, 1), (16, 16, 4, 1))


def _generation(capability: tuple[int, int] | None) -> str:
    if capability is None or tuple(capability) < (9, 0):
        return "sm80"
    return "sm90" if tuple(capability) < (10, 0) else "sm100"


def _fp32(widest: int) -> Config:
    return (64, 32, 4, 2) if widest <= 64 else (32, 32, 4, 1 if widest > 128 else 2)


def configs(direction: str, dtype: str, head_dim: int, head_dim_v: int,
            capability: tuple[int, int] | None) -> list[Config]:  # fmt: skip
    """The configurations of one sparse kernel, most preferred first. ``capability`` None (no GPU: the
    interpreter) takes the sm_80 row."""
    widest = max(16, next_pow2(head_dim), next_pow2(head_dim_v))
    if dtype == "float32":
        first = _fp32(widest)
    else:
        generation = _generation(capability)
        bucket = min(b for b in (64, 128, 256) if b >= widest)
        first = TABLE[(generation, bucket)][direction]
    smaller = [c for c in FALLBACKS if c[0] * c[1] < first[0] * first[1] or c[2:] < first[2:]]
    return list(dict.fromkeys([first, *smaller]))
