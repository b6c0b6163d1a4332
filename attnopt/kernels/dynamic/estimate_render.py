r"""Generated Triton kernels of the block-importance estimators: :class:`PooledSpec`, :class:`AntidiagonalSpec`.

``antidiagonal``'s kernel computes, for one (tile of query blocks, batch row · query head), the same ``[NQ, NK]``
fp32 probabilities as its torch estimator in :mod:`attnopt.kernels.dynamic.estimate` (zero on the blocks the
site's causal rule hides, rows summing to one); ``pooled``'s computes that estimator's block logits, the heavy part
(``O(S · D)`` reads, ``O(NQ · NK · D)`` products), and the launcher finishes them in torch on the device (near
blocks, masked softmax: ``estimate.pooled_probabilities``). Both read
q and k through their strides (GQA: query head ``h`` reads key head ``h // group``), walk only the key tiles a
program's query blocks may see (the causal rule bounds the walk) and never materialize more than a tile of scores.

* ``pooled``: the program takes the moments of its ``TILE_Q`` query blocks (per channel the mean of each block's
  real rows and the mean square of every ``max(1, block // 16)``-th row, ``ROWS`` rows per step), then per step
  those of ``TILE_K`` key blocks the same way, and stores their logits ``Q̄ K̄ᵀ · scale + σ²/2 + log |block|``,
  ``σ² = max(0, Q₂ K₂ᵀ - Q̄² K̄²ᵀ) · scale²``: three fp32 IEEE products ``[TILE_Q, D] x [D, TILE_K]``, each
  summed over chunks of ``DCHUNK`` channels (an FMA dot holds its whole inner dimension in registers: one of
  ``D = 128`` spills). A single pass: the key moments are taken once per program.
* ``antidiagonal`` (XAttention): two passes over the key tiles (the first finds each strided row's softmax maximum
  and sum online, the second writes the probabilities). Strided row ``r`` holds query rows ``r·STRIDE ..
  r·STRIDE + STRIDE - 1`` reversed, strided column ``c`` key rows ``c·STRIDE ..`` in order, so their dot
  product (``STRIDE`` products of ``[TILE_R, D] x [D, TILE_C]`` tiles) sums the antidiagonal of tile ``(r, c)``.
  Softmax per strided row over the real key columns of the allowed blocks; the second pass recomputes the scores
  and sums the probabilities into ``[query block, key block]``: over a key block's ``BLOCK_N / STRIDE`` columns,
  then the mean over a query block's ``BLOCK_M / STRIDE`` rows (padded rows past ``seq_q`` included, as the torch
  estimator does).
"""

from __future__ import annotations

from dataclasses import dataclass

from attnopt.codegen.cache import load_generated
from attnopt.codegen.spec import DTYPES, MAX_HEAD_DIM, GeneratedSpec
from attnopt.codegen.triton_text import LOG2E, jit_def, module_head


def _divisor(value, *blocks: int) -> bool:
    """``value`` is a power-of-two int dividing every block."""
    ok = isinstance(value, int) and not isinstance(value, bool) and value > 0 and value & (value - 1) == 0
    return ok and all(b % value == 0 for b in blocks)


class _EstimateSpec(GeneratedSpec):
    """What both estimator specs share: the family, the role field, the checks of the common fields."""

    FAMILY = "estimate"
    ROLE = "kind"

    def _check_common(self, tiles: tuple[str, ...]) -> None:
        self._check_choices(dtype=DTYPES)
        self._check_bools("causal")
        if not isinstance(self.head_dim, int) or not 1 <= self.head_dim <= MAX_HEAD_DIM:
            self._fail("head_dim", f"an int in 1..{MAX_HEAD_DIM}")
        self._check_tiles(("block_m", "block_n") + tiles)
        self._check_launch()


@dataclass(frozen=True, kw_only=True)
class PooledSpec(_EstimateSpec):
    """The mean-pooled estimator's kernel: ``tile_q`` query blocks per program, ``tile_k`` key blocks per step,
    ``rows`` rows of a block pooled per step (a power of two dividing both blocks)."""

    kind = "pooled"  # a class attribute, not a field: the role in the kernel's name

    dtype: str
    head_dim: int
    causal: bool
    block_m: int
    block_n: int
    tile_q: int
    tile_k: int
    rows: int
    num_warps: int
    num_stages: int

    def __post_init__(self) -> None:
        self._check_common(("tile_q", "tile_k"))
        if not _divisor(self.rows, self.block_m, self.block_n):
            self._fail("rows", f"a power of two dividing block_m {self.block_m} and block_n {self.block_n}")


@dataclass(frozen=True, kw_only=True)
class AntidiagonalSpec(_EstimateSpec):
    """The antidiagonal estimator's kernel: ``tile_r`` strided query rows per program, ``tile_c`` strided key
    columns per step (multiples of a block's strided rows and columns)."""

    kind = "antidiagonal"

    dtype: str
    head_dim: int
    causal: bool
    block_m: int
    block_n: int
    stride: int
    tile_r: int
    tile_c: int
    num_warps: int
    num_stages: int

    def __post_init__(self) -> None:
        self._check_common(("tile_r", "tile_c"))
        if not _divisor(self.stride, self.block_m, self.block_n):
            self._fail("stride", f"a power of two dividing block_m {self.block_m} and block_n {self.block_n}")
        if self.tile_r % (self.block_m // self.stride):
            self._fail("tile_r", f"a multiple of block_m / stride = {self.block_m // self.stride}")
        if self.tile_c % (self.block_n // self.stride):
            self._fail("tile_c", f"a multiple of block_n / stride = {self.block_n // self.stride}")


def kernel_arg_names(spec) -> tuple[str, ...]:
    pointers, strides, scalars = _args(spec)
    return tuple(pointers + strides + scalars)


def _args(spec):
    strides = [f"stride_q{d}" for d in "bhmd"] + [f"stride_k{d}" for d in "bhnd"] + [f"stride_o{d}" for d in "bhmn"]
    scalars = ["num_heads", "group", "seq_q", "seq_k"] + (["causal_offset"] if spec.causal else []) + ["scale"]
    return ["Q", "K", "Out"], strides, scalars


def render(spec) -> str:
    """The source of a Python module defining the ``@triton.jit`` kernel ``spec.name``."""
    summary = [f"Block-importance estimator {spec.kind}; dtype {spec.dtype}, causal {spec.causal}, head_dim "
               f"{spec.head_dim}, blocks {spec.block_m}x{spec.block_n}."]  # fmt: skip
    constants = {"BLOCK_M": spec.block_m, "BLOCK_N": spec.block_n, "HEAD_DIM": spec.head_dim,
                 "BLOCK_D": spec.block_d, "LOG2E": LOG2E}  # fmt: skip
    if spec.kind == "pooled":
        constants.update(TILE_Q=spec.tile_q, TILE_K=spec.tile_k, ROWS=spec.rows, QSTEP=max(1, spec.block_m // 16),
                         KSTEP=max(1, spec.block_n // 16), DC=spec.block_d // _chunks(spec))  # fmt: skip
        grid = "cdiv(NQ, TILE_Q)"
    else:
        rows_per_q, cols_per_k = spec.block_m // spec.stride, spec.block_n // spec.stride  # a block's strided rows
        constants.update(STRIDE=spec.stride, TILE_R=spec.tile_r, TILE_C=spec.tile_c, ROWS_PER_Q=rows_per_q,
                         COLS_PER_K=cols_per_k, QB=spec.tile_r // rows_per_q, KB=spec.tile_c // cols_per_k)  # fmt: skip
        grid = "cdiv(NQ * ROWS_PER_Q, TILE_R)"
    lines = module_head(spec, __name__, summary, constants)
    lines += jit_def(spec.name, *_args(spec))
    written = "block logits" if spec.kind == "pooled" else "probabilities"
    lines += ['    """Q [B, H, seq_q, D], K [B, H // group, seq_k, D], Out [B, H, NQ, NK] fp32 zeros (NQ = cdiv(seq_q, '
              f'BLOCK_M), NK = cdiv(seq_k, BLOCK_N)) to receive the {written}.',
              f'    Grid: ({grid}, B * H)."""']  # fmt: skip
    lines += _prologue(spec)
    lines += _pooled(spec) if spec.kind == "pooled" else _antidiagonal(spec)
    return "\n".join(lines) + "\n"


def load(spec):
    """The kernel of ``spec``, rendered into the kernel cache and imported on first use."""
    return load_generated(spec.name, lambda: render(spec))


def _prologue(spec) -> list[str]:
    lines = [
        "    pid_t = tl.program_id(0)",
        "    pid_bh = tl.program_id(1)",
        "    off_b = (pid_bh // num_heads).to(tl.int64)",
        "    off_h = (pid_bh % num_heads).to(tl.int64)",
        "    off_hkv = off_h // group  # GQA: query head h reads key head h // group",
        "    q_base = Q + off_b * stride_qb + off_h * stride_qh",
        "    k_base = K + off_b * stride_kb + off_hkv * stride_kh",
        "    o_base = Out + off_b * stride_ob + off_h * stride_oh",
        "    nq = tl.cdiv(seq_q, BLOCK_M)",
        "    nk = tl.cdiv(seq_k, BLOCK_N)",
    ]
    first = "pid_t * TILE_Q" if spec.kind == "pooled" else "pid_t * QB"
    per = "TILE_Q" if spec.kind == "pooled" else "QB"
    if spec.causal:  # key blocks [0, hi) hold a key the tile's last query may see
        lines += [
            f"    tile_last = tl.minimum(({first} + {per}) * BLOCK_M, seq_q) - 1 + causal_offset",
            "    hi = tl.where(tile_last < 0, 0, tl.minimum(nk, tile_last // BLOCK_N + 1))",
        ]
    else:
        lines.append("    hi = nk")
    return lines


def _online(ind: str) -> list[str]:
    """The online softmax statistics of the base-2 scores ``s`` (rows of ``m_i``, ``l_i``)."""
    return [
        f"{ind}m_new = tl.maximum(m_i, tl.max(s, 1))",
        f"{ind}m_safe = tl.where(m_new == float('-inf'), 0.0, m_new)  # rows with nothing allowed yet",
        f"{ind}l_i = l_i * tl.exp2(m_i - m_safe) + tl.sum(tl.exp2(s - m_safe[:, None]), 1)",
        f"{ind}m_i = m_new",
    ]


DCHUNK = 32  # channels per chunk of the pooled moments and products (fp32 FMA dots hold K in registers)


def _chunks(spec: PooledSpec) -> int:
    return max(1, spec.block_d // DCHUNK)


def _moments(var: str, ptr: str, block: str, tile: str, chunks: int, ind: str) -> list[str]:
    """``{var}bar{c}`` and ``{var}sq{c}`` fp32 [tile, DC] per channel chunk ``c``: per block of ``{var}blk`` the
    mean of its real rows and the mean square of every ``{var.upper()}STEP``-th one (``ROWS`` rows per step;
    padded rows load zeros)."""
    step, seq, x = f"{var.upper()}STEP", f"seq_{var}", "q" if var == "q" else "k"
    row = "stride_qm" if var == "q" else "stride_kn"
    lines = [f"{ind}{var}{m}{c} = tl.zeros([{tile}, DC], tl.float32)" for c in range(chunks) for m in ("sum", "sq")]
    lines += [
        f"{ind}for r in range(0, {block}, ROWS):",
        f"{ind}    at = {var}blk[:, None] * {block} + r + tl.arange(0, ROWS)[None, :]  # [{tile}, ROWS] rows",
        f"{ind}    sampled = ((r + tl.arange(0, ROWS)) % {step} == 0)[None, :, None]",
    ]
    for c in range(chunks):
        lines += [
            f"{ind}    x = tl.load({ptr} + at.to(tl.int64)[:, :, None] * {row}",
            f"{ind}                + offs_c{c}[None, None, :] * stride_{x}d,",
            f"{ind}                mask=(at < {seq})[:, :, None] & (offs_c{c} < HEAD_DIM)[None, None, :],",
            f"{ind}                other=0.0).to(tl.float32)",
            f"{ind}    {var}sum{c} += tl.sum(x, 1)",
            f"{ind}    {var}sq{c} += tl.sum(tl.where(sampled, x * x, 0.0), 1)",
        ]
    lines += [
        f"{ind}{var}count = tl.maximum(tl.minimum({seq} - {var}blk * {block}, {block}), 1)",
        f"{ind}{var}inv = 1.0 / {var}count.to(tl.float32)[:, None]",
        f"{ind}{var}inv_sq = 1.0 / (({var}count + {step} - 1) // {step}).to(tl.float32)[:, None]",
    ]
    for c in range(chunks):
        lines += [f"{ind}{var}bar{c} = {var}sum{c} * {var}inv", f"{ind}{var}sq{c} = {var}sq{c} * {var}inv_sq"]
    return lines


def _pooled(spec: PooledSpec) -> list[str]:
    out_ptr = "o_base + qblk.to(tl.int64)[:, None] * stride_om + kblk[None, :] * stride_on"
    chunks = _chunks(spec)
    lines = [f"    offs_c{c} = {c * DCHUNK} + tl.arange(0, DC)  # channel chunk {c}" for c in range(chunks)]
    lines += ["    qblk = pid_t * TILE_Q + tl.arange(0, TILE_Q)  # [TILE_Q] query blocks"]
    lines += _moments("q", "q_base", "BLOCK_M", "TILE_Q", chunks, "    ")
    lines += [
        "    for t in range(0, tl.cdiv(hi, TILE_K)):",
        "        kblk = t * TILE_K + tl.arange(0, TILE_K)  # [TILE_K] key blocks",
        *_moments("k", "k_base", "BLOCK_N", "TILE_K", chunks, "        "),
        "        mean = tl.zeros([TILE_Q, TILE_K], tl.float32)",
        "        var = tl.zeros([TILE_Q, TILE_K], tl.float32)",
    ]
    for c in range(chunks):  # Σ over chunks of [TILE_Q, DC] x [DC, TILE_K] fp32 products
        lines += [
            f"        mean += tl.dot(qbar{c}, tl.trans(kbar{c}), input_precision='ieee')",
            f"        var += tl.dot(qsq{c}, tl.trans(ksq{c}), input_precision='ieee')",
            f"        var -= tl.dot(qbar{c} * qbar{c}, tl.trans(kbar{c} * kbar{c}), input_precision='ieee')",
        ]
    lines += [
        "        var = tl.maximum(var, 0.0) * (scale * scale * 0.5)  # σ²/2",
        "        s = mean * scale + var + tl.log(kcount.to(tl.float32))[None, :]",
        f"        tl.store({out_ptr}, s, mask=(qblk < nq)[:, None] & (kblk < nk)[None, :])",
    ]
    return lines


def _scores(spec: AntidiagonalSpec, ind: str) -> list[str]:
    """Base-2 scores ``s`` [TILE_R, TILE_C] of strided rows ``rr`` and columns ``cc``, hidden ones ``-inf``."""
    ieee = ", input_precision='ieee'" if spec.dtype == "float32" else ""
    keep = ["(cc * STRIDE < seq_k)[None, :]"]  # real keys (columns past seq_k are padding)
    if spec.causal:
        keep.append("((cc // COLS_PER_K * BLOCK_N)[None, :] <= last_q[:, None] + causal_offset)")
    return [
        f"{ind}cc = c0 + tl.arange(0, TILE_C)  # [TILE_C] strided key columns",
        f"{ind}acc = tl.zeros([TILE_R, TILE_C], tl.float32)",
        f"{ind}for t in range(0, STRIDE):  # Σ_t q[r·STRIDE + STRIDE-1-t] · k[c·STRIDE + t]",
        f"{ind}    qrow = rr * STRIDE + (STRIDE - 1 - t)",
        f"{ind}    qt = tl.load(q_base + qrow.to(tl.int64)[:, None] * stride_qm + offs_d[None, :] * stride_qd,",
        f"{ind}                 mask=(qrow < seq_q)[:, None] & d_ok[None, :], other=0.0)  # [TILE_R, BLOCK_D]",
        f"{ind}    krow = cc * STRIDE + t",
        f"{ind}    kt = tl.load(k_base + krow.to(tl.int64)[None, :] * stride_kn + offs_d[:, None] * stride_kd,",
        f"{ind}                 mask=(krow < seq_k)[None, :] & d_ok[:, None], other=0.0)  # [BLOCK_D, TILE_C]",
        f"{ind}    acc += tl.dot(qt, kt{ieee})",
        f"{ind}s = tl.where({' & '.join(keep)}, acc * qk_scale, float('-inf'))",
    ]


def _antidiagonal(spec: AntidiagonalSpec) -> list[str]:
    out_ptr = "o_base + qblk.to(tl.int64)[:, None] * stride_om + kblk[None, :] * stride_on"
    return [
        "    offs_d = tl.arange(0, BLOCK_D)",
        "    d_ok = offs_d < HEAD_DIM",
        "    rr = pid_t * TILE_R + tl.arange(0, TILE_R)  # [TILE_R] strided query rows",
        "    last_q = tl.minimum((rr // ROWS_PER_Q) * BLOCK_M + BLOCK_M - 1, seq_q - 1)",
        "    qk_scale = scale / STRIDE * LOG2E",
        "    m_i = tl.full([TILE_R], float('-inf'), tl.float32)",
        "    l_i = tl.zeros([TILE_R], tl.float32)",
        "    for c0 in range(0, hi * COLS_PER_K, TILE_C):",
        *_scores(spec, "        "),
        *_online("        "),
        "    m_safe = tl.where(m_i == float('-inf'), 0.0, m_i)",
        "    inv_l = tl.where(l_i > 0.0, 1.0 / tl.where(l_i > 0.0, l_i, 1.0), 0.0)  # rows with no key allowed: 0",
        "    qblk = pid_t * QB + tl.arange(0, QB)  # [QB] query blocks",
        "    for c0 in range(0, hi * COLS_PER_K, TILE_C):",
        *_scores(spec, "        "),
        "        p = tl.exp2(s - m_safe[:, None]) * inv_l[:, None]  # [TILE_R, TILE_C]",
        "        p = tl.sum(tl.reshape(p, [TILE_R, KB, COLS_PER_K]), 2)  # per key block",
        "        p = tl.sum(tl.reshape(p, [QB, ROWS_PER_Q, KB]), 1) / ROWS_PER_Q  # mean over a query block's rows",
        "        kblk = c0 // COLS_PER_K + tl.arange(0, KB)",
        f"        tl.store({out_ptr}, p, mask=(qblk < nq)[:, None] & (kblk < nk)[None, :])",
    ]
