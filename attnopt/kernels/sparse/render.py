r"""Generated block-sparse attention kernels: :class:`SparseKernelSpec`, its Triton source, and its disk cache.

Three kernels per mask descriptor and tile shape, FlashAttention-2 style (see
:mod:`attnopt.kernels.exact.render` for the online softmax in base 2 and its invariants):

* ``fwd``: one program per (query tile, batch x query head). It walks the query tile's *runs* of key
  tiles from the block map (:mod:`attnopt.masks.blockmap`): ``KIND_FULL`` runs take no element test,
  the others test each element with the mask's predicate (generated from the descriptor, the same
  code as :meth:`attnopt.masks.Mask.allows`) or, for masks given as Python callables, with the
  tile's stored bits. Writes ``Out`` and the natural-log ``Lse`` (``-inf`` and zeros for rows that
  see no key).
* ``dq``: one program per (query tile, batch x query head); the same runs; with ``P = exp2(s - lse2)``
  and ``Delta = rowsum(dO ⊙ O)``: ``dS = P ⊙ (dO Vᵀ - Delta)``, ``dQ = scale · dS K``.
* ``dkdv``: one program per (key tile, batch x key/value head); it walks the *transposed* block map
  (runs of query tiles per key tile) for each of the ``group`` query heads that share the key/value
  head (GQA: no atomics, no repeated k/v): ``dV = Σ Pᵀ dO``, ``dK = scale · Σ dSᵀ Q``.

Under a softcap the scores are ``cap · tanh(scale · q·k / cap)`` (``tanh x = 2·sigmoid(2x) - 1``) and
``dS`` is multiplied by ``1 - tanh²``. Key padding (``kv_valid``) and an extra dense mask (bool or
additive, read through its strides on the visited tiles only) are optional spec features.

Every spec field is a compile-time decision; the predicate's source text is part of the spec, so a
kernel's name and cache file follow from what it computes. This module imports neither torch nor triton.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from attnopt.codegen.cache import cache_root, load_generated
from attnopt.codegen.spec import DTYPES, GeneratedSpec, PaddedValueDim
from attnopt.codegen.triton_text import LN2, LOG2E, cast, module_head, tile_constants

KIND_FULL = 1
KIND_BITS = 2
DIRECTIONS = ("fwd", "dq", "dkdv")
EXTRAS = ("none", "bool", "additive")


@dataclass(frozen=True, kw_only=True)
class SparseKernelSpec(PaddedValueDim, GeneratedSpec):
    """The compile-time parameters of one generated sparse kernel.

    ``predicate``: Triton source of the element test over ``rows`` [BLOCK_M, 1], ``cols`` [1, BLOCK_N],
    ``off_h``, ``seq_q``, ``seq_k`` (and the ``Layout<i>`` arguments of BlockSparse masks); ``layouts``:
    the heads of each such layout; ``bits``: boundary tiles are stored bits instead; ``head_maps``: the
    block map has one row set per query head; ``mask``: the descriptor, for the header only.
    """

    FAMILY = "sparse"

    direction: str
    head_dim: int
    head_dim_v: int
    dtype: str
    block_m: int
    block_n: int
    predicate: str
    mask: str
    layouts: tuple = ()
    bits: bool = False
    head_maps: bool = False
    padding: bool = False
    extra: str = "none"
    softcap: bool = False
    num_warps: int = 4
    num_stages: int = 2

    def __post_init__(self):
        self._check_choices(direction=DIRECTIONS, dtype=DTYPES, extra=EXTRAS)
        self._check_bools("bits", "head_maps", "padding", "softcap")
        self._check_tiles()
        self._check_head_dims()
        self._check_launch()


# --- source ---------------------------------------------------------------------------------------------
def arg_names(spec: SparseKernelSpec) -> tuple[str, ...]:
    """The kernel's parameters in order (the launcher passes them by name)."""
    names = ["Q", "K", "V"]
    if spec.direction == "fwd":
        names += ["Out", "Lse"]
    else:
        names += ["DO", "Lse", "Delta"]
        names += ["DQ"] if spec.direction == "dq" else ["DK", "DV"]
    names += ["Runs", "NumRuns"]
    if spec.bits:
        names.append("Bits")
    if spec.padding:
        names.append("KvValid")
    if spec.extra != "none":
        names.append("Extra")
    names += [f"Layout{i}" for i in range(len(spec.layouts))]
    names += [f"stride_q{d}" for d in "bhmd"] + [f"stride_k{d}" for d in "bhnd"] + [f"stride_v{d}" for d in "bhnd"]
    names += [f"stride_o{d}" for d in "bhmd"]  # Out (fwd) or DO (bwd), same layout
    if spec.direction == "dq":
        names += [f"stride_dq{d}" for d in "bhmd"]
    if spec.direction == "dkdv":
        names += [f"stride_dk{d}" for d in "bhnd"] + [f"stride_dv{d}" for d in "bhnd"]
    if spec.padding:
        names.append("stride_kv_b")
    if spec.extra != "none":
        names += [f"stride_x{d}" for d in "bhmn"]
    for i in range(len(spec.layouts)):
        names += [f"layout{i}_stride_h", f"layout{i}_stride_m"]
    names += ["num_heads", "group", "seq_q", "seq_k", "n_rows", "max_runs", "scale", "softcap"]
    return tuple(names)


def render(spec: SparseKernelSpec) -> str:
    summary = [f"Block-sparse attention, {spec.direction}; mask {spec.mask}; dtype {spec.dtype}, "
               f"tiles {spec.block_m}x{spec.block_n}."]  # fmt: skip
    lines = module_head(spec, __name__, summary, {**tile_constants(spec), "LOG2E": LOG2E, "LN2": LN2}) + [
        "@triton.jit",
        f"def {spec.name}(",
    ]
    lines += [f"    {n}," for n in arg_names(spec)]
    lines += ["):"]
    body = {"fwd": _fwd, "dq": _dq, "dkdv": _dkdv}[spec.direction](spec)
    return "\n".join(lines + body) + "\n"


def _ieee(spec) -> str:
    return ', input_precision="ieee"' if spec.dtype == "float32" else ""


def _d_mask(spec, expr: str, v: bool = False) -> str:
    padded = (spec.head_dim_v != spec.block_dv) if v else (spec.head_dim != spec.block_d)
    return expr if padded else ""


def _and(*terms) -> str:
    return " & ".join(f"({t})" for t in terms if t)


def _load(ptr: str, mask: str, other: str = "0.0") -> str:
    return f"tl.load({ptr}, mask={mask}, other={other})" if mask else f"tl.load({ptr})"


def _scores(spec, dot: str, ind: str) -> list[str]:
    """``s`` (base-2 scores) from ``dot`` = q·k, and under a softcap ``th`` = tanh(scale q·k / cap)."""
    if spec.softcap:
        return [
            f"{ind}th = 2.0 * tl.sigmoid(2.0 * ({dot}) * (scale / softcap)) - 1.0  # tanh(scale·qk / cap)",
            f"{ind}s = th * (softcap * LOG2E)",
        ]
    return [f"{ind}s = ({dot}) * (scale * LOG2E)"]


def _keep(spec, full: bool, ind: str, transposed: bool = False) -> list[str]:
    """Lines computing ``keep`` [BLOCK_M, BLOCK_N] (``transposed``: [BLOCK_N, BLOCK_M], with ``rows2`` [1, BLOCK_M]
    and ``cols2`` [BLOCK_N, 1]) (or nothing when every element is kept) and applying it.

    The predicate's last line is the element test; lines before it compute the intermediates it names."""
    r, c = ("[None, :]", "[:, None]") if transposed else ("[:, None]", "[None, :]")
    extra = f"Extra + x_base + row0 * stride_xm + col0 * stride_xn + offs_mm{r} * stride_xm + offs_n{c} * stride_xn"
    terms, lines = [], []
    if not full:
        terms.append("cols2 < seq_k")
        if spec.bits:
            terms.append("tl.load(Bits + (kind - 2) * (BLOCK_M * BLOCK_N) + tile_off) != 0")
        else:
            *named, test = spec.predicate.split("\n")
            lines += [f"{ind}{line}" for line in named]
            terms.append(test)
    if spec.padding:
        terms.append("tl.load(KvValid + off_b * stride_kv_b + cols2, mask=cols2 < seq_k, other=0) != 0")
    if spec.extra == "additive":
        lines.append(f"{ind}s += tl.load({extra}, mask=(rows2 < seq_q) & (cols2 < seq_k), other=0.0)"
                     ".to(tl.float32) * LOG2E")  # fmt: skip
    elif spec.extra == "bool":
        terms.append(f"tl.load({extra}, mask=(rows2 < seq_q) & (cols2 < seq_k), other=0) != 0")
    if terms:
        lines += [f"{ind}keep = {_and(*terms)}", f'{ind}s = tl.where(keep, s, float("-inf"))']
    return lines


def _prologue(spec) -> list[str]:
    """Program ids, head indices and base pointers (query-tile programs)."""
    lines = [
        "    pid_m = tl.program_id(0)",
        "    pid_bh = tl.program_id(1)",
        "    off_b = (pid_bh // num_heads).to(tl.int64)",
        "    off_h = (pid_bh % num_heads).to(tl.int64)",
        "    off_hkv = off_h // group  # GQA: query head h reads key/value head h // group",
        "    offs_mm = tl.arange(0, BLOCK_M)",
        "    # Tile starts enter addresses as int64 (row0 * stride may pass 2**31 on long or strided inputs);",
        "    # offsets within a tile (offs_mm * stride) stay int32.",
        "    row0 = tl.cast(pid_m * BLOCK_M, tl.int64)",
        "    offs_m = pid_m * BLOCK_M + offs_mm  # [BLOCK_M] query rows",
        "    offs_n = tl.arange(0, BLOCK_N)",
        "    offs_d = tl.arange(0, BLOCK_D)",
        "    offs_dv = tl.arange(0, BLOCK_DV)",
        "    rows2 = offs_m[:, None]  # [BLOCK_M, 1]",
        "    row_ok = offs_m < seq_q",
        "    tile_off = tl.arange(0, BLOCK_M)[:, None] * BLOCK_N + offs_n[None, :]  # [BLOCK_M, BLOCK_N] within a tile",
        "    k_base = K + off_b * stride_kb + off_hkv * stride_kh",
        "    v_base = V + off_b * stride_vb + off_hkv * stride_vh",
        f"    run_row = {'off_h * n_rows + pid_m' if spec.head_maps else 'pid_m'}  # this tile's row of the block map",
        "    n_runs = tl.load(NumRuns + run_row)",
        "    run_ptr = Runs + run_row * max_runs * 3",
    ]
    if spec.extra != "none":
        lines.append("    x_base = off_b * stride_xb + off_h * stride_xh")
    q_mask = _and("row_ok[:, None]", _d_mask(spec, "offs_d[None, :] < HEAD_DIM"))
    lines += [
        "    q = tl.load(Q + off_b * stride_qb + off_h * stride_qh + row0 * stride_qm + offs_mm[:, None] * stride_qm"
        f" + offs_d[None, :] * stride_qd, mask={q_mask}, other=0.0)  # [BLOCK_M, BLOCK_D]",
    ]
    return lines


def _k_tile(spec, full: bool, ind: str) -> list[str]:
    """Loads the key tile at ``cols`` as ``k`` ([BLOCK_D, BLOCK_N], Kᵀ) and ``v`` ([BLOCK_N, BLOCK_DV])."""
    kmask = _and("" if full else "cols[None, :] < seq_k", _d_mask(spec, "offs_d[:, None] < HEAD_DIM"))
    vmask = _and("" if full else "cols[:, None] < seq_k", _d_mask(spec, "offs_dv[None, :] < HEAD_DIM_V", v=True))
    return [
        f"{ind}k = {_load('k_base + col0 * stride_kn + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd', kmask)}",
        f"{ind}v = {_load('v_base + col0 * stride_vn + offs_n[:, None] * stride_vn + offs_dv[None, :] * stride_vd', vmask)}",
    ]


def _runs_loop(spec, body) -> list[str]:
    """``for`` each run, a FULL loop or a tested loop over its tiles; ``body(full, ind)`` gives the tile's lines."""
    lines = [
        "    for r in range(0, n_runs):",
        "        first = tl.load(run_ptr + r * 3)",
        "        end = tl.load(run_ptr + r * 3 + 1)",
        "        kind = tl.load(run_ptr + r * 3 + 2)",
        f"        if kind == {KIND_FULL}:",
        "            for t in range(first, end):",
    ]
    lines += body(True, " " * 16)
    lines += ["        else:", "            for t in range(first, end):"]
    lines += body(False, " " * 16)
    return lines


def _fwd(spec) -> list[str]:
    lines = _prologue(spec) + [
        '    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running max of the base-2 scores',
        "    l_i = tl.zeros([BLOCK_M], tl.float32)  # running sum of exp2(s - m_i)",
        "    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)",
    ]

    def body(full, ind):
        out = [f"{ind}cols = t * BLOCK_N + offs_n  # [BLOCK_N] key rows", f"{ind}cols2 = cols[None, :]",
               f"{ind}col0 = tl.cast(t * BLOCK_N, tl.int64)"]
        out += _k_tile(spec, full, ind)
        out += _scores(spec, f"tl.dot(q, k{_ieee(spec)})", ind)
        out += _keep(spec, full, ind)
        out += [
            f"{ind}m_new = tl.maximum(m_i, tl.max(s, 1))",
            f'{ind}m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # no -inf - -inf',
            f"{ind}alpha = tl.exp2(m_i - m_safe)",
            f"{ind}p = tl.exp2(s - m_safe[:, None])",
            f"{ind}l_i = l_i * alpha + tl.sum(p, 1)",
            f"{ind}acc = acc * alpha[:, None] + tl.dot({cast(spec, 'p')}, v{_ieee(spec)})",
            f"{ind}m_i = m_new",
        ]
        return out

    lines += _runs_loop(spec, body)
    out_mask = _and("row_ok[:, None]", _d_mask(spec, "offs_dv[None, :] < HEAD_DIM_V", v=True))
    lines += [
        "    # Rows that saw no key have l_i == 0 and acc == 0: zeros and lse = -inf.",
        "    l_safe = tl.where(l_i == 0.0, 1.0, l_i)",
        '    lse = tl.where(l_i == 0.0, float("-inf"), (m_i + tl.log2(l_safe)) * LN2)',
        "    tl.store(Out + off_b * stride_ob + off_h * stride_oh + row0 * stride_om + offs_mm[:, None] * stride_om"
        f" + offs_dv[None, :] * stride_od, {cast(spec, '(acc / l_safe[:, None])')}, mask={out_mask})",
        "    tl.store(Lse + pid_bh.to(tl.int64) * seq_q + offs_m, lse, mask=row_ok)",
    ]
    return lines


def _p_and_ds(spec, ind: str, transposed: bool = False) -> list[str]:
    """From ``s`` (tested), ``lse2`` [BLOCK_M], ``do``, ``v`` (Vᵀ loaded [BLOCK_DV, BLOCK_N] as ``vt``) and
    ``delta``: ``p``, ``ds``. ``transposed``: ``s`` is Sᵀ [BLOCK_N, BLOCK_M] and ``v`` is loaded
    [BLOCK_N, BLOCK_DV]; ``p``, ``ds`` come out transposed."""
    if transposed:
        lines = [
            f"{ind}p = tl.exp2(s - lse2[None, :])  # [BLOCK_N, BLOCK_M] Pᵀ",
            f"{ind}dp = tl.dot(v, tl.trans(do){_ieee(spec)})  # [BLOCK_N, BLOCK_M] V dOᵀ",
            f"{ind}ds = p * (dp - delta[None, :])  # dSᵀ",
        ]
    else:
        lines = [
            f"{ind}p = tl.exp2(s - lse2[:, None])  # [BLOCK_M, BLOCK_N] probabilities",
            f"{ind}dp = tl.dot(do, vt{_ieee(spec)})  # [BLOCK_M, BLOCK_N] dO Vᵀ",
            f"{ind}ds = p * (dp - delta[:, None])",
        ]
    if spec.softcap:
        lines.append(f"{ind}ds = ds * (1.0 - th * th)")
    return lines


def _row_stats(ind: str, rows: str) -> list[str]:
    return [
        f"{ind}lse_nat = tl.load(Lse + pid_bh_q * seq_q + {rows}, mask={rows} < seq_q, other=0.0)",
        f'{ind}lse2 = tl.where(lse_nat == float("-inf"), 0.0, lse_nat * LOG2E)  # blind rows: p = exp2(-inf) = 0',
        f"{ind}delta = tl.load(Delta + pid_bh_q * seq_q + {rows}, mask={rows} < seq_q, other=0.0)",
    ]


def _dq(spec) -> list[str]:
    do_mask = _and("row_ok[:, None]", _d_mask(spec, "offs_dv[None, :] < HEAD_DIM_V", v=True))
    lines = _prologue(spec) + [
        "    pid_bh_q = pid_bh.to(tl.int64)",
        "    do = tl.load(DO + off_b * stride_ob + off_h * stride_oh + row0 * stride_om + offs_mm[:, None] * stride_om"
        f" + offs_dv[None, :] * stride_od, mask={do_mask}, other=0.0)  # [BLOCK_M, BLOCK_DV]",
    ]
    lines += _row_stats("    ", "offs_m")
    lines += ["    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)"]

    def body(full, ind):
        out = [f"{ind}cols = t * BLOCK_N + offs_n", f"{ind}cols2 = cols[None, :]",
               f"{ind}col0 = tl.cast(t * BLOCK_N, tl.int64)"]
        kmask = _and("" if full else "cols[None, :] < seq_k", _d_mask(spec, "offs_d[:, None] < HEAD_DIM"))
        vmask = _and("" if full else "cols[None, :] < seq_k", _d_mask(spec, "offs_dv[:, None] < HEAD_DIM_V", v=True))
        out += [
            f"{ind}k = {_load('k_base + col0 * stride_kn + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd', kmask)}  # Kᵀ",
            f"{ind}vt = {_load('v_base + col0 * stride_vn + offs_n[None, :] * stride_vn + offs_dv[:, None] * stride_vd', vmask)}  # Vᵀ",
        ]
        out += _scores(spec, f"tl.dot(q, k{_ieee(spec)})", ind)
        out += _keep(spec, full, ind)
        out += _p_and_ds(spec, ind)
        out += [f"{ind}dq += tl.dot({cast(spec, 'ds')}, tl.trans({cast(spec, 'k')}){_ieee(spec)})"]
        return out

    lines += _runs_loop(spec, body)
    dq_mask = _and("row_ok[:, None]", _d_mask(spec, "offs_d[None, :] < HEAD_DIM"))
    lines += [
        "    tl.store(DQ + off_b * stride_dqb + off_h * stride_dqh + row0 * stride_dqm + offs_mm[:, None] * stride_dqm"
        f" + offs_d[None, :] * stride_dqd, {cast(spec, '(dq * scale)')}, mask={dq_mask})",
    ]
    return lines


def _dkdv(spec) -> list[str]:
    lines = [
        "    pid_n = tl.program_id(0)",
        "    pid_bh = tl.program_id(1)  # batch x key/value head",
        "    num_kv_heads = num_heads // group",
        "    off_b = (pid_bh // num_kv_heads).to(tl.int64)",
        "    off_hkv = (pid_bh % num_kv_heads).to(tl.int64)",
        "    offs_n = tl.arange(0, BLOCK_N)",
        "    col0 = tl.cast(pid_n * BLOCK_N, tl.int64)  # int64 tile start: see _prologue",
        "    cols = pid_n * BLOCK_N + offs_n  # [BLOCK_N] this program's keys",
        "    # Tiles run transposed (keys down the rows, [BLOCK_N, BLOCK_M]): Pᵀ and dSᵀ then feed the tensor cores",
        "    # as they are, where a tl.trans of a register tile went through shared memory and spilled.",
        "    cols2 = cols[:, None]  # [BLOCK_N, 1]",
        "    col_ok = cols < seq_k",
        "    offs_mm = tl.arange(0, BLOCK_M)",
        "    offs_d = tl.arange(0, BLOCK_D)",
        "    offs_dv = tl.arange(0, BLOCK_DV)",
        "    tile_off = offs_mm[None, :] * BLOCK_N + offs_n[:, None]  # [BLOCK_N, BLOCK_M] within a stored tile",
    ]
    kmask = _and("col_ok[:, None]", _d_mask(spec, "offs_d[None, :] < HEAD_DIM"))
    vmask = _and("col_ok[:, None]", _d_mask(spec, "offs_dv[None, :] < HEAD_DIM_V", v=True))
    lines += [
        f"    k = tl.load(K + off_b * stride_kb + off_hkv * stride_kh + col0 * stride_kn + offs_n[:, None] * stride_kn"
        f" + offs_d[None, :] * stride_kd, mask={kmask}, other=0.0)  # [BLOCK_N, BLOCK_D]",
        f"    v = tl.load(V + off_b * stride_vb + off_hkv * stride_vh + col0 * stride_vn + offs_n[:, None] * stride_vn"
        f" + offs_dv[None, :] * stride_vd, mask={vmask}, other=0.0)  # [BLOCK_N, BLOCK_DV]",
        "    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)",
        "    dv = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)",
        "    for g in range(0, group):  # the query heads of this key/value head",
        "        off_h = off_hkv * group + g",
        "        pid_bh_q = off_b * num_heads + off_h",
        f"        run_row = {'off_h * n_rows + pid_n' if spec.head_maps else 'pid_n'}  # this key tile's row of the map",
        "        n_runs = tl.load(NumRuns + run_row)",
        "        run_ptr = Runs + run_row * max_runs * 3",
    ]
    if spec.extra != "none":
        lines.append("        x_base = off_b * stride_xb + off_h * stride_xh")
    lines += [
        "        for r in range(0, n_runs):",
        "            first = tl.load(run_ptr + r * 3)",
        "            end = tl.load(run_ptr + r * 3 + 1)",
        "            kind = tl.load(run_ptr + r * 3 + 2)",
        f"            if kind == {KIND_FULL}:",
        "                for qt in range(first, end):",
    ]
    lines += _dkdv_body(spec, True, " " * 20)
    lines += ["            else:", "                for qt in range(first, end):"]
    lines += _dkdv_body(spec, False, " " * 20)
    dk_mask = _and("col_ok[:, None]", _d_mask(spec, "offs_d[None, :] < HEAD_DIM"))
    dv_mask = _and("col_ok[:, None]", _d_mask(spec, "offs_dv[None, :] < HEAD_DIM_V", v=True))
    lines += [
        "    tl.store(DK + off_b * stride_dkb + off_hkv * stride_dkh + col0 * stride_dkn + offs_n[:, None] * stride_dkn"
        f" + offs_d[None, :] * stride_dkd, {cast(spec, '(dk * scale)')}, mask={dk_mask})",
        "    tl.store(DV + off_b * stride_dvb + off_hkv * stride_dvh + col0 * stride_dvn + offs_n[:, None] * stride_dvn"
        f" + offs_dv[None, :] * stride_dvd, {cast(spec, 'dv')}, mask={dv_mask})",
    ]
    return lines


def _dkdv_body(spec, full: bool, ind: str) -> list[str]:
    q_mask = _and("row_ok[:, None]", _d_mask(spec, "offs_d[None, :] < HEAD_DIM"))
    do_mask = _and("row_ok[:, None]", _d_mask(spec, "offs_dv[None, :] < HEAD_DIM_V", v=True))
    lines = [
        f"{ind}row0 = tl.cast(qt * BLOCK_M, tl.int64)",
        f"{ind}offs_m = qt * BLOCK_M + offs_mm  # [BLOCK_M] query rows",
        f"{ind}rows2 = offs_m[None, :]  # [1, BLOCK_M]",
        f"{ind}row_ok = offs_m < seq_q",
        f"{ind}q = tl.load(Q + off_b * stride_qb + off_h * stride_qh + row0 * stride_qm + offs_mm[:, None] * stride_qm"
        f" + offs_d[None, :] * stride_qd, mask={q_mask}, other=0.0)",
        f"{ind}do = tl.load(DO + off_b * stride_ob + off_h * stride_oh + row0 * stride_om + offs_mm[:, None] * stride_om"
        f" + offs_dv[None, :] * stride_od, mask={do_mask}, other=0.0)",
    ]
    lines += _row_stats(ind, "offs_m")
    lines += _scores(spec, f"tl.dot(k, tl.trans(q){_ieee(spec)})", ind)  # Sᵀ [BLOCK_N, BLOCK_M]
    lines += _keep(spec, full, ind, transposed=True)
    lines += _p_and_ds(spec, ind, transposed=True)
    lines += [
        f"{ind}dv += tl.dot({cast(spec, 'p')}, {cast(spec, 'do')}{_ieee(spec)})",
        f"{ind}dk += tl.dot({cast(spec, 'ds')}, {cast(spec, 'q')}{_ieee(spec)})",
    ]
    return lines


# --- cache ----------------------------------------------------------------------------------------------
def kernel_path(spec: SparseKernelSpec) -> Path:
    return cache_root() / "kernels" / f"{spec.name}.py"


def load_kernel(spec: SparseKernelSpec):
    """The ``@triton.jit`` kernel of ``spec``, rendered into the attnopt kernel cache and imported on first use."""
    return load_generated(spec.name, lambda: render(spec))
