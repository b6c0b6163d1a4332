r"""Generated Triton kernels for chunked linear attention: rendering and loading (the spec: :mod:`.spec`).

The algorithm and its gradients are derived in :mod:`attnopt.kernels.linear.chunked`; the kernels
run the same chunked form on the GPU, in three kinds (chunk ``C = 64`` positions, the decay
``λ = exp2(ld2)`` per query head, the weights of the module below written in base 2):

* ``state``: one program per (value-dim tile, batch·head) walks the chunks in order and stores the
  state carried *into* each chunk (``h_n`` [D, Dv] fp32, and ``z_n`` [D] when normalized), then the
  final state: ``h ← λ^len h + Σ_b λ^(len-1-b) x_bᵀ y_b`` with ``x = k``, ``y = v``. With ``reverse``
  the same walk runs backwards in time over ``x = s·q``, ``y = dnum`` (and ``dden`` for the norm) with
  weights ``λ^(a+1)``: the states ``g_n`` carried out of each chunk that the backward needs, and the
  gradient of the initial state. Non-causal specs only sum (no per-chunk states, no decay).
* ``out``: one program per (chunk, value-dim tile, batch·head), all in parallel:
  ``num = (q kᵀ ⊙ M) v + (λ^(a+1) q) h_n``, ``den = rowsum(q kᵀ ⊙ M) + (λ^(a+1) q)·z_n``,
  ``out = s·num / (s·den + eps)``. Non-causal: ``num = q h``, ``den = q·z`` with the summed state.
* ``grad``: one program per (chunk, key-dim column tile, batch·head) computes its columns of ``dq``,
  ``dk`` and its part of ``dv`` (added atomically) from ``h_n``, ``z_n`` (forward states) and ``g_n``,
  ``r_n`` (reverse states), walking the value dim a tile at a time; ``dk`` and ``dv`` are per query
  head (fp32) and summed over GQA groups by the launcher.

Intra-chunk products run in the input dtype with fp32 accumulation; everything that touches a state
runs in fp32 (``input_precision="ieee"`` for fp32 specs, the GPU's default, tf32, otherwise): a
state sums up to S outer products and would overflow fp16.

This module imports neither torch nor triton at module level; :func:`load` imports the rendered
module (and so triton) from the kernel cache (``attnopt.codegen.cache.cache_root()``).
"""

from __future__ import annotations

from attnopt.codegen.cache import load_generated
from attnopt.codegen.triton_text import LOG2E, TL_DTYPES, dim_constants, dot, jit_def, module_head
from attnopt.kernels.linear.spec import LinearSpec

# --------------------------------------------------------------------------------------------------- render

def _header(spec: LinearSpec, what: str) -> list[str]:
    summary = [
        f"Chunked linear attention, {what}.",
        f"dtype {spec.dtype}, {'causal' if spec.causal else 'non-causal'}, "
        f"{'decay' if spec.decay else 'no decay'}, {'normalized' if spec.normalize else 'unnormalized'}, "
        f"head_dim {spec.head_dim} (padded {spec.block_d}), head_dim_v {spec.head_dim_v}, "
        f"chunk {spec.chunk}, value tile {spec.block_dv}.",
    ]
    constants = {"CHUNK": spec.chunk, **dim_constants(spec), "LOG2E": LOG2E}
    if spec.kind == "grad":
        constants["BLOCK_DT"] = spec.block_dt
    return module_head(spec, __name__, summary, constants)


def _signature(spec: LinearSpec, pointers: list[str], strides: list[str], scalars: list[str], doc: list[str]) -> list[str]:
    lines = jit_def(spec.name, pointers, strides, scalars)
    return lines + ['    """' + doc[0]] + ["    " + d if d else "" for d in doc[1:]] + ['    """']


def _ids(grid: str) -> list[str]:
    lines = [f"    {name} = tl.program_id({i})" for i, name in enumerate(grid.split(","))]
    return lines + [
        "    off_b = (pid_bh // num_heads).to(tl.int64)",
        "    off_h = (pid_bh % num_heads).to(tl.int64)",
        "    off_hkv = off_h // group  # GQA: query head h reads key/value head h // group",
        "    bh = pid_bh.to(tl.int64)",
        "    offs_c = tl.arange(0, CHUNK)  # [CHUNK] positions within a chunk",
        "    offs_d = tl.arange(0, BLOCK_D)",
        "    d_ok = offs_d < HEAD_DIM",
    ]


def kernel_arg_names(spec: LinearSpec) -> tuple[str, ...]:
    """The generated kernel's parameters in order (the launcher passes them by name)."""
    pointers, strides, scalars = _args(spec)
    return tuple(pointers + strides + scalars)


def _args(spec: LinearSpec) -> tuple[list[str], list[str], list[str]]:
    """(pointers, strides, scalars) of ``spec``'s kernel."""
    norm, decay = spec.normalize, spec.decay
    if spec.kind == "state":
        ptrs = ["X", "Y"] + (["U"] if spec.reverse and norm else []) + (["LogDecay"] if decay else [])
        ptrs += ["Init"] + (["InitNorm"] if norm else [])
        if spec.causal:
            ptrs += ["States"] + (["Norms"] if norm else [])
        ptrs += ["Final"] + (["FinalNorm"] if norm else [])
        strides = [f"stride_x{d}" for d in "bhsd"] + [f"stride_y{d}" for d in "bhsd"]
        return ptrs, strides, ["num_heads", "group", "seq", "n_chunks", "x_scale"]
    if spec.kind == "out":
        ptrs = ["Q", "K", "V"] + (["LogDecay"] if decay else []) + ["States"] + (["Norms"] if norm else [])
        ptrs += ["Out"] + (["Den"] if norm else [])
        strides = [f"stride_{t}{d}" for t in "qkvo" for d in "bhsd"]
        return ptrs, strides, ["num_heads", "group", "seq_q", "n_chunks", "scale", "eps"]
    ptrs = ["Q", "K", "V", "DNum"] + (["DDen"] if norm else []) + (["LogDecay"] if decay else [])
    ptrs += ["States"] + (["Norms"] if norm else []) + ["RStates"] + (["RNorms"] if norm else [])
    ptrs += ["DQ", "DK", "DV"]
    strides = [f"stride_{t}{d}" for t in ("q", "k", "v", "dn", "dq", "dk", "dv") for d in "bhsd"]
    return ptrs, strides, ["num_heads", "group", "seq_q", "seq_k", "n_chunks", "scale"]


def render(spec: LinearSpec) -> str:
    """The source of a Python module defining the ``@triton.jit`` kernel ``spec.name``."""
    body = {"state": _state, "out": _out, "grad": _grad}[spec.kind](spec)
    return "\n".join(body) + "\n"


def _decay_lines(spec: LinearSpec, indent: str = "    ") -> list[str]:
    if not spec.decay:
        return []
    return [f"{indent}ld2 = tl.load(LogDecay + off_h) * LOG2E  # log2 λ of this query head"]


def _value_tile(offs_v: str) -> list[str]:
    """The value columns ``offs_v`` of a program and its [BLOCK_D, BLOCK_DV] tile of a [D, Dv] state."""
    return [
        f"    offs_v = {offs_v}  # [BLOCK_DV] this program's value columns",
        "    v_ok = offs_v < HEAD_DIM_V",
        "    tile_ok = d_ok[:, None] & v_ok[None, :]",
        "    tile = offs_d[:, None] * HEAD_DIM_V + offs_v[None, :]  # [BLOCK_D, BLOCK_DV] within a [D, Dv] state",
    ]


def _chunk_rows(start: str, indent: str = "    ") -> list[str]:
    """``start`` (the chunk's first row), ``row0`` (the same as int64: ``row0 * stride`` may pass 2**31 on long
    or strided inputs, while ``offs_c * stride`` within a chunk stays small) and ``rows`` [CHUNK]."""
    return [
        f"{indent}start = {start}",
        f"{indent}row0 = tl.cast(start, tl.int64)",
        f"{indent}rows = start + offs_c  # [CHUNK]",
    ]


def _rows_at(t: str, head: str) -> str:
    """The address offset of the chunk's rows (``[CHUNK, 1]``) of tensor ``t`` (q, k, v, dn, ...) at ``head``."""
    return f"off_b * stride_{t}b + {head} * stride_{t}h + row0 * stride_{t}s + offs_c[:, None] * stride_{t}s"


def _load_rows(var: str, tensor: str, cols: str, mask: str, rest: str) -> list[str]:
    """``var = tl.load(...)`` of the chunk's rows and columns ``cols`` of Q, K or V (K and V at the query
    head's key/value head), masked by ``mask``; ``rest`` follows the load (a cast, a shape comment)."""
    t = tensor.lower()
    head = "off_h" if tensor == "Q" else "off_hkv"
    return [
        f"    {var} = tl.load({tensor} + {_rows_at(t, head)} + {cols}[None, :] * stride_{t}d,",
        f"    {' ' * len(var + ' = tl.load(')}mask={mask}, other=0.0){rest}",
    ]


def _state_doc(spec: LinearSpec) -> tuple[str, list[str]]:
    """The state kernel's summary and docstring lines."""
    rev, norm = spec.reverse, spec.normalize
    what = ("backward state pass (reverse in time: the states carried out of each chunk)" if rev
            else "state pass (the states carried into each chunk)")  # fmt: skip
    if not spec.causal:
        what = "summed state" + (" of the backward" if rev else "")
    doc = [
        "X [B, H // group, seq, HEAD_DIM], Y [B, H // group, seq, HEAD_DIM_V] (any strides)"
        + (", U [B, H, seq] fp32 contiguous" if rev and norm else "") + ".",
        "",
        "Init [B*H, HEAD_DIM, HEAD_DIM_V] fp32 is the state the walk starts from"
        + (" (InitNorm [B*H, HEAD_DIM] its norm)" if norm else "") + "; Final receives the state it ends with.",
    ]
    if spec.causal:
        doc.append("States [B*H, n_chunks, HEAD_DIM, HEAD_DIM_V] fp32 receives, per chunk, the state "
                   + ("carried out of it." if rev else "carried into it."))  # fmt: skip
    doc.append("Grid: (cdiv(HEAD_DIM_V, BLOCK_DV), B * H); x is multiplied by x_scale.")
    return what, doc


def _state_decay(spec: LinearSpec) -> list[str]:
    """The decay of one chunk in the state walk: x weighted per row, the carried state (and norm) decayed."""
    if spec.reverse:
        lines = ["        w = tl.exp2((offs_c + 1).to(tl.float32) * ld2)  # [CHUNK] λ^(a+1)"]
    else:
        lines = [
            "        # λ^(len-1-b) for the rows of the chunk, 0 past its end (exponent clamped: it would be positive)",
            "        length = tl.minimum(seq - start, CHUNK)",
            "        w = tl.where(offs_c < length, tl.exp2(tl.maximum(length - 1 - offs_c, 0).to(tl.float32) * ld2), 0.0)",
        ]
    lines += [
        "        carry = tl.exp2(tl.minimum(seq - start, CHUNK).to(tl.float32) * ld2)  # λ^len",
        "        x = x * w[:, None]",
        "        h = h * carry",
    ]
    return lines + (["        z = z * carry"] if spec.normalize else [])


def _state(spec: LinearSpec) -> list[str]:
    rev, norm, dt = spec.reverse, spec.normalize, TL_DTYPES[spec.dtype]
    what, doc = _state_doc(spec)
    pointers, strides, scalars = _args(spec)
    lines = _header(spec, what) + _signature(spec, pointers, strides, scalars, doc) + _ids("pid_v,pid_bh")
    lines += _value_tile("pid_v * BLOCK_DV + tl.arange(0, BLOCK_DV)")
    lines += [
        "    h = tl.load(Init + bh * HEAD_DIM * HEAD_DIM_V + tile, mask=tile_ok, other=0.0)  # [BLOCK_D, BLOCK_DV] fp32",
    ]
    if norm:
        lines += [
            "    first = pid_v == 0  # one program per head stores the norm state",
            "    z = tl.load(InitNorm + bh * HEAD_DIM + offs_d, mask=d_ok, other=0.0)  # [BLOCK_D] fp32",
        ]
    lines += _decay_lines(spec)
    lines += [
        "    x_base = X + off_b * stride_xb + off_hkv * stride_xh",
        "    y_base = Y + off_b * stride_yb + off_hkv * stride_yh",
        "    for i in range(0, n_chunks):",
        f"        n = {'n_chunks - 1 - i' if rev else 'i'}",
    ]
    if spec.causal:
        lines += [
            "        chunk_base = (bh * n_chunks + n) * HEAD_DIM",
            "        tl.store(States + chunk_base * HEAD_DIM_V + tile, h, mask=tile_ok)",
        ]
        if norm:
            lines += ["        if first:", "            tl.store(Norms + chunk_base + offs_d, z, mask=d_ok)"]
    lines += _chunk_rows("n * CHUNK", " " * 8) + [
        "        row_ok = rows < seq",
        "        x = tl.load(x_base + row0 * stride_xs + offs_c[:, None] * stride_xs + offs_d[None, :] * stride_xd,",
        "                    mask=row_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32) * x_scale  # [CHUNK, BLOCK_D]",
        "        y = tl.load(y_base + row0 * stride_ys + offs_c[:, None] * stride_ys + offs_v[None, :] * stride_yd,",
        "                    mask=row_ok[:, None] & v_ok[None, :], other=0.0)  # [CHUNK, BLOCK_DV]",
    ]
    if spec.decay:
        lines += _state_decay(spec)
    y_cast = "y.to(tl.float32)" if rev else "y"
    x_cast = "x" if rev else f"x.to({dt})"
    lines.append(f"        h += {dot(spec, f'tl.trans({x_cast})', y_cast)}")
    if norm:
        if rev:
            lines += [
                "        u = tl.load(U + bh * seq + rows, mask=row_ok, other=0.0)  # [CHUNK] dden",
                "        z += tl.sum(x * u[:, None], axis=0)",
            ]
        else:
            lines.append("        z += tl.sum(x, axis=0)")
    lines.append("    tl.store(Final + bh * HEAD_DIM * HEAD_DIM_V + tile, h, mask=tile_ok)")
    if norm:
        lines += ["    if first:", "        tl.store(FinalNorm + bh * HEAD_DIM + offs_d, z, mask=d_ok)"]
    return lines


def _intra_mask(spec: LinearSpec, target: str, indent: str = "    ") -> list[str]:
    """Applies M (λ^(a-b) on and below the diagonal, 0 above) to the [CHUNK, CHUNK] matrix ``target``."""
    if spec.decay:
        return [
            f"{indent}dist = offs_c[:, None] - offs_c[None, :]  # [CHUNK, CHUNK] a - b",
            f"{indent}m = tl.where(dist >= 0, tl.exp2(tl.maximum(dist, 0).to(tl.float32) * ld2), 0.0)",
            f"{indent}{target} = {target} * m",
        ]
    return [f"{indent}{target} = tl.where(offs_c[None, :] <= offs_c[:, None], {target}, 0.0)"]


def _out(spec: LinearSpec) -> list[str]:
    norm, dt = spec.normalize, TL_DTYPES[spec.dtype]
    pointers, strides, scalars = _args(spec)
    doc = [
        "Q [B, H, seq_q, HEAD_DIM], K [B, H // group, seq_q, HEAD_DIM], V [B, H // group, seq_q, HEAD_DIM_V]",
        "(features, any strides) -> Out [B, H, seq_q, HEAD_DIM_V]" + (", Den [B, H, seq_q] fp32 (s·den)." if norm else "."),
        "",
        ("States [B*H, n_chunks, HEAD_DIM, HEAD_DIM_V] fp32: the state carried into each chunk"
         + (" (Norms [B*H, n_chunks, HEAD_DIM])." if norm else ".")) if spec.causal
        else "States [B*H, HEAD_DIM, HEAD_DIM_V] fp32: Σ_j k_jᵀ v_j" + (" (Norms [B*H, HEAD_DIM]: Σ_j k_j)." if norm else "."),
        "Grid: (cdiv(seq_q, CHUNK), cdiv(HEAD_DIM_V, BLOCK_DV), B * H).",
    ]  # fmt: skip
    lines = _header(spec, "output pass") + _signature(spec, pointers, strides, scalars, doc)
    lines += _ids("pid_c,pid_v,pid_bh")
    lines += _value_tile("pid_v * BLOCK_DV + tl.arange(0, BLOCK_DV)")
    lines += _chunk_rows("pid_c * CHUNK") + ["    row_ok = rows < seq_q"]
    lines += _load_rows("q", "Q", "offs_d", "row_ok[:, None] & d_ok[None, :]", "  # [CHUNK, BLOCK_D]")
    lines += _decay_lines(spec)
    if spec.causal:
        lines += _load_rows("k", "K", "offs_d", "row_ok[:, None] & d_ok[None, :]", "  # [CHUNK, BLOCK_D]")
        lines += _load_rows("v", "V", "offs_v", "row_ok[:, None] & v_ok[None, :]", "  # [CHUNK, BLOCK_DV]")
        lines.append(f"    s = {dot(spec, 'q', 'tl.trans(k)')}  # [CHUNK, CHUNK] intra-chunk scores")
        lines += _intra_mask(spec, "s")
        lines += [
            f"    num = {dot(spec, f's.to({dt})', 'v')}  # [CHUNK, BLOCK_DV]",
            "    chunk_base = (bh * n_chunks + pid_c) * HEAD_DIM",
            "    h = tl.load(States + chunk_base * HEAD_DIM_V + tile, mask=tile_ok, other=0.0)  # state into the chunk",
            "    qf = q.to(tl.float32)",
        ]
        if spec.decay:
            lines.append("    qf = qf * tl.exp2((offs_c + 1).to(tl.float32) * ld2)[:, None]  # λ^(a+1)")
        lines.append(f"    num += {dot(spec, 'qf', 'h')}")
        if norm:
            lines += [
                "    z = tl.load(Norms + chunk_base + offs_d, mask=d_ok, other=0.0)",
                "    den = tl.sum(s, axis=1) + tl.sum(qf * z[None, :], axis=1)  # [CHUNK]",
            ]
    else:
        lines += [
            "    h = tl.load(States + bh * HEAD_DIM * HEAD_DIM_V + tile, mask=tile_ok, other=0.0)",
            "    qf = q.to(tl.float32)",
            f"    num = {dot(spec, 'qf', 'h')}  # [CHUNK, BLOCK_DV]",
        ]
        if norm:
            lines += [
                "    z = tl.load(Norms + bh * HEAD_DIM + offs_d, mask=d_ok, other=0.0)",
                "    den = tl.sum(qf * z[None, :], axis=1)  # [CHUNK]",
            ]
    lines.append("    num = num * scale")
    if norm:
        lines += [
            "    den = den * scale",
            "    num = num / (den + eps)[:, None]",
            "    if pid_v == 0:  # one program per chunk stores the denominator",
            "        tl.store(Den + bh * seq_q + rows, den, mask=row_ok)",
        ]
    lines += [
        f"    tl.store(Out + {_rows_at('o', 'off_h')} + offs_v[None, :] * stride_od,",
        "             num.to(Out.dtype.element_ty), mask=row_ok[:, None] & v_ok[None, :])",
    ]
    return lines


def _grad(spec: LinearSpec) -> list[str]:
    norm = spec.normalize
    pointers, strides, scalars = _args(spec)
    doc = [
        "Gradients of one chunk: DQ [B, H, seq_q, HEAD_DIM] (q's dtype), DK [B, H, seq_k, HEAD_DIM] and DV [B, H,",
        "seq_k, HEAD_DIM_V] fp32 per query head (GQA groups summed by the launcher; DV zero-filled: column tiles add).",
        "",
        "DNum [B, H, seq_q, HEAD_DIM_V] fp32 is dO / (den + eps)" + (", DDen [B, H, seq_q] fp32 -(dO·out) / (den + eps)"
                                                                     if norm else "") + ".",
        ("States/Norms hold the forward states carried into each chunk, RStates/RNorms the backward states "
         "carried out of it, [B*H, n_chunks, ...] fp32.") if spec.causal
        else "States/Norms hold Σ_j k_jᵀ v_j, RStates/RNorms Σ_i s·q_iᵀ dnum_i (+ the final state's gradient).",
        "Grid: (cdiv(max(seq_q, seq_k), CHUNK), cdiv(HEAD_DIM, BLOCK_DT), B * H): program (c, t, bh) takes key-dim",
        "columns t·BLOCK_DT.. of q, k and the states, and walks the value dim BLOCK_DV at a time, twice.",
    ]  # fmt: skip
    lines = _header(spec, "backward (dq, dk, dv of one chunk)") + _signature(spec, pointers, strides, scalars, doc)
    lines += _ids("pid_c,pid_t,pid_bh")
    lines += _chunk_rows("pid_c * CHUNK") + [
        "    offs_t = pid_t * BLOCK_DT + tl.arange(0, BLOCK_DT)  # [BLOCK_DT] this program's key-dim columns",
        "    t_ok = offs_t < HEAD_DIM",
        "    q_ok = rows < seq_q",
        "    k_ok = rows < seq_k",
        "    qt_ok = q_ok[:, None] & t_ok[None, :]",
        "    kt_ok = k_ok[:, None] & t_ok[None, :]",
    ]
    lines += _load_rows("q", "Q", "offs_t", "qt_ok", ".to(tl.float32) * scale  # [CHUNK, BLOCK_DT] s·q")
    lines += _load_rows("k", "K", "offs_t", "kt_ok", ".to(tl.float32)  # [CHUNK, BLOCK_DT]")
    if norm:
        lines.append("    dd = tl.load(DDen + bh * seq_q + rows, mask=q_ok, other=0.0)  # [CHUNK]")
    lines += _decay_lines(spec)
    base = "(bh * n_chunks + pid_c) * HEAD_DIM" if spec.causal else "bh * HEAD_DIM"
    lines.append(f"    chunk_base = {base}")
    lines += _grad_sums(spec) + _grad_products(spec)
    lines += [
        "    dq = dq * scale",
        f"    tl.store(DQ + {_rows_at('dq', 'off_h')} + offs_t[None, :] * stride_dqd, dq.to(DQ.dtype.element_ty),",
        "             mask=qt_ok)",
        f"    tl.store(DK + {_rows_at('dk', 'off_h')} + offs_t[None, :] * stride_dkd, dk, mask=kt_ok)",
    ]
    return lines + _grad_dv(spec)


def _value_step(spec: LinearSpec, loads: tuple[str, ...]) -> list[str]:
    """The head of a walk over the value dim: value tile ``u``'s columns and the loads named in ``loads``
    (``v``, ``do`` [CHUNK, BLOCK_DV]; ``h``, ``g`` [BLOCK_DT, BLOCK_DV], rows offs_t of a [D, Dv] state)."""
    lines = [
        "    for u in range(0, tl.cdiv(HEAD_DIM_V, BLOCK_DV)):",
        "        offs_v = u * BLOCK_DV + tl.arange(0, BLOCK_DV)  # [BLOCK_DV] value columns of this step",
        "        v_ok = offs_v < HEAD_DIM_V",
        "        part = offs_t[:, None] * HEAD_DIM_V + offs_v[None, :]  # [BLOCK_DT, BLOCK_DV] within a [D, Dv] state",
        "        part_ok = t_ok[:, None] & v_ok[None, :]",
    ]
    sources = {
        "v": [f"        v = tl.load(V + {_rows_at('v', 'off_hkv')} + offs_v[None, :] * stride_vd,",
              "                    mask=k_ok[:, None] & v_ok[None, :], other=0.0).to(tl.float32)"],
        "do": [f"        do = tl.load(DNum + {_rows_at('dn', 'off_h')} + offs_v[None, :] * stride_dnd,",
               "                     mask=q_ok[:, None] & v_ok[None, :], other=0.0)"],
        "h": ["        h = tl.load(States + chunk_base * HEAD_DIM_V + part, mask=part_ok, other=0.0)"],
        "g": ["        g = tl.load(RStates + chunk_base * HEAD_DIM_V + part, mask=part_ok, other=0.0)"],
    }  # fmt: skip
    return lines + [line for name in loads for line in sources[name]]


def _grad_sums(spec: LinearSpec) -> list[str]:
    """The first walk over the value dim: ``dp = do vᵀ`` [CHUNK, CHUNK] (causal), and the carried states' terms
    ``iq = do hᵀ``, ``ik = v gᵀ`` [CHUNK, BLOCK_DT]. Only [CHUNK, BLOCK_DV] of v and do are live at a time
    (the whole value dim at once spilled on sm_80)."""
    lines = ["    dp = tl.zeros([CHUNK, CHUNK], tl.float32)"] if spec.causal else []
    lines += [
        "    iq = tl.zeros([CHUNK, BLOCK_DT], tl.float32)",
        "    ik = tl.zeros([CHUNK, BLOCK_DT], tl.float32)",
    ]
    lines += _value_step(spec, ("v", "do", "h", "g"))
    if spec.causal:
        lines.append(f"        dp += {dot(spec, 'do', 'tl.trans(v)')}")
    lines += [f"        iq += {dot(spec, 'do', 'tl.trans(h)')}", f"        ik += {dot(spec, 'v', 'tl.trans(g)')}"]
    if spec.normalize:
        lines += [
            "    z = tl.load(Norms + chunk_base + offs_t, mask=t_ok, other=0.0)  # [BLOCK_DT]",
            "    r = tl.load(RNorms + chunk_base + offs_t, mask=t_ok, other=0.0)",
            "    iq += dd[:, None] * z[None, :]",
            "    ik += r[None, :]",
        ] + (["    dp += dd[:, None]"] if spec.causal else [])
    return lines


def _grad_products(spec: LinearSpec) -> list[str]:
    """dq, dk of the program's columns: the intra-chunk products (causal) plus the carried states' terms, and
    ``a`` (q kᵀ over these columns only: a partial sum over the key dim, linear in each column, so the
    column tiles' parts of dv add up to dv) for the second walk."""
    if not spec.causal:
        return ["    dq = iq", "    dk = ik"]
    lines = [f"    a = {dot(spec, 'q', 'tl.trans(k)')}  # [CHUNK, CHUNK], this column tile's part"]
    lines += _intra_mask(spec, "a") + _intra_mask(spec, "dp")[-1:]
    if not spec.decay:
        return lines + [f"    dq = {dot(spec, 'dp', 'k')} + iq", f"    dk = {dot(spec, 'tl.trans(dp)', 'q')} + ik"]
    return lines + [
        "    wq = tl.exp2((offs_c + 1).to(tl.float32) * ld2)[:, None]  # λ^(a+1)",
        "    length = tl.minimum(seq_k - start, CHUNK)",
        "    wk = tl.exp2(tl.maximum(length - 1 - offs_c, 0).to(tl.float32) * ld2)[:, None]  # λ^(len-1-b)",
        f"    dq = {dot(spec, 'dp', 'k')} + wq * iq",
        f"    dk = {dot(spec, 'tl.trans(dp)', 'q')} + wk * ik",
    ]


def _grad_dv(spec: LinearSpec) -> list[str]:
    """The second walk over the value dim: this column tile's part of dv = aᵀ do + k g, stored (one column
    tile) or added atomically (several)."""
    wk = "wk * " if spec.decay else ""
    lines = _value_step(spec, ("do", "g") if spec.causal else ("g",))
    product = f"{dot(spec, 'tl.trans(a)', 'do')} + {wk}{dot(spec, 'k', 'g')}" if spec.causal else dot(spec, "k", "g")
    lines += [
        f"        dv = {product}  # [CHUNK, BLOCK_DV]",
        f"        dv_ptrs = DV + {_rows_at('dv', 'off_h')} + offs_v[None, :] * stride_dvd",
    ]
    if -(-spec.block_d // spec.block_dt) > 1:
        return lines + ['        tl.atomic_add(dv_ptrs, dv, mask=k_ok[:, None] & v_ok[None, :], sem="relaxed")']
    return lines + ["        tl.store(dv_ptrs, dv, mask=k_ok[:, None] & v_ok[None, :])"]


# ----------------------------------------------------------------------------------------------------- load

def load(spec: LinearSpec):
    """The kernel of ``spec``, rendered into the cache and imported on first use."""
    return load_generated(spec.name, lambda: render(spec))
