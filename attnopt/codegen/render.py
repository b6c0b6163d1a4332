r"""Renders the Triton source of an exact flash-attention forward kernel specialized to a :class:`KernelSpec`.

The generated kernel computes, for one query tile of ``BLOCK_M`` rows of one (batch, head)::

    O = softmax(scale * Q Kᵀ + mask) V        lse = log Σ_j exp(scale * q·k_j + mask_j)

without materializing the ``[Sq, Sk]`` score matrix (FlashAttention-2): key/value tiles of
``BLOCK_N`` rows stream through while each row keeps a running maximum ``m``, a running
denominator ``l`` and an unnormalized output ``acc``.

Online softmax, in base 2. Write ``s_j = log2(e) * (scale * q·k_j + mask_j)`` so that
``exp(x) = exp2(log2(e) * x)``; ``log2(e)`` is folded into ``qk_scale = scale * log2(e)`` and into
the additive mask. After the tiles ``1..t`` the invariants are::

    m_t   = max_{j <= t} s_j
    l_t   = Σ_{j <= t} exp2(s_j - m_t)
    acc_t = Σ_{j <= t} exp2(s_j - m_t) v_j

A new tile with scores ``s`` gives ``m_{t+1} = max(m_t, max_j s_j)``; rescaling the old terms by
``alpha = exp2(m_t - m_{t+1})`` restores the invariants::

    p       = exp2(s - m_{t+1})
    l_{t+1} = alpha * l_t + Σ_j p_j
    acc_{t+1} = alpha * acc_t + p V_tile

At the end ``O = acc / l`` (the ``exp2(-m)`` factors cancel) and
``lse = ln 2 * log2(Σ_j exp2(s_j)) = ln 2 * (m + log2 l)``.

Masked scores are ``-inf``. While every score seen by a row so far is masked, ``m = -inf`` and
``m_t - m_{t+1}`` or ``s - m_{t+1}`` would be ``-inf - (-inf) = NaN``; the kernel subtracts a
*safe* maximum instead (``0`` where the maximum is ``-inf``), which is exact: every term it
touches is ``exp2(-inf) = 0`` either way. A row with no visible key ends with ``l = 0`` and
``acc = 0``, and stores ``O = 0`` and ``lse = -inf``.

Causal masks (``j <= i + offset``, offset 0 top-left, ``Sk - Sq`` bottom-right) split the key
range of a query tile into three parts: tiles every row sees entirely (no per-element test),
boundary tiles (element test on the diagonal and on ``Sk``), and tiles wholly above the diagonal
(never loaded). Without causality the boundary is the last, partial key tile.

Every spec field is a compile-time decision in the text: the causal and mask code only appear
when specialized, and the head-dim masks only when the head dim is not a power of two.
"""

from __future__ import annotations

from attnopt.codegen.spec import CAUSAL_BOTTOM_RIGHT, CAUSAL_NONE, CAUSAL_TOP_LEFT, KernelSpec

_CAUSAL_NAMES = {CAUSAL_NONE: "none", CAUSAL_TOP_LEFT: "top-left", CAUSAL_BOTTOM_RIGHT: "bottom-right"}
_TL_DTYPES = {"float16": "tl.float16", "bfloat16": "tl.bfloat16", "float32": "tl.float32"}

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


def kernel_arg_names(spec: KernelSpec) -> tuple[str, ...]:
    """The generated kernel's parameters in order (the launcher passes them by name)."""
    names = ["Q", "K", "V"]
    if spec.mask != "none":
        names.append("Mask")
    names += ["Out", "Lse"]
    names += [f"stride_q{d}" for d in "bhmd"] + [f"stride_k{d}" for d in "bhnd"] + [f"stride_v{d}" for d in "bhnd"]
    if spec.mask != "none":
        names += [f"stride_mask_{d}" for d in "bhmn"]
    names += [f"stride_o{d}" for d in "bhmd"]
    names += ["num_heads", "group", "seq_q", "seq_k", "qk_scale"]
    return tuple(names)


def render(spec: KernelSpec) -> str:
    """The source of a Python module defining the ``@triton.jit`` kernel ``spec.name``."""
    lines = _header(spec) + _constants(spec) + _signature(spec) + _prologue(spec)
    lines += _key_range(spec)
    lines += _loop(spec, boundary=False)
    lines += _loop(spec, boundary=True)
    lines += _epilogue(spec)
    return "\n".join(lines) + "\n"


def _padded(dim: int, block: int) -> bool:
    return dim != block


def _header(spec: KernelSpec) -> list[str]:
    d_note = f" (padded to {spec.block_d})" if _padded(spec.head_dim, spec.block_d) else ""
    dv_note = f" (padded to {spec.block_dv})" if _padded(spec.head_dim_v, spec.block_dv) else ""
    return [
        "# attnopt generated kernel: do not edit, it is rewritten from its spec by attnopt.codegen.render.",
        f"# spec: {spec.to_json()}",
        "#",
        "# Exact attention forward, FlashAttention-2 online softmax; one program per (query tile, batch * head).",
        f"# dtype {spec.dtype}, causal {_CAUSAL_NAMES[spec.causal]}, mask {spec.mask},",
        f"# head_dim {spec.head_dim}{d_note}, head_dim_v {spec.head_dim_v}{dv_note},",
        f"# tiles {spec.block_m}x{spec.block_n}, num_warps {spec.num_warps}, num_stages {spec.num_stages}.",
        "",
        "import triton",
        "import triton.language as tl",
        "",
    ]


def _constants(spec: KernelSpec) -> list[str]:
    return [
        f"BLOCK_M = tl.constexpr({spec.block_m})",
        f"BLOCK_N = tl.constexpr({spec.block_n})",
        f"HEAD_DIM = tl.constexpr({spec.head_dim})",
        f"BLOCK_D = tl.constexpr({spec.block_d})",
        f"HEAD_DIM_V = tl.constexpr({spec.head_dim_v})",
        f"BLOCK_DV = tl.constexpr({spec.block_dv})",
        f"LOG2E = tl.constexpr({LOG2E!r})",
        f"LN2 = tl.constexpr({LN2!r})",
        "",
        "",
    ]


def _signature(spec: KernelSpec) -> list[str]:
    names = kernel_arg_names(spec)
    pointers = [n for n in names if not n.startswith("stride_") and n[0].isupper()]
    strides = [n for n in names if n.startswith("stride_")]
    scalars = [n for n in names if n not in pointers and n not in strides]
    lines = ["@triton.jit", f"def {spec.name}(", "    " + ", ".join(pointers) + ","]
    for i in range(0, len(strides), 4):
        lines.append("    " + ", ".join(strides[i:i + 4]) + ",")
    lines += ["    " + ", ".join(scalars) + ",", "):"]
    lines += [
        '    """Q [B, H, seq_q, HEAD_DIM], K [B, H // group, seq_k, HEAD_DIM], V [B, H // group, seq_k, HEAD_DIM_V]',
        "    -> Out [B, H, seq_q, HEAD_DIM_V], Lse [B, H, seq_q] (contiguous, fp32, natural log).",
        "",
        "    Any strides; qk_scale = scale * log2(e). Grid: (cdiv(seq_q, BLOCK_M), B * H).",
    ]
    if spec.mask != "none":
        meaning = "True = attend (loaded as uint8)" if spec.mask == "bool" else "added to the scores"
        lines.append(f"    Mask is read as [B, H, seq_q, seq_k] through its strides (0 on broadcast dims); {meaning}.")
    lines += ['    """']
    return lines


def _prologue(spec: KernelSpec) -> list[str]:
    lines = [
        "    pid_m = tl.program_id(0)",
        "    pid_bh = tl.program_id(1)",
        "    off_b = (pid_bh // num_heads).to(tl.int64)",
        "    off_h = (pid_bh % num_heads).to(tl.int64)",
        "    off_hkv = off_h // group  # GQA: query head h reads key/value head h // group",
        "    start_m = pid_m * BLOCK_M",
        "",
        "    offs_m = start_m + tl.arange(0, BLOCK_M)  # [BLOCK_M] query rows",
        "    offs_n = tl.arange(0, BLOCK_N)  # [BLOCK_N] key rows within a tile",
        "    offs_d = tl.arange(0, BLOCK_D)  # [BLOCK_D]",
        "    offs_dv = tl.arange(0, BLOCK_DV)  # [BLOCK_DV]",
        "    row_ok = offs_m < seq_q  # [BLOCK_M]",
    ]
    if _padded(spec.head_dim, spec.block_d):
        lines.append("    d_ok = offs_d < HEAD_DIM  # [BLOCK_D] padded head dim")
    if _padded(spec.head_dim_v, spec.block_dv):
        lines.append("    dv_ok = offs_dv < HEAD_DIM_V  # [BLOCK_DV] padded value head dim")
    lines += [
        "",
        "    q_ptrs = (Q + off_b * stride_qb + off_h * stride_qh",
        "              + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd)  # [BLOCK_M, BLOCK_D]",
        "    k_ptrs = (K + off_b * stride_kb + off_hkv * stride_kh",
        "              + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd)  # [BLOCK_D, BLOCK_N], Kᵀ",
        "    v_ptrs = (V + off_b * stride_vb + off_hkv * stride_vh",
        "              + offs_n[:, None] * stride_vn + offs_dv[None, :] * stride_vd)  # [BLOCK_N, BLOCK_DV]",
    ]
    if spec.mask != "none":
        lines += [
            "    mask_ptrs = (Mask + off_b * stride_mask_b + off_h * stride_mask_h",
            "                 + offs_m[:, None] * stride_mask_m + offs_n[None, :] * stride_mask_n)  # [BLOCK_M, BLOCK_N]",
        ]
    lines += [
        f"    q = tl.load(q_ptrs, mask={_and('row_ok[:, None]', _d_ok(spec, 'd_ok[None, :]'))}, other=0.0)"
        "  # [BLOCK_M, BLOCK_D]",
        "",
        "    m_i = tl.full([BLOCK_M], float(\"-inf\"), tl.float32)  # [BLOCK_M] running max of the base-2 scores",
        "    l_i = tl.zeros([BLOCK_M], tl.float32)  # [BLOCK_M] running sum of exp2(s - m_i)",
        "    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)  # [BLOCK_M, BLOCK_DV] running unnormalized output",
        "",
    ]
    return lines


def _key_range(spec: KernelSpec) -> list[str]:
    """Bounds of the interior key tiles ``[0, full_end)`` and the boundary tiles ``[full_end, end)``."""
    if spec.causal == CAUSAL_NONE:
        return [
            "    # Key tiles [0, full_end) lie inside seq_k; [full_end, seq_k) is the partial last tile.",
            "    full_end = seq_k // BLOCK_N * BLOCK_N",
            "    end = seq_k",
        ]
    if spec.causal == CAUSAL_TOP_LEFT:
        lines = ["    # Causal, top-left: query i sees keys j <= i."]
        first_diag, last_diag = "start_m + 1", "tl.minimum(start_m + BLOCK_M, seq_q)"
    else:
        lines = [
            "    # Causal, bottom-right: query i sees keys j <= i + causal_offset.",
            "    causal_offset = seq_k - seq_q",
        ]
        first_diag = "start_m + causal_offset + 1"
        last_diag = "tl.minimum(start_m + BLOCK_M, seq_q) + causal_offset"
    return lines + [
        "    # Key tiles [0, full_end) are seen whole by every row of this query tile (no element test);",
        "    # [full_end, end) cross the diagonal or seq_k; tiles from end on lie above the diagonal and are skipped.",
        f"    full_end = tl.minimum(seq_k // BLOCK_N * BLOCK_N, tl.maximum({first_diag}, 0) // BLOCK_N * BLOCK_N)",
        f"    end = tl.minimum(seq_k, tl.maximum({last_diag}, 0))",
    ]


def _loop(spec: KernelSpec, boundary: bool) -> list[str]:
    """One pass of the online softmax over key tiles; ``boundary`` adds the per-element key tests."""
    ieee = ', input_precision="ieee"' if spec.dtype == "float32" else ""
    col_ok = "col_ok[None, :]" if boundary else ""
    k_mask = _and(_d_ok(spec, "d_ok[:, None]"), col_ok)
    v_mask = _and("col_ok[:, None]" if boundary else "", _d_ok(spec, "dv_ok[None, :]", v=True))
    lines = [""]
    if boundary:
        lines += [
            "    for start_n in range(full_end, end, BLOCK_N):  # boundary key tiles",
            "        cols = start_n + offs_n  # [BLOCK_N] key rows",
            "        col_ok = cols < seq_k  # [BLOCK_N]",
        ]
    else:
        lines.append("    for _ in range(0, full_end, BLOCK_N):  # interior key tiles")
    lines += [
        f"        k = tl.load(k_ptrs{_mask_kw(k_mask)})  # [BLOCK_D, BLOCK_N]",
        f"        s = tl.dot(q, k{ieee}) * qk_scale  # [BLOCK_M, BLOCK_N] base-2 scores",
    ]
    user_mask_ok = _and("row_ok[:, None]", col_ok)
    if spec.mask == "additive":
        lines += [
            f"        bias = tl.load(mask_ptrs, mask={user_mask_ok}, other=0.0)"
            "  # [BLOCK_M, BLOCK_N]",
            "        s += bias.to(tl.float32) * LOG2E",
        ]
    keep_terms = []
    if boundary:
        keep_terms.append("col_ok[None, :]")
        if spec.causal == CAUSAL_TOP_LEFT:
            keep_terms.append("cols[None, :] <= offs_m[:, None]")
        elif spec.causal == CAUSAL_BOTTOM_RIGHT:
            keep_terms.append("cols[None, :] <= offs_m[:, None] + causal_offset")
    if spec.mask == "bool":
        lines.append(
            f"        attend = tl.load(mask_ptrs, mask={user_mask_ok}, other=0)"
            "  # [BLOCK_M, BLOCK_N]"
        )
        keep_terms.append("attend != 0")
    if keep_terms:
        keep = keep_terms[0] if len(keep_terms) == 1 else " & ".join(_paren(t) for t in keep_terms)
        lines += [
            f"        keep = {keep}  # [BLOCK_M, BLOCK_N]",
            '        s = tl.where(keep, s, float("-inf"))',
        ]
    p_cast = "p" if spec.dtype == "float32" else f"p.to({_TL_DTYPES[spec.dtype]})"
    lines += [
        "        m_new = tl.maximum(m_i, tl.max(s, 1))  # [BLOCK_M]",
        '        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # [BLOCK_M] no -inf - -inf',
        "        alpha = tl.exp2(m_i - m_safe)  # [BLOCK_M] rescales the previous tiles",
        "        p = tl.exp2(s - m_safe[:, None])  # [BLOCK_M, BLOCK_N]",
        "        l_i = l_i * alpha + tl.sum(p, 1)",
        f"        v = tl.load(v_ptrs{_mask_kw(v_mask)})  # [BLOCK_N, BLOCK_DV]",
        f"        acc = acc * alpha[:, None] + tl.dot({p_cast}, v{ieee})  # [BLOCK_M, BLOCK_DV]",
        "        m_i = m_new",
        "        k_ptrs += BLOCK_N * stride_kn",
        "        v_ptrs += BLOCK_N * stride_vn",
    ]
    if spec.mask != "none":
        lines.append("        mask_ptrs += BLOCK_N * stride_mask_n")
    return lines


def _epilogue(spec: KernelSpec) -> list[str]:
    out_mask = _and("row_ok[:, None]", _d_ok(spec, "dv_ok[None, :]", v=True))
    return [
        "",
        "    # Rows that saw no key have l_i == 0 and acc == 0: they store zeros and lse = -inf.",
        "    l_safe = tl.where(l_i == 0.0, 1.0, l_i)  # [BLOCK_M]",
        "    out = acc / l_safe[:, None]  # [BLOCK_M, BLOCK_DV]",
        '    lse = tl.where(l_i == 0.0, float("-inf"), (m_i + tl.log2(l_safe)) * LN2)  # [BLOCK_M] natural log',
        "    out_ptrs = (Out + off_b * stride_ob + off_h * stride_oh",
        "                + offs_m[:, None] * stride_om + offs_dv[None, :] * stride_od)  # [BLOCK_M, BLOCK_DV]",
        f"    tl.store(out_ptrs, out.to({_TL_DTYPES[spec.dtype]}), mask={out_mask})",
        "    tl.store(Lse + pid_bh.to(tl.int64) * seq_q + offs_m, lse, mask=row_ok)",
    ]


def _d_ok(spec: KernelSpec, expr: str, v: bool = False) -> str:
    """``expr`` (a head-dim mask) when that head dim is padded, else nothing."""
    dim, block = (spec.head_dim_v, spec.block_dv) if v else (spec.head_dim, spec.block_d)
    return expr if _padded(dim, block) else ""


def _and(*terms: str) -> str:
    return " & ".join(t for t in terms if t)


def _paren(term: str) -> str:
    """``term`` parenthesized when it is a comparison (``&`` binds tighter than ``<=`` and ``!=``)."""
    return f"({term})" if any(op in term for op in ("<=", "!=")) else term


def _mask_kw(mask: str) -> str:
    return f", mask={mask}, other=0.0" if mask else ""
