r"""Generated Triton kernels for block-list attention: :class:`DynamicSpec` and rendering.

The tiles are the selection's blocks (``BLOCK_M = block_m``, ``BLOCK_N = block_n``). Two kernels, one program
per (query block, batch row · query head):

* ``fwd``: loads the query block, then walks its list ``kv_idx[b, h, m, :kv_num[b, h, m]]`` (a run-time loop
  bound), FlashAttention's online softmax in base 2 over the listed key blocks, each with the element test
  (keys past ``seq_k``, the causal rule ``j <= i + causal_offset``, key padding ``Valid[b, j]``); writes
  ``Out`` and ``Lse`` (natural log, ``-inf`` for rows that see no key: their output is 0).
* ``bwd``: the same walk recomputes ``P = exp(S - lse)``; ``dS = P ⊙ (dO Vᵀ - delta)``
  (``delta = rowsum(dO ⊙ O)``, from the launcher), accumulates ``dQ`` in registers and adds ``dK = scale · dSᵀ Q``, ``dV = Pᵀ dO`` of each key
  block into fp32 ``DK``, ``DV`` [B, Hkv, seq_k, ·] with atomics (several query blocks and the GQA group share a
  key block), so the backward walks the forward's lists: no transposed lists are built.
"""

from __future__ import annotations

from dataclasses import dataclass

from attnopt.codegen.cache import load_generated
from attnopt.codegen.spec import CAUSAL_NAMES, CAUSAL_NONE, DTYPES, GeneratedSpec, PaddedValueDim
from attnopt.codegen.triton_text import LOG2E, TL_DTYPES, dot, jit_def, module_head, tile_constants

DIRECTIONS = ("fwd", "bwd")
MAX_HEAD_DIM = 256
TILE_BLOCKS = (16, 32, 64, 128)  # a selection's blocks are the generated kernels' tiles (block lists, estimators)


def block_refusal(block_m: int, block_n: int) -> str | None:
    """Why the generated dynamic kernels cannot tile blocks ``block_m x block_n``, or None."""
    if block_m in TILE_BLOCKS and block_n in TILE_BLOCKS:
        return None
    return f"the Triton kernels take blocks that are powers of two in 16..128; got {block_m}x{block_n}"


@dataclass(frozen=True, kw_only=True)
class DynamicSpec(PaddedValueDim, GeneratedSpec):
    """The compile-time parameters of one generated block-list attention kernel (``valid``: key padding)."""

    FAMILY = "dynamic"

    direction: str
    head_dim: int
    head_dim_v: int
    dtype: str
    causal: int
    valid: bool
    block_m: int
    block_n: int
    block_r: int  # query rows per program: block_m, or a power-of-two part of it (fewer registers)
    block_c: int  # key columns per step: block_n, or a power-of-two part of it (fewer registers)
    num_warps: int
    num_stages: int

    def __post_init__(self) -> None:
        self._check_choices(direction=DIRECTIONS, dtype=DTYPES, causal=tuple(CAUSAL_NAMES))
        self._check_bools("valid")
        self._check_head_dims(MAX_HEAD_DIM)
        self._check_tiles(("block_m", "block_n", "block_r", "block_c"))
        if self.block_m % self.block_r:
            self._fail("block_r", f"a power of two dividing block_m = {self.block_m}")
        if self.block_n % self.block_c:
            self._fail("block_c", f"a power of two dividing block_n = {self.block_n}")
        self._check_launch()


def specs(direction: str, head_dim: int, head_dim_v: int, dtype: str, causal: int, valid: bool, block_m: int,
          block_n: int, capability: tuple[int, int] | None = None) -> list[DynamicSpec]:  # fmt: skip
    """The launch configurations, most preferred first (the tiles are the selection's blocks, so only the warps
    and stages vary): 8 warps from head dim 128 up, for fp32 tiles of 128 (register pressure) and for the
    backward on sm_80-sm_89, else 4."""
    widest = max(head_dim, head_dim_v)
    big = widest >= 128 or (dtype == "float32" and max(block_m, block_n) >= 128)
    ampere_bwd = direction == "bwd" and capability is not None and tuple(capability) < (9, 0)
    warps = 8 if big or ampere_bwd else 4
    # One stage for the backward on sm_80-sm_89 (mma.sync keeps its operands in registers: with two, ptxas
    # spilled 8 B at D64 and 112 B at D128), and for fp32 above head dim 128.
    stages = 1 if ampere_bwd or (dtype == "float32" and widest > 128) else 2
    # Half key blocks per step for the backward on sm_80-sm_89: the atomics' 64-bit pointer
    # tiles of whole 64x128 dK and dV blocks spilled 96-176 B (16 B at 64x64), even with half the query rows.
    cols = max(16, block_n // 2) if ampere_bwd else block_n
    configs = [(cols, warps, stages), (cols, 8, 1), (max(16, block_n // 2), 4, 1)]
    return [DynamicSpec(direction=direction, head_dim=head_dim, head_dim_v=head_dim_v, dtype=dtype, causal=causal,
                        valid=valid, block_m=block_m, block_n=block_n, block_r=block_m, block_c=c, num_warps=w,
                        num_stages=s)
            for c, w, s in dict.fromkeys(configs)]  # fmt: skip


def kernel_arg_names(spec: DynamicSpec) -> tuple[str, ...]:
    pointers, strides, scalars = _args(spec)
    return tuple(pointers + strides + scalars)


def _args(spec: DynamicSpec):
    valid = ["Valid"] if spec.valid else []
    qkv = [f"stride_q{d}" for d in "bhmd"] + [f"stride_k{d}" for d in "bhnd"] + [f"stride_v{d}" for d in "bhnd"]
    sel = ["stride_num_b", "stride_num_h", "stride_idx_b", "stride_idx_h", "stride_idx_m"]
    scalars = ["num_heads", "group", "seq_q", "seq_k", "scale"]
    if spec.direction == "fwd":
        out = [f"stride_o{d}" for d in "bhmd"]
        return ["Q", "K", "V", "KvNum", "KvIdx"] + valid + ["Out", "Lse"], qkv + sel + out, scalars
    grads = [f"stride_dq{d}" for d in "bhmd"] + [f"stride_dk{d}" for d in "bhnd"] + [f"stride_dv{d}" for d in "bhnd"]
    return (["Q", "K", "V", "KvNum", "KvIdx"] + valid + ["DO", "Lse", "Delta", "DQ", "DK", "DV"],
            qkv + sel + [f"stride_do{d}" for d in "bhmd"] + grads, scalars)  # fmt: skip


def render(spec: DynamicSpec) -> str:
    """The source of a Python module defining the ``@triton.jit`` kernel ``spec.name``."""
    summary = [f"Block-list attention, {spec.direction}; dtype {spec.dtype}, causal {CAUSAL_NAMES[spec.causal]}, "
               f"key padding {spec.valid}, head_dim {spec.head_dim}, head_dim_v {spec.head_dim_v}, blocks "
               f"{spec.block_m}x{spec.block_n}."]  # fmt: skip
    constants = {**tile_constants(spec), "BLOCK_R": spec.block_r, "BLOCK_C": spec.block_c, "LOG2E": LOG2E}
    lines = module_head(spec, __name__, summary, constants)
    lines += jit_def(spec.name, *_args(spec))
    lines += ['    """Q [B, H, seq_q, D], K/V [B, H // group, seq_k, ·], KvNum [B, H or 1, NQ] int32, KvIdx '
              '[B, H or 1, NQ, L] int32 (stride 0 on a shared head axis).',
              '    Grid: (NQ * BLOCK_M // BLOCK_R, B * H)."""']  # fmt: skip
    lines += _prologue(spec) + (_fwd(spec) if spec.direction == "fwd" else _bwd(spec))
    return "\n".join(lines) + "\n"


def load(spec: DynamicSpec):
    """The kernel of ``spec``, rendered into the kernel cache and imported on first use."""
    return load_generated(spec.name, lambda: render(spec))


def _prologue(spec: DynamicSpec) -> list[str]:
    lines = [
        "    pid_r = tl.program_id(0)  # rows [BLOCK_R] of query block pid_m",
        "    pid_m = pid_r // (BLOCK_M // BLOCK_R)",
        "    pid_bh = tl.program_id(1)",
        "    off_b = (pid_bh // num_heads).to(tl.int64)",
        "    off_h = (pid_bh % num_heads).to(tl.int64)",
        "    off_hkv = off_h // group  # GQA: query head h reads key/value head h // group",
        "    offs_m = tl.arange(0, BLOCK_R)",
        "    offs_n = tl.arange(0, BLOCK_C)",
        "    offs_d = tl.arange(0, BLOCK_D)",
        "    offs_dv = tl.arange(0, BLOCK_DV)",
        "    d_ok = offs_d < HEAD_DIM",
        "    dv_ok = offs_dv < HEAD_DIM_V",
        "    row0 = tl.cast(pid_r * BLOCK_R, tl.int64)",
        "    rows = pid_r * BLOCK_R + offs_m",
        "    row_ok = rows < seq_q",
        "    k_base = K + off_b * stride_kb + off_hkv * stride_kh",
        "    v_base = V + off_b * stride_vb + off_hkv * stride_vh",
        "    count = tl.load(KvNum + off_b * stride_num_b + off_h * stride_num_h + pid_m)",
        "    idx_base = KvIdx + off_b * stride_idx_b + off_h * stride_idx_h + pid_m * stride_idx_m",
        "    q = tl.load(Q + off_b * stride_qb + off_h * stride_qh + (row0 + offs_m[:, None]) * stride_qm"
        " + offs_d[None, :] * stride_qd,",
        "                mask=row_ok[:, None] & d_ok[None, :], other=0.0)  # [BLOCK_R, BLOCK_D]",
        "    qk_scale = scale * LOG2E",
    ]
    if spec.causal != CAUSAL_NONE:
        offset = "seq_k - seq_q" if spec.causal == 2 else "0"
        lines.append(f"    causal_offset = {offset}")
    return lines


def _block(spec: DynamicSpec, ind: str) -> list[str]:
    """Loads key block ``KvIdx[.., i]`` and computes its base-2 scores ``s`` with the element test."""
    keep = ["row_ok[:, None]", "col_ok[None, :]"]
    if spec.causal != CAUSAL_NONE:
        keep.append("(cols[None, :] <= rows[:, None] + causal_offset)")
    steps = spec.block_n // spec.block_c  # steps per key block (a literal: the interpreter's ints meet no constexpr)
    if steps == 1:
        lines = [f"{ind}blk = tl.load(idx_base + i)", f"{ind}first = blk * BLOCK_N"]
    else:
        lines = [f"{ind}blk = tl.load(idx_base + i // {steps})",
                 f"{ind}first = blk * BLOCK_N + (i % {steps}) * BLOCK_C  # step i: columns [BLOCK_C] of a key block"]
    lines += [
        f"{ind}col0 = tl.cast(first, tl.int64)",
        f"{ind}cols = first + offs_n",
        f"{ind}col_ok = cols < seq_k",
    ]
    if spec.valid:
        lines.append(f"{ind}col_ok = col_ok & (tl.load(Valid + off_b * seq_k + cols, mask=col_ok, other=0) != 0)")
    lines += [
        f"{ind}k = tl.load(k_base + (col0 + offs_n[None, :]) * stride_kn + offs_d[:, None] * stride_kd,",
        f"{ind}            mask=col_ok[None, :] & d_ok[:, None], other=0.0)  # [BLOCK_D, BLOCK_C], Kᵀ",
        f"{ind}v = tl.load(v_base + (col0 + offs_n[:, None]) * stride_vn + offs_dv[None, :] * stride_vd,",
        f"{ind}            mask=col_ok[:, None] & dv_ok[None, :], other=0.0)  # [BLOCK_C, BLOCK_DV]",
        f"{ind}keep = {' & '.join(keep)}",
        f"{ind}s = tl.where(keep, {dot(spec, 'q', 'k')} * qk_scale, float('-inf'))  # [BLOCK_R, BLOCK_C], base 2",
    ]
    return lines


def _fwd(spec: DynamicSpec) -> list[str]:
    dt = TL_DTYPES[spec.dtype]
    return [
        "    m_i = tl.full([BLOCK_R], float('-inf'), tl.float32)",
        "    l_i = tl.zeros([BLOCK_R], tl.float32)",
        "    acc = tl.zeros([BLOCK_R, BLOCK_DV], tl.float32)",
        f"    for i in range(0, count * {spec.block_n // spec.block_c}):",
        *_block(spec, "        "),
        "        m_new = tl.maximum(m_i, tl.max(s, 1))",
        "        m_safe = tl.where(m_new == float('-inf'), 0.0, m_new)  # rows with nothing seen yet",
        "        p = tl.exp2(s - m_safe[:, None])",
        "        alpha = tl.exp2(m_i - m_safe)",
        "        l_i = l_i * alpha + tl.sum(p, 1)",
        f"        acc = acc * alpha[:, None] + {dot(spec, f'p.to({dt})', 'v')}",
        "        m_i = m_new",
        "    seen = l_i > 0.0",
        "    out = acc / tl.where(seen, l_i, 1.0)[:, None]",
        "    lse = tl.where(seen, (m_i + tl.log2(tl.where(seen, l_i, 1.0))) / LOG2E, float('-inf'))",
        "    tl.store(Out + off_b * stride_ob + off_h * stride_oh + (row0 + offs_m[:, None]) * stride_om"
        " + offs_dv[None, :] * stride_od,",
        "             out.to(Out.dtype.element_ty), mask=row_ok[:, None] & dv_ok[None, :])",
        "    tl.store(Lse + pid_bh.to(tl.int64) * seq_q + rows, lse, mask=row_ok)",
    ]


def _bwd(spec: DynamicSpec) -> list[str]:
    dt = TL_DTYPES[spec.dtype]
    return [
        "    do = tl.load(DO + off_b * stride_dob + off_h * stride_doh + (row0 + offs_m[:, None]) * stride_dom"
        " + offs_dv[None, :] * stride_dod,",
        "                 mask=row_ok[:, None] & dv_ok[None, :], other=0.0)  # [BLOCK_R, BLOCK_DV]",
        "    lse = tl.load(Lse + pid_bh.to(tl.int64) * seq_q + rows, mask=row_ok, other=0.0)",
        "    lse2 = tl.where(lse == float('-inf'), 0.0, lse) * LOG2E  # rows that see nothing: P = 0",
        "    delta = tl.load(Delta + pid_bh.to(tl.int64) * seq_q + rows, mask=row_ok, other=0.0)",
        "    dq = tl.zeros([BLOCK_R, BLOCK_D], tl.float32)",
        "    dk_base = DK + off_b * stride_dkb + off_hkv * stride_dkh",
        "    dv_base = DV + off_b * stride_dvb + off_hkv * stride_dvh",
        f"    for i in range(0, count * {spec.block_n // spec.block_c}):",
        *_block(spec, "        "),
        "        p = tl.exp2(s - lse2[:, None])  # [BLOCK_R, BLOCK_C]; 0 where the element test fails",
        # Each tile is consumed as soon as it is made (v, then p, then ds): fewer live registers (sm_80 at D128).
        f"        ds = p * ({dot(spec, 'do', 'tl.trans(v)')} - delta[:, None])",
        f"        dv = {dot(spec, f'tl.trans(p.to({dt}))', 'do')}  # [BLOCK_C, BLOCK_DV]",
        "        tl.atomic_add(dv_base + (col0 + offs_n[:, None]) * stride_dvn + offs_dv[None, :] * stride_dvd, dv,",
        "                      mask=col_ok[:, None] & dv_ok[None, :])",
        f"        dq += {dot(spec, f'ds.to({dt})', 'tl.trans(k)')}",
        f"        dk = {dot(spec, f'tl.trans(ds.to({dt}))', 'q')} * scale  # [BLOCK_C, BLOCK_D]",
        "        tl.atomic_add(dk_base + (col0 + offs_n[:, None]) * stride_dkn + offs_d[None, :] * stride_dkd, dk,",
        "                      mask=col_ok[:, None] & d_ok[None, :])",
        "    dq = dq * scale",
        "    tl.store(DQ + off_b * stride_dqb + off_h * stride_dqh + (row0 + offs_m[:, None]) * stride_dqm"
        " + offs_d[None, :] * stride_dqd,",
        "             dq.to(DQ.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])",
    ]
