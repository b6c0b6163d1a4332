r"""The exact attention backward: three kernels, no atomics (FlashAttention-2's split).

With ``S`` the scores (after softcap, mask and bias), ``P = exp(S - lse)`` the forward's
probabilities, ``keep`` the dropout mask and ``P̃ = P ∘ keep / (1 - p)`` (so ``O = P̃ V``)::

    dV = P̃ᵀ dO
    dP̃ = dO Vᵀ,   dP = dP̃ ∘ keep / (1 - p)
    dS = P ∘ (dP - delta),   delta_i = Σ_j P_ij dP_ij = Σ_j P̃_ij dP̃_ij = rowsum(dO ∘ O)_i
    dS' = dS ∘ (1 - t²)  with a softcap (t = tanh(scale · QKᵀ / cap)), dS' = dS without
    dQ = scale · dS' K,   dK = scale · dS'ᵀ Q

``dS`` is also the gradient of any additive term of the scores (mask, bias tensor, relative position
table entries), which ``bwd_dq`` stores when asked (``write_ds``).

* ``bwd_pre`` (one program per query tile): ``delta = rowsum(dO ∘ O)`` and the base-2 log-sum-exp
  ``lse2 = log2(e) · lse`` (0 for rows without a visible key, whose every ``P`` is then
  ``exp2(-inf - 0) = 0``), both ``[B * H, Sq]`` fp32.
* ``bwd_dq`` (one program per query tile and query head), launched first: recomputes ``P`` over the key
  tiles exactly as the forward does (same key ranges and element tests) and accumulates ``dQ``. With
  additive score terms (see :func:`attnopt.kernels.exact.render_common.normalizes_rows`) it also sums each row's
  ``P`` and divides by that sum, which is 1 up to rounding except in a row whose ``lse`` lost its
  ``log Σ`` to a huge finite fill (a fully masked row averaging V); it stores the factor in
  ``RowScale [B * H, Sq]`` for ``bwd_dkdv``.
* ``bwd_dkdv`` (one program per key tile and key/value head): recomputes ``Pᵀ`` tile by tile over the
  query tiles of every query head of its GQA group and accumulates ``dK`` and ``dV`` in registers, so
  the group sum needs no atomics. Key rows beyond ``Sk`` or a row's key-padding length are computed
  without masking (a key's gradient depends only on its own column of ``P``) and stored as zeros or
  not at all. Query rows beyond ``Sq`` load ``lse2 = +inf``, so their ``P`` is 0.

Causal ranges of ``bwd_dkdv`` for the key tile ``[n0, n0 + BLOCK_N)`` (query ``i`` sees key ``j`` iff
``j <= i + offset``): rows ``i < n0 - offset`` see nothing of the tile and are skipped; rows
``i >= n0 + BLOCK_N - 1 - offset`` see all of it. Query tiles therefore run as: diagonal tiles
``[m_lo, diag_end)`` with the element test, full tiles ``[diag_end, q_full)`` without any test, and
the partial last tile ``[max(diag_end, q_full), Sq)`` with row masks only.
"""

from __future__ import annotations

from attnopt.codegen.spec import CAUSAL_BOTTOM_RIGHT, CAUSAL_NONE, KernelSpec
from attnopt.codegen.triton_text import TL_DTYPES, and_, cast, dot, mask_kw, tile_loop
from attnopt.kernels.exact.render_common import (
    KEY_TILE,
    QUERY_TILE,
    causal_test,
    d_ok,
    dropout_keep,
    dv_ok,
    feature_doc,
    feature_pointers,
    feature_scalars,
    feature_strides,
    head_bases,
    head_program_ids,
    key_loop_head,
    kv_end_line,
    normalizes_rows,
    offsets,
    opening,
    padded_dv,
    query_key_range,
    query_tile_prologue,
    scalar_setup,
    score_lines,
    strides,
)


def arg_names(spec: KernelSpec) -> tuple[str, ...]:
    if spec.direction == "bwd_pre":
        return ("Out", "DOut", "Lse", "Delta", "Lse2", *strides("o"), *strides("do"), "num_heads", "seq_q")
    if spec.direction == "bwd_dkdv":
        names = ["Q", "K", "V", "DOut", "Lse2", "Delta", *_row_scale(spec), *feature_pointers(spec), "DK", "DV"]
        names += strides("q") + strides("k", "bhnd") + strides("v", "bhnd") + strides("do")
        names += strides("dk", "bhnd") + strides("dv", "bhnd")
    else:
        names = ["Q", "K", "V", "DOut", "Lse2", "Delta", *_row_scale(spec), *feature_pointers(spec), "DQ"]
        names += ["DS"] if spec.write_ds else []
        names += strides("q") + strides("k", "bhnd") + strides("v", "bhnd") + strides("do")
        names += strides("dq")
    return tuple(names + feature_strides(spec) + feature_scalars(spec))


def _row_scale(spec: KernelSpec) -> list[str]:
    return ["RowScale"] if normalizes_rows(spec) else []


def render_lines(spec: KernelSpec) -> list[str]:
    if spec.direction == "bwd_pre":
        return _preprocess(spec)
    if spec.direction == "bwd_dkdv":
        return _dkdv(spec)
    return _dq(spec)


# ----------------------------------------------------------------------------------------------------------------
# bwd_pre


def _preprocess(spec: KernelSpec) -> list[str]:
    doc = [
        "Out, DOut [B, H, seq_q, HEAD_DIM_V] (any strides), Lse [B, H, seq_q] (contiguous, natural log)",
        "-> Delta = rowsum(DOut * Out), Lse2 = Lse * log2(e) (0 where Lse = -inf, at least -FLT_MAX),",
        "both [B * H, seq_q] fp32.",
        "",
        "Grid: (cdiv(seq_q, BLOCK_M), B * H).",
    ]
    io_mask = and_("row_ok[:, None]", dv_ok(spec, "[None, :]"))
    lines = opening(spec, "Exact attention backward, preprocessing: delta = rowsum(dO * O) and lse in base 2.",
                      arg_names(spec), doc)
    lines += [
        *head_program_ids(),
        "    start_m = pid_m * BLOCK_M",
        "    offs_m = tl.arange(0, BLOCK_M)  # [BLOCK_M]",
        "    offs_dv = tl.arange(0, BLOCK_DV)  # [BLOCK_DV]",
    ]
    if padded_dv(spec):
        lines.append("    dv_ok = offs_dv < HEAD_DIM_V  # [BLOCK_DV] padded value head dim")
    lines += [
        "    rows = start_m + offs_m  # [BLOCK_M]",
        "    row_ok = rows < seq_q  # [BLOCK_M]",
        "    o_ptrs = (Out + off_b * stride_ob + off_h * stride_oh + tl.cast(start_m, tl.int64) * stride_om",
        "              + offs_m[:, None] * stride_om + offs_dv[None, :] * stride_od)  # [BLOCK_M, BLOCK_DV]",
        "    do_ptrs = (DOut + off_b * stride_dob + off_h * stride_doh + tl.cast(start_m, tl.int64) * stride_dom",
        "               + offs_m[:, None] * stride_dom + offs_dv[None, :] * stride_dod)  # [BLOCK_M, BLOCK_DV]",
        f"    o = tl.load(o_ptrs, mask={io_mask}, other=0.0).to(tl.float32)",
        f"    do = tl.load(do_ptrs, mask={io_mask}, other=0.0).to(tl.float32)",
        "    delta = tl.sum(o * do, 1)  # [BLOCK_M]",
        "    row_offs = pid_bh.to(tl.int64) * seq_q + rows  # [BLOCK_M] into the [B * H, seq_q] buffers",
        "    lse = tl.load(Lse + row_offs, mask=row_ok, other=0.0)  # [BLOCK_M]",
        "    # Rows without a visible key have lse = -inf: lse2 = 0 makes their P = exp2(-inf - 0) = 0.",
        "    # A saturated lse (-FLT_MAX, a huge finite fill) stays finite in base 2, like the scores.",
        '    lse2 = tl.where(lse == float("-inf"), 0.0, tl.maximum(lse * LOG2E, -FLT_MAX))  # [BLOCK_M]',
        "    tl.store(Delta + row_offs, delta, mask=row_ok)",
        "    tl.store(Lse2 + row_offs, lse2, mask=row_ok)",
    ]
    return lines


# ----------------------------------------------------------------------------------------------------------------
# bwd_dq


def _dq(spec: KernelSpec) -> list[str]:
    doc = [
        "Q, K, V as the forward, DOut [B, H, seq_q, HEAD_DIM_V], Lse2 and Delta [B * H, seq_q] fp32 (bwd_pre)",
        "-> DQ [B, H, seq_q, HEAD_DIM] (any strides).",
    ]
    if spec.write_ds:
        doc.append("Also stores dS (before the softcap chain) into DS [B, H, seq_q, seq_k] fp32, contiguous,")
        unscaled = ", not yet scaled by RowScale (the caller applies it)" if normalizes_rows(spec) else ""
        doc.append(f"zero-filled by the caller{unscaled}.")
    if normalizes_rows(spec):
        doc.append("RowScale [B * H, seq_q] fp32 (out): 1 / Σ_j P_ij of each row, by which dQ is scaled.")
    doc += ["", "Grid: (cdiv(seq_q, BLOCK_M), B * H).", *feature_doc(spec)]
    lines = opening(spec, "Exact attention backward, dQ: one program per (query tile, batch * head), "
                      "streaming key tiles.", arg_names(spec), doc)
    do_mask = and_("row_ok[:, None]", dv_ok(spec, "[None, :]"))
    lines += query_tile_prologue(spec, extra_bases=(
        "    do_base = DOut + off_b * stride_dob + off_h * stride_doh + tl.cast(start_m, tl.int64) * stride_dom",
    ))
    if spec.write_ds:
        lines.append("    ds_row = DS + (pid_bh.to(tl.int64) * seq_q + rows) * seq_k  # [BLOCK_M] &dS[row, 0]")
    lines += [
        "    do = tl.load(do_base + offs_m[:, None] * stride_dom + offs_dv[None, :] * stride_dod,",
        f"                 mask={do_mask}, other=0.0)  # [BLOCK_M, BLOCK_DV]",
        "    row_offs = pid_bh.to(tl.int64) * seq_q + rows  # [BLOCK_M]",
        "    lse2 = tl.load(Lse2 + row_offs, mask=row_ok, other=0.0)  # [BLOCK_M]",
        "    delta = tl.load(Delta + row_offs, mask=row_ok, other=0.0)  # [BLOCK_M]",
        "    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)  # [BLOCK_M, BLOCK_D]",
    ]
    if normalizes_rows(spec):
        lines.append("    p_sum = tl.zeros([BLOCK_M], tl.float32)  # [BLOCK_M] Σ_j P_ij as recomputed")
    lines.append("")
    lines += query_key_range(spec)
    lines += _dq_loop(spec, boundary=False) + _dq_loop(spec, boundary=True)
    dq_mask = and_("row_ok[:, None]", d_ok(spec, "[None, :]"))
    if normalizes_rows(spec):
        lines += [
            "",
            "    # dQ is linear in P: renormalizing the rows by their sum (1 up to rounding, or the key count of a",
            "    # row saturated by a huge finite fill, whose lse lost its log Σ) is one scale per row.",
            "    row_scale = 1.0 / tl.where(p_sum > 0.0, p_sum, 1.0)  # [BLOCK_M] (rows without a key: P = 0 anyway)",
            "    dq = dq * row_scale[:, None]",
            "    tl.store(RowScale + row_offs, row_scale, mask=row_ok)",
        ]
    lines += [
        "",
        "    dq_ptrs = (DQ + off_b * stride_dqb + off_h * stride_dqh + tl.cast(start_m, tl.int64) * stride_dqm",
        "               + offs_m[:, None] * stride_dqm + offs_d[None, :] * stride_dqd)  # [BLOCK_M, BLOCK_D]",
        f"    tl.store(dq_ptrs, (dq * scale).to({TL_DTYPES[spec.dtype]}), mask={dq_mask})",
    ]
    return lines


def _dq_loop(spec: KernelSpec, boundary: bool) -> list[str]:
    tile, ind = QUERY_TILE, "        "
    col_ok = "col_ok[:, None]" if boundary else ""
    k_mask = and_(col_ok, d_ok(spec, "[None, :]"))
    v_mask = and_(col_ok, dv_ok(spec, "[None, :]"))
    lines, keep_terms = key_loop_head(spec, boundary)
    lines += [
        f"{ind}k_tile = k_base + tl.cast(start_n, tl.int64) * stride_kn",
        f"{ind}k = tl.load(k_tile + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd"
        f"{mask_kw(k_mask)})  # [BLOCK_N, BLOCK_D]",
        f"{ind}v_tile = v_base + tl.cast(start_n, tl.int64) * stride_vn",
        f"{ind}v = tl.load(v_tile + offs_n[:, None] * stride_vn + offs_dv[None, :] * stride_vd"
        f"{mask_kw(v_mask)})  # [BLOCK_N, BLOCK_DV]",
        f"{ind}qk = {dot(spec, 'q', 'tl.trans(k)')}  # [BLOCK_M, BLOCK_N]",
    ]
    ld_ok = and_("row_ok[:, None]", "col_ok[None, :]" if boundary else "")
    lines += score_lines(spec, tile, ind, ld_ok, keep_terms)
    lines += [
        f"{ind}p = tl.exp2(s - lse2[:, None])  # [BLOCK_M, BLOCK_N] the forward's probabilities",
        f"{ind}dp = {dot(spec, 'do', 'tl.trans(v)')}  # [BLOCK_M, BLOCK_N]",
    ]
    if normalizes_rows(spec):
        lines.append(f"{ind}p_sum += tl.sum(p, 1)")
    if spec.dropout:
        lines += dropout_keep(tile, ind)
        lines.append(f"{ind}dp = tl.where(kept, dp * drop_scale, 0.0)")
    lines.append(f"{ind}ds = p * (dp - delta[:, None])  # [BLOCK_M, BLOCK_N] gradient of the scores")
    if spec.write_ds:
        ds_mask = and_("row_ok[:, None]", "col_ok[None, :]" if boundary else "")
        lines.append(f"{ind}tl.store(ds_row[:, None] + cols[None, :], ds, mask={ds_mask})")
    if spec.softcap:
        lines.append(f"{ind}ds = ds * (1.0 - t * t)  # through the softcap's tanh")
    if spec.score_mod:
        lines.append(f"{ind}ds = tl.where(p > 0.0, ds * dmod, 0.0)  # through the score_mod (0, not NaN, where P = 0)")
    lines.append(f"{ind}dq += {dot(spec, cast(spec, 'ds'), 'k')}  # [BLOCK_M, BLOCK_D]")
    return lines


# ----------------------------------------------------------------------------------------------------------------
# bwd_dkdv


def _dkdv(spec: KernelSpec) -> list[str]:
    doc = [
        "Q, K, V as the forward, DOut [B, H, seq_q, HEAD_DIM_V], Lse2 and Delta [B * H, seq_q] fp32 (bwd_pre)",
        "-> DK [B, H // GROUP, seq_k, HEAD_DIM], DV [B, H // GROUP, seq_k, HEAD_DIM_V] (any strides),",
        "summed over the GROUP query heads of each key/value head.",
        "",
        "Grid: (cdiv(seq_k, BLOCK_N), B * H // GROUP).",
        *feature_doc(spec),
    ]
    lines = opening(spec, "Exact attention backward, dK and dV: one program per (key tile, batch * kv head), "
                      "streaming query tiles.", arg_names(spec), doc)
    q_end = "q_end" if spec.key_padding else "seq_q"
    lines += _dkdv_key_tile(spec) + _dkdv_query_range(spec, q_end)
    return lines + _dkdv_query_heads(spec, q_end) + _dkdv_store(spec)


def _dkdv_key_tile(spec: KernelSpec) -> list[str]:
    """The program's key tile: its rows, k and v loaded, dk and dv zeroed."""
    k_mask = and_("col_in[:, None]", d_ok(spec, "[None, :]"))
    v_mask = and_("col_in[:, None]", dv_ok(spec, "[None, :]"))
    lines = [
        "    pid_n = tl.program_id(0)",
        "    pid_bhkv = tl.program_id(1)",
        "    num_kv_heads = num_heads // GROUP",
        "    off_b = (pid_bhkv // num_kv_heads).to(tl.int64)",
        "    off_hkv = (pid_bhkv % num_kv_heads).to(tl.int64)",
        "    start_n = pid_n * BLOCK_N",
        *offsets(spec),
        "    cols = start_n + offs_n  # [BLOCK_N] key rows of this program",
        "    col_in = cols < seq_k  # [BLOCK_N]",
        *scalar_setup(spec),
        *kv_end_line(spec),
    ]
    if spec.key_padding:
        lines += [
            "    q_end = tl.where(start_n < kv_end, seq_q, 0)  # a key tile wholly in the padding sees no query",
        ]
    return lines + [
        "",
        "    k_base = K + off_b * stride_kb + off_hkv * stride_kh + tl.cast(start_n, tl.int64) * stride_kn",
        "    v_base = V + off_b * stride_vb + off_hkv * stride_vh + tl.cast(start_n, tl.int64) * stride_vn",
        "    k = tl.load(k_base + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,",
        f"                mask={k_mask}, other=0.0)  # [BLOCK_N, BLOCK_D]",
        "    v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_dv[None, :] * stride_vd,",
        f"                mask={v_mask}, other=0.0)  # [BLOCK_N, BLOCK_DV]",
        "    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)  # [BLOCK_N, BLOCK_D]",
        "    dv = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)  # [BLOCK_N, BLOCK_DV]",
        "",
    ]


def _dkdv_query_heads(spec: KernelSpec, q_end: str) -> list[str]:
    """dK and dV summed over the query heads of the key/value head, each over its query tiles."""
    lines, ind = [], "    "
    if spec.group > 1:
        lines += [
            "",
            "    for g in range(0, GROUP):  # the query heads sharing this key/value head (GQA): dK, dV sum over them",
            "        off_h = off_hkv * GROUP + g",
        ]
        ind = "        "
    else:
        lines.append("    off_h = off_hkv")
    lines += [
        f"{ind}bh = off_b * num_heads + off_h  # flat query head",
        f"{ind}q_base = Q + off_b * stride_qb + off_h * stride_qh",
        f"{ind}do_base = DOut + off_b * stride_dob + off_h * stride_doh",
        f"{ind}lse2_base = Lse2 + bh * seq_q",
        f"{ind}delta_base = Delta + bh * seq_q",
        *([f"{ind}row_scale_base = RowScale + bh * seq_q"] if normalizes_rows(spec) else []),
        *head_bases(spec, ind, "bh"),
    ]
    if spec.causal != CAUSAL_NONE:
        lines += _dkdv_loop(spec, ind, ("m_lo", f"tl.minimum(diag_end, {q_end})"),
                            "diagonal query tiles", causal=True, row_masks=True)
        first = "diag_end"
        last_start = "tl.maximum(diag_end, q_full)"
    else:
        first, last_start = "0", "q_full"
    lines += _dkdv_loop(spec, ind, (first, "q_full"), "full query tiles", causal=False,
                        row_masks=False)
    lines += _dkdv_loop(spec, ind, (last_start, q_end), "the partial last query tile",
                        causal=False, row_masks=True)
    return lines


def _dkdv_store(spec: KernelSpec) -> list[str]:
    """dK (times the scale) and dV stored; padded keys get zero gradients."""
    lines = ["", "    dk *= scale"]
    if spec.key_padding:
        lines += [
            "    key_ok = cols < kv_end  # [BLOCK_N] padded keys are masked for every query: zero gradient",
            "    dk = tl.where(key_ok[:, None], dk, 0.0)",
            "    dv = tl.where(key_ok[:, None], dv, 0.0)",
        ]
    dk_mask = and_("col_in[:, None]", d_ok(spec, "[None, :]"))
    dv_mask = and_("col_in[:, None]", dv_ok(spec, "[None, :]"))
    dtype = TL_DTYPES[spec.dtype]
    lines += [
        "    dk_ptrs = (DK + off_b * stride_dkb + off_hkv * stride_dkh + tl.cast(start_n, tl.int64) * stride_dkn",
        "               + offs_n[:, None] * stride_dkn + offs_d[None, :] * stride_dkd)  # [BLOCK_N, BLOCK_D]",
        "    dv_ptrs = (DV + off_b * stride_dvb + off_hkv * stride_dvh + tl.cast(start_n, tl.int64) * stride_dvn",
        "               + offs_n[:, None] * stride_dvn + offs_dv[None, :] * stride_dvd)  # [BLOCK_N, BLOCK_DV]",
        f"    tl.store(dk_ptrs, dk.to({dtype}), mask={dk_mask})",
        f"    tl.store(dv_ptrs, dv.to({dtype}), mask={dv_mask})",
    ]
    return lines


def _dkdv_query_range(spec: KernelSpec, q_end: str) -> list[str]:
    lines = [f"    q_full = {q_end} // BLOCK_M * BLOCK_M  # query tiles before q_full lie wholly inside seq_q"]
    if spec.causal == CAUSAL_NONE:
        return lines
    offset = " - causal_offset" if spec.causal == CAUSAL_BOTTOM_RIGHT else ""
    return lines + [
        "    # Rows i < start_n - offset see no key of this tile; rows i >= start_n + BLOCK_N - 1 - offset see all.",
        f"    m_lo = tl.maximum(start_n{offset}, 0) // BLOCK_M * BLOCK_M",
        f"    diag_end = (tl.maximum(start_n + BLOCK_N - 1{offset}, 0) + BLOCK_M - 1) // BLOCK_M * BLOCK_M",
    ]


def _dkdv_loop(spec: KernelSpec, ind: str, bounds: tuple[str, str], what: str, causal: bool,
               row_masks: bool) -> list[str]:
    """One pass over the query tiles starting in ``bounds`` (a unit-step loop, see
    :func:`attnopt.codegen.triton_text.tile_loop`)."""
    tile = KEY_TILE
    body = ind + "    "
    q_mask = and_("row_ok[:, None]" if row_masks else "", d_ok(spec, "[None, :]"))
    do_mask = and_("row_ok[:, None]" if row_masks else "", dv_ok(spec, "[None, :]"))
    lines = [
        "",
        f"{ind}{tile_loop('tile_m', *bounds, 'BLOCK_M')}  # {what}",
        f"{body}start_m = tile_m * BLOCK_M  # first query row of the tile",
        f"{body}rows = start_m + offs_m  # [BLOCK_M] query rows",
    ]
    if row_masks:
        lines.append(f"{body}row_ok = rows < seq_q  # [BLOCK_M]")
    lse2_kw = ', mask=row_ok, other=float("inf")' if row_masks else ""
    delta_kw = ", mask=row_ok, other=0.0" if row_masks else ""
    lines += [
        f"{body}q_tile = q_base + tl.cast(start_m, tl.int64) * stride_qm",
        f"{body}q = tl.load(q_tile + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd"
        f"{mask_kw(q_mask)})  # [BLOCK_M, BLOCK_D]",
        f"{body}do_tile = do_base + tl.cast(start_m, tl.int64) * stride_dom",
        f"{body}do = tl.load(do_tile + offs_m[:, None] * stride_dom + offs_dv[None, :] * stride_dod"
        f"{mask_kw(do_mask)})  # [BLOCK_M, BLOCK_DV]",
        f"{body}lse2 = tl.load(lse2_base + rows{lse2_kw})  # [BLOCK_M] (+inf past seq_q: P = 0)",
        f"{body}delta = tl.load(delta_base + rows{delta_kw})  # [BLOCK_M]",
        *([f"{body}row_scale = tl.load(row_scale_base + rows{delta_kw})  # [BLOCK_M] from bwd_dq"]
          if normalizes_rows(spec) else []),
        f"{body}qk = {dot(spec, 'k', 'tl.trans(q)')}  # [BLOCK_N, BLOCK_M] (K Qᵀ)",
    ]
    ld_ok = and_("col_in[:, None]", "row_ok[None, :]" if row_masks else "")
    keep_terms = [causal_test(spec, tile)] if causal else []
    if spec.dropout:
        lines.append(f"{body}drop_row = drop_base + rows.to(tl.int64) * seq_k  # [BLOCK_M] Philox counter of (row, 0)")
    lines += score_lines(spec, tile, body, ld_ok, keep_terms)
    if normalizes_rows(spec):
        lines.append(f"{body}p = tl.exp2(s - lse2[None, :]) * row_scale[None, :]  # [BLOCK_N, BLOCK_M] Pᵀ")
    else:
        lines.append(f"{body}p = tl.exp2(s - lse2[None, :])  # [BLOCK_N, BLOCK_M] Pᵀ")
    p_drop = "p"
    if spec.dropout:
        lines += dropout_keep(tile, body)
        lines.append(f"{body}p_drop = tl.where(kept, p * drop_scale, 0.0)  # [BLOCK_N, BLOCK_M] P̃ᵀ")
        p_drop = "p_drop"
    lines += [
        f"{body}dv += {dot(spec, cast(spec, p_drop), 'do')}  # [BLOCK_N, BLOCK_DV]",
        f"{body}dp = {dot(spec, 'v', 'tl.trans(do)')}  # [BLOCK_N, BLOCK_M] dP̃ᵀ",
    ]
    if spec.dropout:
        lines.append(f"{body}dp = tl.where(kept, dp * drop_scale, 0.0)  # dPᵀ")
    lines.append(f"{body}ds = p * (dp - delta[None, :])  # [BLOCK_N, BLOCK_M] dSᵀ")
    if spec.softcap:
        lines.append(f"{body}ds = ds * (1.0 - t * t)  # through the softcap's tanh")
    if spec.score_mod:
        lines.append(f"{body}ds = tl.where(p > 0.0, ds * dmod, 0.0)  # through the score_mod (0, not NaN, where P = 0)")
    lines.append(f"{body}dk += {dot(spec, cast(spec, 'ds'), 'q')}  # [BLOCK_N, BLOCK_D]")
    return lines
