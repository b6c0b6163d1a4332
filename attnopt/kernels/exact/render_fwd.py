r"""The exact attention forward kernel: FlashAttention-2 online softmax over key tiles.

One program computes one query tile of ``BLOCK_M`` rows of one (batch, query head)::

    O = dropout(softmax(score)) V        lse = log Σ_j exp(score_j)

without materializing the ``[Sq, Sk]`` score matrix: key/value tiles of ``BLOCK_N`` rows stream
through while each row keeps a running maximum ``m``, a running denominator ``l`` and an
unnormalized output ``acc``.

Online softmax, in base 2 (``s_j = log2(e) * score_j``, see :mod:`attnopt.kernels.exact.render_common`). After
the tiles ``1..t``::

    m_t   = max_{j <= t} s_j
    l_t   = Σ_{j <= t} exp2(s_j - m_t)
    acc_t = Σ_{j <= t} exp2(s_j - m_t) keep_j v_j

A new tile with scores ``s`` gives ``m_{t+1} = max(m_t, max_j s_j)``; rescaling the old terms by
``alpha = exp2(m_t - m_{t+1})`` restores the invariants::

    p       = exp2(s - m_{t+1})
    l_{t+1} = alpha * l_t + Σ_j p_j
    acc_{t+1} = alpha * acc_t + (p ∘ keep) V_tile

At the end ``O = acc / l / (1 - dropout_p)`` (the ``exp2(-m)`` factors cancel; the denominator is the
softmax's, before dropout) and ``lse = ln 2 * log2(Σ_j exp2(s_j)) = ln 2 * (m + log2 l)``.

Masked scores are ``-inf``. While every score seen by a row so far is masked, ``m = -inf`` and
``m_t - m_{t+1}`` or ``s - m_{t+1}`` would be ``-inf - (-inf) = NaN``; the kernel subtracts a
*safe* maximum instead (``0`` where the maximum is ``-inf``), which is exact: every term it
touches is ``exp2(-inf) = 0`` either way. A row with no visible key ends with ``l = 0`` and
``acc = 0``, and stores ``O = 0`` and ``lse = -inf``.

Causal masks (``j <= i + offset``, offset 0 top-left, ``Sk - Sq`` bottom-right) split the key
range of a query tile into three parts: tiles every row sees entirely (no per-element test),
boundary tiles (element test on the diagonal and on the key bound), and tiles wholly above the
diagonal (never loaded). Without causality the boundary is the last, partial key tile. With key
padding the key bound of batch row ``b`` is ``kv_lens[b]`` instead of ``Sk``, so padded key tiles are
never loaded either.

K and V tiles come through tensor descriptors (``tl.make_tensor_descriptor``: TMA on sm_90+, which
copies a tile into shared memory with no per-element address and fills rows past ``seq_k`` and columns
past the head dim with zeros) unless the spec says ``strided_kv``: then through per-element pointers,
for inputs whose strides or alignment a descriptor cannot take and for GPUs before sm_90. On sm_90 the
pointer loads cost two integer instructions per 16-byte copy and about 50 registers of addresses, which
a 128x128 tile cannot spare; the descriptor loop issues what Triton's fused-attention tutorial does.
"""

from __future__ import annotations

from attnopt.codegen.spec import KernelSpec
from attnopt.codegen.triton_text import TL_DTYPES, and_, cast, dot, mask_kw
from attnopt.kernels.exact.render_common import (
    QUERY_TILE,
    d_ok,
    dropout_keep,
    dv_ok,
    feature_doc,
    feature_pointers,
    feature_scalars,
    feature_strides,
    key_loop_head,
    opening,
    query_key_range,
    query_tile_prologue,
    score_lines,
    strides,
)


def arg_names(spec: KernelSpec) -> tuple[str, ...]:
    names = ["Q", "K", "V", *feature_pointers(spec), "Out", "Lse"]
    names += strides("q") + strides("k", "bhnd") + strides("v", "bhnd") + strides("o")
    names += feature_strides(spec) + feature_scalars(spec)
    return tuple(names)


def render_lines(spec: KernelSpec) -> list[str]:
    doc = [
        "Q [B, H, seq_q, HEAD_DIM], K [B, H // GROUP, seq_k, HEAD_DIM], V [B, H // GROUP, seq_k, HEAD_DIM_V]",
        "-> Out [B, H, seq_q, HEAD_DIM_V], Lse [B, H, seq_q] (contiguous, fp32, natural log).",
        "",
        "Any strides. Grid: (cdiv(seq_q, BLOCK_M), B * H).",
        *feature_doc(spec),
    ]
    lines = opening(spec, "Exact attention forward, FlashAttention-2 online softmax; "
                      "one program per (query tile, batch * head).", arg_names(spec), doc)
    lines += _prologue(spec) + query_key_range(spec)
    lines += _loop(spec, boundary=False) + _loop(spec, boundary=True) + _epilogue(spec)
    return lines


def _prologue(spec: KernelSpec) -> list[str]:
    descriptors = [] if spec.strided_kv else [
        "    # K and V tiles through tensor descriptors (TMA on sm_90+): no per-element address, zeros past the end.",
        "    k_desc = tl.make_tensor_descriptor(k_base, shape=[seq_k, HEAD_DIM], strides=[stride_kn, 1],",
        "                                       block_shape=[BLOCK_N, BLOCK_D])  # tiles [BLOCK_N, BLOCK_D]",
        "    v_desc = tl.make_tensor_descriptor(v_base, shape=[seq_k, HEAD_DIM_V], strides=[stride_vn, 1],",
        "                                       block_shape=[BLOCK_N, BLOCK_DV])  # tiles [BLOCK_N, BLOCK_DV]",
    ]
    return query_tile_prologue(spec) + descriptors + [
        "",
        '    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # [BLOCK_M] running max of the base-2 scores',
        "    l_i = tl.zeros([BLOCK_M], tl.float32)  # [BLOCK_M] running sum of exp2(s - m_i)",
        "    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)  # [BLOCK_M, BLOCK_DV] running unnormalized output",
        "",
    ]


def _loop(spec: KernelSpec, boundary: bool) -> list[str]:
    """One pass of the online softmax over key tiles; ``boundary`` adds the per-element key tests."""
    tile, ind = QUERY_TILE, "        "
    col_ok = "col_ok[None, :]" if boundary else ""
    k_mask = and_(d_ok(spec, "[:, None]"), col_ok)
    v_mask = and_("col_ok[:, None]" if boundary else "", dv_ok(spec, "[None, :]"))
    lines, keep_terms = key_loop_head(spec, boundary)
    if spec.strided_kv:
        lines += [
            f"{ind}k_tile = k_base + tl.cast(start_n, tl.int64) * stride_kn",
            f"{ind}k = tl.load(k_tile + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd"
            f"{mask_kw(k_mask)})  # [BLOCK_D, BLOCK_N], Kᵀ",
        ]
    else:
        lines.append(f"{ind}k = k_desc.load([start_n, 0]).T  # [BLOCK_D, BLOCK_N], Kᵀ (zeros past seq_k, HEAD_DIM)")
    lines.append(f"{ind}qk = {dot(spec, 'q', 'k')}  # [BLOCK_M, BLOCK_N]")
    if folds_scale(spec, keep_terms):
        lines += [
            f"{ind}m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)  # [BLOCK_M] max of the raw products, scaled",
            f"{ind}alpha = tl.exp2(m_i - m_new)  # [BLOCK_M] rescales the previous tiles",
            f"{ind}p = tl.exp2(tl.fma(qk, qk_scale, -m_new[:, None]))  # [BLOCK_M, BLOCK_N] one FFMA per score",
        ]
    else:
        lines += score_lines(spec, tile, ind, and_("row_ok[:, None]", col_ok), keep_terms)
        lines += [
            f"{ind}m_new = tl.maximum(m_i, tl.max(s, 1))  # [BLOCK_M]",
            f'{ind}m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # [BLOCK_M] no -inf - -inf',
            f"{ind}alpha = tl.exp2(m_i - m_safe)  # [BLOCK_M] rescales the previous tiles",
            f"{ind}p = tl.exp2(s - m_safe[:, None])  # [BLOCK_M, BLOCK_N]",
        ]
    lines.append(f"{ind}l_i = l_i * alpha + tl.sum(p, 1)")
    p = "p"
    if spec.dropout:
        lines += dropout_keep(tile, ind)
        lines.append(f"{ind}p_kept = tl.where(kept, p, 0.0)  # [BLOCK_M, BLOCK_N] (rescaled in the epilogue)")
        p = "p_kept"
    if spec.strided_kv:
        lines += [
            f"{ind}v_tile = v_base + tl.cast(start_n, tl.int64) * stride_vn",
            f"{ind}v = tl.load(v_tile + offs_n[:, None] * stride_vn + offs_dv[None, :] * stride_vd"
            f"{mask_kw(v_mask)})  # [BLOCK_N, BLOCK_DV]",
        ]
    else:
        lines.append(f"{ind}v = v_desc.load([start_n, 0])  # [BLOCK_N, BLOCK_DV] (zeros past seq_k, HEAD_DIM_V)")
    return lines + [
        f"{ind}acc = acc * alpha[:, None] + {dot(spec, cast(spec, p), 'v')}  # [BLOCK_M, BLOCK_DV]",
        f"{ind}m_i = m_new",
    ]


def folds_scale(spec: KernelSpec, keep_terms: list[str]) -> bool:
    """Whether a loop takes the row maximum of the raw products and folds the scale into the exponent.

    With base-2 scores ``s = c * qk`` (``c = scale * log2(e) >= 0``, see the module docstring), ``max_j s_j
    = c * max_j qk_j`` and ``exp2(s - m) = exp2(qk * c - m)``: one FFMA per score instead of an FMUL to
    form ``s`` and an FADD to subtract ``m`` (Triton's fused-attention tutorial does the same; ``tl.fma``
    keeps it one instruction when Triton's FP fusion is off, its default from 3.10 on). It needs a
    loop without masked scores (a masked ``-inf`` times ``c = 0`` is NaN) and without terms added to the
    scaled scores: no keep test (causal diagonal, key bound, boolean mask), no additive mask or bias and
    no softcap (whose tanh needs the scaled product). Every score is then finite, so the running maximum
    is finite after the first tile and needs no ``-inf`` guard. The launcher makes ``c >= 0`` by moving a
    negative scale's sign onto K (:func:`attnopt.kernels.exact.triton_impl.forward`).
    """
    return not keep_terms and spec.mask == "none" and spec.bias == "none" and not spec.softcap and not spec.score_mod


def _epilogue(spec: KernelSpec) -> list[str]:
    out_mask = and_("row_ok[:, None]", dv_ok(spec, "[None, :]"))
    norm = "acc * (drop_scale / l_safe)[:, None]" if spec.dropout else "acc / l_safe[:, None]"
    return [
        "",
        "    # Rows that saw no key have l_i == 0 and acc == 0: they store zeros and lse = -inf.",
        "    # Rows whose every score saturated at -FLT_MAX (a finite mask fill) store lse = -FLT_MAX.",
        "    l_safe = tl.where(l_i == 0.0, 1.0, l_i)  # [BLOCK_M]",
        f"    out = {norm}  # [BLOCK_M, BLOCK_DV]",
        "    lse = tl.where(m_i == -FLT_MAX, -FLT_MAX, (m_i + tl.log2(l_safe)) * LN2)  # [BLOCK_M] natural log",
        '    lse = tl.where(l_i == 0.0, float("-inf"), lse)',
        "    out_ptrs = (Out + off_b * stride_ob + off_h * stride_oh + tl.cast(start_m, tl.int64) * stride_om",
        "                + offs_m[:, None] * stride_om + offs_dv[None, :] * stride_od)  # [BLOCK_M, BLOCK_DV]",
        f"    tl.store(out_ptrs, out.to({TL_DTYPES[spec.dtype]}), mask={out_mask})",
        "    tl.store(Lse + pid_bh.to(tl.int64) * seq_q + rows, lse, mask=row_ok)",
    ]
