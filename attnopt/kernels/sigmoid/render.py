r"""Generated Triton kernels for fused sigmoid attention: :class:`SigmoidSpec` and rendering.

``O = σ(scale · Q Kᵀ + b + mask) V`` (:mod:`attnopt.kernels.sigmoid.reference`) needs no running
maximum and no denominator: every key tile adds ``σ(S) V_tile`` to the output on its own, so the
forward is FlashAttention's loop without the online softmax, and the backward needs no ``lse`` nor
``rowsum(dO ⊙ O)``::

    dV = Σ_i P_iᵀ dO_i      dS = (dO Vᵀ) ⊙ P ⊙ (1 - P)      dQ = scale · dS K      dK = scale · dSᵀ Q

Three kernels: ``fwd`` (one program per query tile), ``bwd_kv`` (one program per key tile, looping
over the query tiles that see it; dK and dV per query head in fp32, summed over GQA groups by the
launcher) and ``bwd_q`` (one program per query tile; with ``write_ds`` it also stores ``dS``, whose
sum over the mask's broadcast dims is the gradient of an additive mask). Masked keys get weight
exactly 0 (``tl.where`` after the sigmoid), so rows without visible keys are 0.

Causal masks (``j <= i + offset``; offset 0 top-left, ``Sk - Sq`` bottom-right) bound the key tiles a
query tile loads; in the forward, the tiles every row sees whole run without the per-element test and
only the boundary tiles evaluate it (the exact path's split).
"""

from __future__ import annotations

from dataclasses import dataclass

from attnopt.codegen.cache import load_generated
from attnopt.codegen.spec import (
    CAUSAL_BOTTOM_RIGHT,
    CAUSAL_NAMES,
    CAUSAL_NONE,
    CAUSAL_TOP_LEFT,
    DTYPES,
    GeneratedSpec,
    PaddedValueDim,
    next_pow2,
)
from attnopt.codegen.triton_text import TL_DTYPES, dot, jit_def, module_head, tile_constants

DIRECTIONS = ("fwd", "bwd_kv", "bwd_q")
MASKS = ("none", "bool", "additive")
MAX_HEAD_DIM = 256


@dataclass(frozen=True, kw_only=True)
class SigmoidSpec(PaddedValueDim, GeneratedSpec):
    """The compile-time parameters of one generated sigmoid-attention kernel.

    ``write_ds`` (``bwd_q`` with an additive mask only): the kernel also stores the score gradient
    ``dS`` [B, H, seq_q, seq_k] fp32, which the launcher sums into the gradient of the mask.
    """

    FAMILY = "sigmoid"

    direction: str
    head_dim: int
    head_dim_v: int
    dtype: str
    causal: int
    mask: str
    write_ds: bool = False
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int

    def __post_init__(self) -> None:
        self._check_choices(direction=DIRECTIONS, dtype=DTYPES, mask=MASKS, causal=tuple(CAUSAL_NAMES))
        self._check_bools("write_ds")
        if self.write_ds and (self.direction != "bwd_q" or self.mask != "additive"):
            raise ValueError(f"SigmoidSpec.write_ds needs direction 'bwd_q' and mask 'additive'; got direction "
                             f"{self.direction!r}, mask {self.mask!r}")  # fmt: skip
        self._check_head_dims(MAX_HEAD_DIM)
        self._check_tiles()
        self._check_launch()


def default_spec(direction: str, head_dim: int, head_dim_v: int, dtype: str, causal: int, mask: str,
                 write_ds: bool = False, capability: tuple[int, int] | None = None) -> SigmoidSpec:  # fmt: skip
    """The first of :func:`specs`: the tiles launched unless the compiler rejects them."""
    return specs(direction, head_dim, head_dim_v, dtype, causal, mask, write_ds, capability)[0]


def specs(direction: str, head_dim: int, head_dim_v: int, dtype: str, causal: int, mask: str,
          write_ds: bool = False, capability: tuple[int, int] | None = None) -> list[SigmoidSpec]:  # fmt: skip
    """The kernel's tile configurations, most preferred first (the launcher falls back down the list).

    16-bit 64x64 up to head dim 128 (64x32 above); fp32 64x32 up to 64 (32x32 above); then halved tiles.
    8 warps from head dim 128 up: with 4, the two fp32 accumulators of the backward plus the score-sized
    tiles passed 255 registers per thread (ptxas spilled 150-460 B on sm_90a); and for the backward on
    sm_80-sm_89 (``capability``, None off the GPU), where mma.sync holds its A operands in registers
    (bwd_q spilled 12 B at head dim 64 with 4). 2 stages, 1 for fp32 above 128.
    """
    widest = max(next_pow2(head_dim), next_pow2(head_dim_v))
    if dtype == "float32":
        block_m, block_n = (64, 32) if widest <= 64 else (32, 32)
    else:
        block_m, block_n = (64, 64) if widest <= 128 else (64, 32)
    ampere = capability is not None and tuple(capability) < (9, 0)
    warps = 8 if widest >= 128 or (ampere and direction != "fwd") else 4
    stages = 1 if dtype == "float32" and widest > 128 else 2
    tiles = [(block_m, block_n, warps, stages), (block_m, max(block_n // 2, 16), 4, stages), (32, 16, 4, 1)]
    return [SigmoidSpec(direction=direction, head_dim=head_dim, head_dim_v=head_dim_v, dtype=dtype, causal=causal,
                        mask=mask, write_ds=write_ds, block_m=bm, block_n=bn, num_warps=w, num_stages=st)
            for bm, bn, w, st in dict.fromkeys(tiles)]  # fmt: skip


def kernel_arg_names(spec: SigmoidSpec) -> tuple[str, ...]:
    pointers, strides, scalars = _args(spec)
    return tuple(pointers + strides + scalars)


def _args(spec: SigmoidSpec) -> tuple[list[str], list[str], list[str]]:
    mask = ["Mask"] if spec.mask != "none" else []
    mask_strides = [f"stride_mask_{d}" for d in "bhmn"] if spec.mask != "none" else []
    qkv = [f"stride_q{d}" for d in "bhmd"] + [f"stride_k{d}" for d in "bhnd"] + [f"stride_v{d}" for d in "bhnd"]
    scalars = ["num_heads", "group", "seq_q", "seq_k", "scale", "bias"]
    if spec.direction == "fwd":
        return ["Q", "K", "V"] + mask + ["Out"], qkv + mask_strides + [f"stride_o{d}" for d in "bhmd"], scalars
    grads = (["DQ"] + (["DS"] if spec.write_ds else [])) if spec.direction == "bwd_q" else ["DK", "DV"]
    grad_strides = ([f"stride_dq{d}" for d in "bhmd"] if spec.direction == "bwd_q"
                    else [f"stride_dk{d}" for d in "bhnd"] + [f"stride_dv{d}" for d in "bhnd"])  # fmt: skip
    return (["Q", "K", "V"] + mask + ["DO"] + grads, qkv + mask_strides + [f"stride_do{d}" for d in "bhmd"]
            + grad_strides, scalars)  # fmt: skip


def render(spec: SigmoidSpec) -> str:
    """The source of a Python module defining the ``@triton.jit`` kernel ``spec.name``."""
    body = {"fwd": _fwd, "bwd_kv": _bwd_kv, "bwd_q": _bwd_q}[spec.direction](spec)
    return "\n".join(_header(spec) + _signature(spec) + _prologue(spec) + body) + "\n"


def load(spec: SigmoidSpec):
    """The kernel of ``spec``, rendered into the kernel cache and imported on first use."""
    return load_generated(spec.name, lambda: render(spec))


def _header(spec: SigmoidSpec) -> list[str]:
    summary = [f"Sigmoid attention, {spec.direction}; dtype {spec.dtype}, causal {CAUSAL_NAMES[spec.causal]}, mask "
               f"{spec.mask}{', writes dS' if spec.write_ds else ''}, head_dim {spec.head_dim}, head_dim_v "
               f"{spec.head_dim_v}, tiles {spec.block_m}x{spec.block_n}."]  # fmt: skip
    return module_head(spec, __name__, summary, tile_constants(spec))


def _signature(spec: SigmoidSpec) -> list[str]:
    pointers, strides, scalars = _args(spec)
    doc = {
        "fwd": "Out [B, H, seq_q, HEAD_DIM_V] = σ(scale·QKᵀ + bias + mask) V. Grid: (cdiv(seq_q, BLOCK_M), B * H).",
        "bwd_kv": "DK [B, H, seq_k, HEAD_DIM], DV [B, H, seq_k, HEAD_DIM_V] fp32 per query head. "
                  "Grid: (cdiv(seq_k, BLOCK_N), B * H).",
        "bwd_q": "DQ [B, H, seq_q, HEAD_DIM]. Grid: (cdiv(seq_q, BLOCK_M), B * H).",
    }[spec.direction]
    lines = jit_def(spec.name, pointers, strides, scalars)
    lines += ['    """Q [B, H, seq_q, HEAD_DIM], K [B, H // group, seq_k, HEAD_DIM], V [B, H // group, seq_k, '
              'HEAD_DIM_V], any strides.', "", f"    {doc}"]  # fmt: skip
    if spec.mask != "none":
        meaning = "True = attend (read as uint8)" if spec.mask == "bool" else "added to the scores"
        lines.append(f"    Mask is read as [B, H, seq_q, seq_k] through its strides (0 on broadcast dims); {meaning}.")
    if spec.write_ds:
        lines.append("    Also stores dS into DS [B, H, seq_q, seq_k] fp32, contiguous, zero-filled by the caller.")
    return lines + ['    """']


def _prologue(spec: SigmoidSpec) -> list[str]:
    tile = "pid_n" if spec.direction == "bwd_kv" else "pid_m"
    lines = [
        f"    {tile} = tl.program_id(0)",
        "    pid_bh = tl.program_id(1)",
        "    off_b = (pid_bh // num_heads).to(tl.int64)",
        "    off_h = (pid_bh % num_heads).to(tl.int64)",
        "    off_hkv = off_h // group  # GQA: query head h reads key/value head h // group",
        "    offs_d = tl.arange(0, BLOCK_D)",
        "    offs_dv = tl.arange(0, BLOCK_DV)",
        "    d_ok = offs_d < HEAD_DIM",
        "    dv_ok = offs_dv < HEAD_DIM_V",
        "    q_base = Q + off_b * stride_qb + off_h * stride_qh",
        "    k_base = K + off_b * stride_kb + off_hkv * stride_kh",
        "    v_base = V + off_b * stride_vb + off_hkv * stride_vh",
    ]
    if spec.mask != "none":
        lines.append("    mask_base = Mask + off_b * stride_mask_b + off_h * stride_mask_h")
    if spec.causal == CAUSAL_BOTTOM_RIGHT:
        lines.append("    causal_offset = seq_k - seq_q  # bottom-right: query i sees keys j <= i + causal_offset")
    elif spec.causal == CAUSAL_TOP_LEFT:
        lines.append("    causal_offset = 0  # top-left: query i sees keys j <= i")
    return lines


def _weights(spec: SigmoidSpec, indent: str, test: bool, transposed: bool = False) -> list[str]:
    """``p = σ(s)`` [BLOCK_M, BLOCK_N] for query rows ``rows`` and key columns ``cols``, 0 at masked keys
    (``transposed``: ``pᵀ`` [BLOCK_N, BLOCK_M] from ``sᵀ``, keys down the rows).

    ``test`` adds the per-element tests on the sequence ends and the causal diagonal.
    """
    r, c = ("[None, :]", "[:, None]") if transposed else ("[:, None]", "[None, :]")
    tile = (f"mask_base + row0 * stride_mask_m + col0 * stride_mask_n + offs_m{r} * stride_mask_m"
            f" + offs_n{c} * stride_mask_n")  # fmt: skip
    lines = []
    if spec.mask == "additive":
        lines += [
            f"{indent}bias_tile = tl.load({tile},",
            f"{indent}                    mask=row_ok{r} & col_ok{c}, other=0.0)",
            f"{indent}s += bias_tile.to(tl.float32)",
        ]
    lines.append(f"{indent}p = tl.sigmoid(s)  # one exp2 and one reciprocal per score")
    keep = []
    if test:
        keep.append(f"row_ok{r} & col_ok{c}")
        if spec.causal != CAUSAL_NONE:
            keep.append(f"(cols{c} <= rows{r} + causal_offset)")
    if spec.mask == "bool":
        lines += [
            f"{indent}attend = tl.load({tile},",
            f"{indent}                 mask=row_ok{r} & col_ok{c}, other=0)",
        ]
        keep.append("(attend != 0)")
    if keep:
        lines.append(f"{indent}p = tl.where({' & '.join(keep)}, p, 0.0)")
    return lines


def _tile_start(axis: str, index: str, ind: str) -> list[str]:
    """The query (``axis`` "m") or key ("n") tile ``index``: its first row ``start_m``/``start_n``, the same as
    int64 (``row0``/``col0``: ``row0 * stride`` may pass 2**31 on long or strided inputs, while the
    ``offs_m * stride`` within a tile stays small) and ``rows``/``cols``."""
    block, first, many = ("BLOCK_M", "row0", "rows") if axis == "m" else ("BLOCK_N", "col0", "cols")
    return [
        f"{ind}start_{axis} = {index} * {block}",
        f"{ind}{first} = tl.cast(start_{axis}, tl.int64)",
        f"{ind}{many} = start_{axis} + offs_{axis}  # [{block}]",
    ]


def _key_end(spec: SigmoidSpec) -> list[str]:
    """``end``: one past the last key any row of the query tile may see (``start_m``, ``rows`` defined)."""
    if spec.causal == CAUSAL_NONE:
        return ["    end = seq_k"]
    return ["    end = tl.minimum(seq_k, tl.maximum(tl.minimum(start_m + BLOCK_M, seq_q) + causal_offset, 0))"]


def _fwd(spec: SigmoidSpec) -> list[str]:
    dt = TL_DTYPES[spec.dtype]
    lines = [
        "    offs_m = tl.arange(0, BLOCK_M)",
        *_tile_start("m", "pid_m", "    "),
        "    row_ok = rows < seq_q",
        "    offs_n = tl.arange(0, BLOCK_N)",
        "    q = tl.load(q_base + row0 * stride_qm + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,",
        "                mask=row_ok[:, None] & d_ok[None, :], other=0.0)  # [BLOCK_M, BLOCK_D]",
        "    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)",
    ]
    lines += _key_end(spec)
    if spec.causal == CAUSAL_NONE:
        lines.append("    full_end = seq_k // BLOCK_N * BLOCK_N  # key tiles [0, full_end) lie inside seq_k")
    else:
        lines += [
            "    # key tiles [0, full_end) are seen whole by every row of this query tile: no element test there",
            "    full_end = tl.minimum(seq_k // BLOCK_N * BLOCK_N, tl.maximum(start_m + causal_offset + 1, 0) // BLOCK_N * BLOCK_N)",
        ]
    # Unit-step loops over tile indices: a strided range(a, b, BLOCK_N) kept a wgmma in flight across the
    # loop exit and ptxas serialized every wgmma of the body (advisory C7515).
    for boundary in (False, True):
        header = ("    for tile in range(full_end // BLOCK_N, tl.cdiv(end, BLOCK_N)):  # boundary key tiles" if boundary
                  else "    for tile in range(0, full_end // BLOCK_N):  # interior key tiles")  # fmt: skip
        lines += ["", header]
        lines += [
            *_tile_start("n", "tile", "        "),
            "        col_ok = cols < seq_k",
            "        k = tl.load(k_base + col0 * stride_kn + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd,",
            "                    mask=col_ok[None, :] & d_ok[:, None], other=0.0)  # [BLOCK_D, BLOCK_N], Kᵀ",
            f"        s = {dot(spec, 'q', 'k')} * scale + bias  # [BLOCK_M, BLOCK_N]",
        ]
        lines += _weights(spec, "        ", test=boundary)
        lines += [
            "        v = tl.load(v_base + col0 * stride_vn + offs_n[:, None] * stride_vn + offs_dv[None, :] * stride_vd,",
            "                    mask=col_ok[:, None] & dv_ok[None, :], other=0.0)  # [BLOCK_N, BLOCK_DV]",
            f"        acc += {dot(spec, f'p.to({dt})', 'v')}",
        ]
    lines += [
        "",
        "    o_ptrs = (Out + off_b * stride_ob + off_h * stride_oh + row0 * stride_om + offs_m[:, None] * stride_om",
        "              + offs_dv[None, :] * stride_od)",
        "    tl.store(o_ptrs, acc.to(Out.dtype.element_ty), mask=row_ok[:, None] & dv_ok[None, :])",
    ]
    return lines


def _load_queries(ind: str) -> list[str]:
    """``q`` [BLOCK_M, BLOCK_D] and ``do`` [BLOCK_M, BLOCK_DV] of the query rows ``rows`` (``row_ok``)."""
    return [
        f"{ind}q = tl.load(q_base + row0 * stride_qm + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,",
        f"{ind}            mask=row_ok[:, None] & d_ok[None, :], other=0.0)  # [BLOCK_M, BLOCK_D]",
        f"{ind}do = tl.load(DO + off_b * stride_dob + off_h * stride_doh + row0 * stride_dom + offs_m[:, None] * stride_dom",
        f"{ind}             + offs_dv[None, :] * stride_dod, mask=row_ok[:, None] & dv_ok[None, :], other=0.0)",
    ]


def _load_keys(ind: str) -> list[str]:
    """``k`` [BLOCK_N, BLOCK_D] and ``v`` [BLOCK_N, BLOCK_DV] of the key rows ``cols`` (``col_ok``)."""
    return [
        f"{ind}k = tl.load(k_base + col0 * stride_kn + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,",
        f"{ind}            mask=col_ok[:, None] & d_ok[None, :], other=0.0)  # [BLOCK_N, BLOCK_D]",
        f"{ind}v = tl.load(v_base + col0 * stride_vn + offs_n[:, None] * stride_vn + offs_dv[None, :] * stride_vd,",
        f"{ind}            mask=col_ok[:, None] & dv_ok[None, :], other=0.0)  # [BLOCK_N, BLOCK_DV]",
    ]


def _score_grad(spec: SigmoidSpec, ind: str) -> list[str]:
    """The backward's per-tile step: ``p`` and ``ds = (dO Vᵀ) ⊙ p ⊙ (1 - p)`` [BLOCK_M, BLOCK_N]."""
    return [
        f"{ind}s = {dot(spec, 'q', 'tl.trans(k)')} * scale + bias  # [BLOCK_M, BLOCK_N]",
        *_weights(spec, ind, test=True),
        f"{ind}dp = {dot(spec, 'do', 'tl.trans(v)')}  # [BLOCK_M, BLOCK_N]",
        f"{ind}ds = dp * p * (1.0 - p)  # [BLOCK_M, BLOCK_N] gradient of the scores (and of an additive mask)",
    ]


def _bwd_kv(spec: SigmoidSpec) -> list[str]:
    dt = TL_DTYPES[spec.dtype]
    if spec.causal == CAUSAL_NONE:
        lo = ["    lo = 0"]
    else:
        lo = ["    lo = tl.maximum(start_n - causal_offset, 0) // BLOCK_M * BLOCK_M  # first query tile seeing a key here"]
    lines = [
        "    offs_n = tl.arange(0, BLOCK_N)",
        *_tile_start("n", "pid_n", "    "),
        "    col_ok = cols < seq_k",
        "    offs_m = tl.arange(0, BLOCK_M)",
        *_load_keys("    "),
        "    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)",
        "    dv = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)",
        *lo,
        "    for tile in range(lo // BLOCK_M, tl.cdiv(seq_q, BLOCK_M)):  # unit step: see _fwd",
        *_tile_start("m", "tile", "        "),
        "        row_ok = rows < seq_q",
        *_load_queries("        "),
        # Transposed scores (keys down the rows), so pᵀ and dsᵀ feed the tensor cores as they are: a
        # tl.trans of a register tile went through shared memory and serialized the wgmma (C7515).
        f"        s = {dot(spec, 'k', 'tl.trans(q)')} * scale + bias  # [BLOCK_N, BLOCK_M] Sᵀ",
        *_weights(spec, "        ", test=True, transposed=True),
        f"        dp = {dot(spec, 'v', 'tl.trans(do)')}  # [BLOCK_N, BLOCK_M] dPᵀ",
        "        ds = dp * p * (1.0 - p)  # [BLOCK_N, BLOCK_M] dSᵀ",
        f"        dv += {dot(spec, f'p.to({dt})', 'do')}",
        f"        dk += {dot(spec, f'ds.to({dt})', 'q')}",
        "    dk = dk * scale",
        "    tl.store(DK + off_b * stride_dkb + off_h * stride_dkh + col0 * stride_dkn + offs_n[:, None] * stride_dkn",
        "             + offs_d[None, :] * stride_dkd, dk, mask=col_ok[:, None] & d_ok[None, :])",
        "    tl.store(DV + off_b * stride_dvb + off_h * stride_dvh + col0 * stride_dvn + offs_n[:, None] * stride_dvn",
        "             + offs_dv[None, :] * stride_dvd, dv, mask=col_ok[:, None] & dv_ok[None, :])",
    ]
    return lines


def _bwd_q(spec: SigmoidSpec) -> list[str]:
    dt = TL_DTYPES[spec.dtype]
    lines = [
        "    offs_m = tl.arange(0, BLOCK_M)",
        *_tile_start("m", "pid_m", "    "),
        "    row_ok = rows < seq_q",
        "    offs_n = tl.arange(0, BLOCK_N)",
        *_load_queries("    "),
        "    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)",
    ]
    if spec.write_ds:
        lines.append("    ds_row = DS + (pid_bh.to(tl.int64) * seq_q + rows) * seq_k  # [BLOCK_M] &dS[row, 0]")
    lines += _key_end(spec)
    lines += [
        "    for tile in range(0, tl.cdiv(end, BLOCK_N)):  # unit step: see _fwd",
        *_tile_start("n", "tile", "        "),
        "        col_ok = cols < seq_k",
        *_load_keys("        "),
        *_score_grad(spec, "        "),
    ]
    if spec.write_ds:
        lines.append("        tl.store(ds_row[:, None] + cols[None, :], ds, mask=row_ok[:, None] & col_ok[None, :])")
    lines += [
        f"        dq += {dot(spec, f'ds.to({dt})', 'k')}",
        "    dq = dq * scale",
        "    tl.store(DQ + off_b * stride_dqb + off_h * stride_dqh + row0 * stride_dqm + offs_m[:, None] * stride_dqm",
        "             + offs_d[None, :] * stride_dqd, dq.to(DQ.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])",
    ]
    return lines
