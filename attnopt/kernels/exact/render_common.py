r"""Pieces of generated source shared by the forward and backward kernels.

Every kernel of a spec scores the same way; only the orientation of the score tile differs. The
forward and ``bwd_dq`` kernels hold a query tile and stream key tiles, so their scores are
``[BLOCK_M, BLOCK_N]``; ``bwd_dkdv`` holds a key tile and streams query tiles and works on the
transposed ``[BLOCK_N, BLOCK_M]`` tile (``Sᵀ = K Qᵀ``), so that ``dV = Pᵀ dO`` and ``dK = dSᵀ Q``
are plain products. In every kernel the names are the same: ``start_m``/``start_n`` are the first
query/key row of the current tiles, ``offs_m``/``offs_n`` the offsets within a tile and
``rows``/``cols`` the absolute query/key indices.

Scores are kept in base 2 (``s = log2(e) * score``) so that the softmax uses ``exp2``. For one
element (query ``i``, key ``j``, query head ``h``)::

    score = softcap(scale * q_i·k_j) + mask_ij + bias_ij      (masked elements: -inf)
    softcap(x) = cap * tanh(x / cap),   tanh(y) = 1 - 2 / (exp(2y) + 1)

(the last form is exact at both infinities: ``exp(2y)`` overflowing to ``inf`` gives 1, and
underflowing to 0 gives -1). The bias is an additive tensor, ALiBi ``-slope_h * |j - i - (Sk - Sq)|``
or a relative position bias ``table[bucket[j - i + Sq - 1], h]``. The keep test combines the causal
diagonal, the key bound (``seq_k`` or the row's key-padding length), and a boolean mask.

Dropout draws ``u = tl.rand(seed, philox_offset + (bh * seq_q + i) * seq_k + j)`` (Philox, counter =
the element's flat index in ``[B * Hq, Sq, Sk]``, int64) and keeps the element where
``u >= dropout_p``; every kernel of a call computes the same counter for the same element, so the
backward replays the forward's mask exactly.

Pointer arithmetic: a tile's first row enters as an int64 scalar (``start.to(tl.int64) * stride``) and
the in-tile offsets stay int32, so no offset overflows int32 for long sequences.
"""

from __future__ import annotations

from dataclasses import dataclass

from attnopt.codegen.score_expr import parse
from attnopt.codegen.score_triton import expr_pointers, expr_strides
from attnopt.codegen.spec import CAUSAL_BOTTOM_RIGHT, CAUSAL_NAMES, CAUSAL_NONE, CAUSAL_TOP_LEFT, KernelSpec
from attnopt.codegen.triton_text import LN2, LOG2E, and_, dot, paren, tile_loop
from attnopt.kernels.exact.render_score_mod import score_mod_lines

FLT_MAX = 3.4028234663852886e38  # the largest finite fp32
SATURATED = 2.0**30  # base-2 score terms below -SATURATED count as a finite "masked" fill, see _add_scores


@dataclass(frozen=True)
class Tile:
    """Orientation of a score tile: ``[BLOCK_M, BLOCK_N]`` or transposed ``[BLOCK_N, BLOCK_M]``."""

    transposed: bool

    @property
    def shape(self) -> str:
        return "[BLOCK_N, BLOCK_M]" if self.transposed else "[BLOCK_M, BLOCK_N]"

    @property
    def r(self) -> str:
        """Broadcast of a ``[BLOCK_M]`` (query) vector onto the tile."""
        return "[None, :]" if self.transposed else "[:, None]"

    @property
    def c(self) -> str:
        """Broadcast of a ``[BLOCK_N]`` (key) vector onto the tile."""
        return "[:, None]" if self.transposed else "[None, :]"


QUERY_TILE = Tile(transposed=False)
KEY_TILE = Tile(transposed=True)


# ----------------------------------------------------------------------------------------------------------------
# Arguments


def feature_pointers(spec: KernelSpec) -> list[str]:
    """Pointer arguments of the spec's optional features, in signature order."""
    names = []
    if spec.mask != "none":
        names.append("Mask")
    if spec.bias == "tensor":
        names.append("Bias")
    elif spec.bias == "alibi":
        names.append("Slopes")
    elif spec.bias == "relpos":
        names += ["RelTable", "RelBucket"]
    if spec.key_padding:
        names.append("KvLen")
    if spec.score_mod:
        names += expr_pointers(parse(spec.score_mod))
    return names


def feature_strides(spec: KernelSpec) -> list[str]:
    names = []
    if spec.mask != "none":
        names += [f"stride_mask_{d}" for d in "bhmn"]
    if spec.bias == "tensor":
        names += [f"stride_bias_{d}" for d in "bhmn"]
    elif spec.bias == "alibi":
        names += ["stride_slopes_b", "stride_slopes_h"]
    elif spec.bias == "relpos":
        names += ["stride_rel_n", "stride_rel_h"]
    if spec.score_mod:
        names += expr_strides(parse(spec.score_mod))
    return names


def feature_scalars(spec: KernelSpec) -> list[str]:
    names = ["num_heads", "seq_q", "seq_k", "scale"]
    if spec.softcap:
        names.append("softcap")
    if spec.dropout:
        names += ["dropout_p", "seed", "philox_offset"]
    return names


def strides(prefix: str, dims: str = "bhmd") -> list[str]:
    return [f"stride_{prefix}{d}" for d in dims]


# ----------------------------------------------------------------------------------------------------------------
# Module text


def header(spec: KernelSpec, summary: str) -> list[str]:
    d_note = f" (padded to {spec.block_d})" if padded_d(spec) else ""
    dv_note = f" (padded to {spec.block_dv})" if padded_dv(spec) else ""
    extras = [f"bias {spec.bias}"]
    extras += [name for name in ("key_padding", "softcap", "dropout", "write_ds") if getattr(spec, name)]
    return [
        "# attnopt generated kernel: do not edit, it is rewritten from its spec by attnopt.kernels.exact.render.",
        f"# spec: {spec.to_json()}",
        "#",
        f"# {summary}",
        f"# dtype {spec.dtype}, causal {CAUSAL_NAMES[spec.causal]}, mask {spec.mask}, {', '.join(extras)},",
        f"# head_dim {spec.head_dim}{d_note}, head_dim_v {spec.head_dim_v}{dv_note}, GQA group {spec.group},",
        f"# tiles {spec.block_m}x{spec.block_n}, num_warps {spec.num_warps}, num_stages {spec.num_stages}.",
        *([f"# score_mod: {spec.score_mod}"] if spec.score_mod else []),
        "",
        "import triton",
        "import triton.language as tl",
        "",
    ]


def opening(spec: KernelSpec, summary: str, names: tuple[str, ...], doc: list[str]) -> list[str]:
    """A kernel module up to its body: :func:`header`, :func:`constants` and :func:`signature`."""
    return header(spec, summary) + constants(spec) + signature(spec, names, doc)


def constants(spec: KernelSpec) -> list[str]:
    return [
        f"BLOCK_M = tl.constexpr({spec.block_m})",
        f"BLOCK_N = tl.constexpr({spec.block_n})",
        f"HEAD_DIM = tl.constexpr({spec.head_dim})",
        f"BLOCK_D = tl.constexpr({spec.block_d})",
        f"HEAD_DIM_V = tl.constexpr({spec.head_dim_v})",
        f"BLOCK_DV = tl.constexpr({spec.block_dv})",
        f"GROUP = tl.constexpr({spec.group})",
        f"LOG2E = tl.constexpr({LOG2E!r})",
        f"LN2 = tl.constexpr({LN2!r})",
        f"FLT_MAX = tl.constexpr({FLT_MAX!r})",
        f"SATURATED = tl.constexpr({SATURATED!r})",
        "",
        "",
    ]


def signature(spec: KernelSpec, names: tuple[str, ...], doc: list[str]) -> list[str]:
    """``@triton.jit`` and the ``def`` line of the kernel; ``doc`` lines form its docstring."""
    pointers = [n for n in names if not n.startswith("stride_") and n[0].isupper()]
    stride_names = [n for n in names if n.startswith("stride_")]
    scalars = [n for n in names if n not in pointers and n not in stride_names]
    jit = '@triton.jit(do_not_specialize=["seed", "philox_offset"])' if "seed" in names else "@triton.jit"
    lines = [jit, f"def {spec.name}("]
    for i in range(0, len(pointers), 8):
        lines.append("    " + ", ".join(pointers[i:i + 8]) + ",")
    for i in range(0, len(stride_names), 4):
        lines.append("    " + ", ".join(stride_names[i:i + 4]) + ",")
    lines += ["    " + ", ".join(scalars) + ",", "):"]
    lines += ['    """' + doc[0]] + [f"    {line}" if line else "" for line in doc[1:]] + ['    """']
    return lines


def feature_doc(spec: KernelSpec) -> list[str]:
    """Docstring lines describing the feature arguments."""
    lines = []
    if spec.mask != "none":
        meaning = "True = attend (loaded as uint8)" if spec.mask == "bool" else "added to the scores"
        lines.append(f"Mask is read as [B, H, seq_q, seq_k] through its strides (0 on broadcast dims); {meaning}.")
    if spec.bias == "tensor":
        lines.append("Bias is read as [B, H, seq_q, seq_k] through its strides and added to the scores.")
    elif spec.bias == "alibi":
        lines.append("Slopes [B, H] (fp32, stride 0 on a broadcast batch): ALiBi bias")
        lines.append("-slope * |j - i - (seq_k - seq_q)|.")
    elif spec.bias == "relpos":
        lines.append("RelTable [num_buckets, H], RelBucket [seq_q + seq_k - 1] int32:")
        lines.append("bias table[bucket[j - i + seq_q - 1], h].")
    if spec.key_padding:
        lines.append("KvLen [B] int32: keys j >= KvLen[b] are masked for batch row b.")
    if spec.softcap:
        lines.append("softcap > 0: scores are softcap * tanh(scale * q·k / softcap) before mask and bias.")
    if spec.score_mod:
        lines.append("ModBuf<i>: the tensors the score_mod captured, read through their strides (see the header).")
    if spec.dropout:
        lines.append("Dropout keeps element (bh, i, j) where")
        lines.append("tl.rand(seed, philox_offset + (bh * seq_q + i) * seq_k + j) >= dropout_p.")
    return lines


# ----------------------------------------------------------------------------------------------------------------
# Kernel body pieces


def padded_d(spec: KernelSpec) -> bool:
    return spec.head_dim != spec.block_d


def padded_dv(spec: KernelSpec) -> bool:
    return spec.head_dim_v != spec.block_dv


def d_ok(spec: KernelSpec, bcast: str) -> str:
    """The q/k head-dim mask broadcast by ``bcast`` when the head dim is padded, else nothing."""
    return f"d_ok{bcast}" if padded_d(spec) else ""


def dv_ok(spec: KernelSpec, bcast: str) -> str:
    return f"dv_ok{bcast}" if padded_dv(spec) else ""


def head_program_ids(longest_first: bool = False) -> list[str]:
    """Program ids of a kernel with one program per (query tile, batch * query head).

    ``longest_first`` (causal kernels that stream key tiles): query tile ``i`` sees about ``i + 1`` key tiles,
    so the programs run the query tiles in reverse: the GPU starts the longest first and the last wave,
    made of the shortest, ends soon after the others (in id order the longest would start last). ``bwd_dkdv``
    needs no reversal: its key tile 0 is the one the most query rows see.
    """
    if longest_first:
        first = "    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)  # causal: the longest query tiles first"
    else:
        first = "    pid_m = tl.program_id(0)"
    return [
        first,
        "    pid_bh = tl.program_id(1)",
        "    off_b = (pid_bh // num_heads).to(tl.int64)",
        "    off_h = (pid_bh % num_heads).to(tl.int64)",
    ]


def query_tile_prologue(spec: KernelSpec, extra_bases: tuple[str, ...] = ()) -> list[str]:
    """The opening of the kernels that hold one query tile and stream key tiles (the forward and
    ``bwd_dq``): ids, offsets, scalars, base pointers (``extra_bases`` after q's), the dropout row
    counters and the query tile ``q``."""
    lines = [
        *head_program_ids(longest_first=spec.causal != CAUSAL_NONE),
        "    off_hkv = off_h // GROUP  # GQA: query head h reads key/value head h // GROUP",
        "    start_m = pid_m * BLOCK_M",
        *offsets(spec),
        "    rows = start_m + offs_m  # [BLOCK_M] query rows",
        "    row_ok = rows < seq_q  # [BLOCK_M]",
        *scalar_setup(spec),
        *kv_end_line(spec),
        "",
        "    q_base = Q + off_b * stride_qb + off_h * stride_qh + tl.cast(start_m, tl.int64) * stride_qm",
        *extra_bases,
        "    k_base = K + off_b * stride_kb + off_hkv * stride_kh",
        "    v_base = V + off_b * stride_vb + off_hkv * stride_vh",
        *head_bases(spec, "    ", "pid_bh.to(tl.int64)"),
    ]
    if spec.dropout:
        lines.append("    drop_row = drop_base + rows.to(tl.int64) * seq_k  # [BLOCK_M] Philox counter of (row, j=0)")
    return lines + [
        "    q = tl.load(q_base + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,",
        f"                mask={and_('row_ok[:, None]', d_ok(spec, '[None, :]'))}, other=0.0)  # [BLOCK_M, BLOCK_D]",
    ]


def key_loop_head(spec: KernelSpec, boundary: bool) -> tuple[list[str], list[str]]:
    """The ``for`` line over key tiles of a query tile (interior tiles, or ``boundary`` ones with the
    per-element key tests), the key indices, and the structural keep terms for :func:`score_lines`."""
    ind = "        "
    if boundary and spec.causal == CAUSAL_NONE and spec.direction == "fwd" and not spec.strided_kv:
        # Without causality the boundary is at most one tile: a branch, not a second loop (with tensor descriptors
        # this saves 11 registers on sm_90a; with pointer loads the branch costs registers, so they keep the loop).
        lines = ["", "    if full_end < end:  # the partial last key tile", f"{ind}start_n = full_end"]
    else:
        bounds = ("full_end", "end", "boundary") if boundary else ("0", "full_end", "interior")
        lines = ["", f"    {tile_loop('tile_n', bounds[0], bounds[1], 'BLOCK_N')}  # {bounds[2]} key tiles",
                 f"{ind}start_n = tile_n * BLOCK_N  # first key row of the tile"]
    if boundary or uses_key_indices(spec):
        lines.append(f"{ind}cols = start_n + offs_n  # [BLOCK_N] key rows")
    keep_terms = []
    if boundary:
        lines.append(f"{ind}col_ok = cols < {key_end(spec)}  # [BLOCK_N]")
        keep_terms = [t for t in ("col_ok[None, :]", causal_test(spec, QUERY_TILE)) if t]
    return lines, keep_terms


def offsets(spec: KernelSpec) -> list[str]:
    lines = [
        "    offs_m = tl.arange(0, BLOCK_M)  # [BLOCK_M] query rows within a tile",
        "    offs_n = tl.arange(0, BLOCK_N)  # [BLOCK_N] key rows within a tile",
        "    offs_d = tl.arange(0, BLOCK_D)  # [BLOCK_D]",
        "    offs_dv = tl.arange(0, BLOCK_DV)  # [BLOCK_DV]",
    ]
    if padded_d(spec):
        lines.append("    d_ok = offs_d < HEAD_DIM  # [BLOCK_D] padded head dim")
    if padded_dv(spec):
        lines.append("    dv_ok = offs_dv < HEAD_DIM_V  # [BLOCK_DV] padded value head dim")
    return lines


def scalar_setup(spec: KernelSpec) -> list[str]:
    """Per-program scalars derived from the runtime arguments."""
    if spec.softcap:
        lines = [
            "    cap_scale2 = scale * (2.0 * LOG2E) / softcap  # exp(2 * scale * qk / softcap) = exp2(qk * cap_scale2)",
            "    cap_log2 = softcap * LOG2E",
        ]
    else:
        lines = ["    qk_scale = scale * LOG2E  # scores in base 2"]
    if spec.causal == CAUSAL_BOTTOM_RIGHT:
        lines.append("    causal_offset = seq_k - seq_q  # bottom-right: query i sees keys j <= i + causal_offset")
    if spec.bias == "alibi":
        lines.append("    seq_diff = seq_k - seq_q  # ALiBi distances are bottom-right aligned")
    if spec.dropout:
        lines.append("    drop_scale = 1.0 / (1.0 - dropout_p)")
    return lines


def head_bases(spec: KernelSpec, ind: str, bh: str) -> list[str]:
    """Per-query-head bases of the feature tensors (``off_b``, ``off_h`` int64; ``bh`` the flat query head)."""
    lines = []
    if spec.mask != "none":
        lines.append(f"{ind}mask_base = Mask + off_b * stride_mask_b + off_h * stride_mask_h")
    if spec.bias == "tensor":
        lines.append(f"{ind}bias_base = Bias + off_b * stride_bias_b + off_h * stride_bias_h")
    elif spec.bias == "alibi":
        lines.append(f"{ind}alibi_slope2 = tl.load(Slopes + off_b * stride_slopes_b + off_h * stride_slopes_h) * LOG2E")
    elif spec.bias == "relpos":
        lines.append(f"{ind}rel_base = RelTable + off_h * stride_rel_h")
    if spec.dropout:
        lines.append(f"{ind}drop_base = philox_offset + {bh} * seq_q * seq_k  # Philox counter of element (i=0, j=0)")
    return lines


def key_end(spec: KernelSpec) -> str:
    """The name of the exclusive key bound: the row's key-padding length or ``seq_k``."""
    return "kv_end" if spec.key_padding else "seq_k"


def kv_end_line(spec: KernelSpec) -> list[str]:
    if not spec.key_padding:
        return []
    return ["    kv_end = tl.minimum(tl.maximum(tl.load(KvLen + off_b), 0), seq_k)  # keys j >= kv_end are padding"]


def tile_ptrs(name: str, tile: Tile) -> str:
    """Pointers of a ``[B, H, Sq, Sk]`` feature tensor over the current score tile."""
    tile_start = f"tl.cast(start_m, tl.int64) * stride_{name}_m + tl.cast(start_n, tl.int64) * stride_{name}_n"
    return (f"({name}_base + {tile_start}"
            f"\n{{ind}}             + offs_m{tile.r} * stride_{name}_m + offs_n{tile.c} * stride_{name}_n)")


def score_lines(spec: KernelSpec, tile: Tile, ind: str, ld_ok: str, keep_terms: list[str]) -> list[str]:
    """From ``qk`` (the raw dot products of the tile) to ``s``, its masked base-2 scores; softcap keeps
    ``t = tanh(scale * qk / softcap)`` for the backward. ``ld_ok`` guards the loads of per-element
    tensors; ``keep_terms`` are the structural tests of this loop (causal diagonal, key bound)."""
    shape = tile.shape
    load_kw = f", mask={ld_ok}" if ld_ok else ""
    keep_terms = list(keep_terms)
    if spec.score_mod:
        lines = score_mod_lines(spec, tile, ind, ld_ok)
        if tile.transposed and ld_ok:  # rows past seq_q must give P = 0 (not NaN) in the dK, dV sums
            keep_terms.append(ld_ok)
    elif spec.softcap:
        lines = [
            f"{ind}e = tl.exp2(qk * cap_scale2)  # {shape}",
            f"{ind}t = 1.0 - 2.0 / (e + 1.0)  # {shape} tanh(scale * qk / softcap)",
            f"{ind}s = t * cap_log2  # {shape} base-2 softcapped scores",
        ]
    else:
        lines = [f"{ind}s = qk * qk_scale  # {shape} base-2 scores"]
    if spec.mask == "additive":
        lines += [
            f"{ind}mask_ptrs = {tile_ptrs('mask', tile).format(ind=ind)}  # {shape}",
            *_add_scores(f"tl.load(mask_ptrs{load_kw}, other=0.0)", ind, shape),
        ]
    if spec.bias == "tensor":
        lines += [
            f"{ind}bias_ptrs = {tile_ptrs('bias', tile).format(ind=ind)}  # {shape}",
            *_add_scores(f"tl.load(bias_ptrs{load_kw}, other=0.0)", ind, shape),
        ]
    elif spec.bias == "alibi":
        lines.append(f"{ind}s -= alibi_slope2 * tl.abs(cols{tile.c} - rows{tile.r} - seq_diff).to(tl.float32)")
    elif spec.bias == "relpos":
        lines += [
            f"{ind}rel = cols{tile.c} - rows{tile.r} + seq_q - 1  # {shape} relative position j - i, from 0",
            f"{ind}bucket = tl.load(RelBucket + rel{load_kw}, other=0)  # {shape}",
            *_add_scores(f"tl.load(rel_base + bucket * stride_rel_n{load_kw}, other=0.0)", ind, shape),
        ]
    if spec.mask == "bool":
        lines += [
            f"{ind}mask_ptrs = {tile_ptrs('mask', tile).format(ind=ind)}  # {shape}",
            f"{ind}attend = tl.load(mask_ptrs{load_kw}, other=0)  # {shape}",
        ]
        keep_terms.append("attend != 0")
    if keep_terms:
        keep = keep_terms[0] if len(keep_terms) == 1 else " & ".join(paren(term) for term in keep_terms)
        lines += [
            f"{ind}keep = {keep}  # {shape}",
            f'{ind}s = tl.where(keep, s, float("-inf"))',
        ]
    return lines


def _add_scores(load: str, ind: str, shape: str) -> list[str]:
    """Adds an additive score term (natural log units) to the base-2 scores ``s``.

    ``-inf`` stays ``-inf`` (masked: weight 0, a row of them gives zeros). A finite term below
    ``-SATURATED`` in base 2 (about -7.4e8: a finite mask fill such as ``finfo(dtype).min`` or -1e9)
    saturates at ``-FLT_MAX``: its weight is 0 next to any ordinary score, and a row masked only by such
    fills averages V over them, as the reference does. Saturating keeps the fill finite (``finfo.min``
    would overflow to ``-inf`` in base 2) and makes every such score, and the row's max, exactly
    ``-FLT_MAX``, so that the backward recovers the row from ``lse = -FLT_MAX`` (fp32 cannot hold
    ``max + log Σ`` at that magnitude).
    """
    return [
        f"{ind}add = {load}.to(tl.float32)  # {shape}",
        f"{ind}add2 = add * LOG2E  # {shape} (-inf for -inf, or a finite term beyond -FLT_MAX * ln 2)",
        f'{ind}s += tl.where(add2 < -SATURATED, tl.where(add == float("-inf"), add, -FLT_MAX), add2)',
    ]


def normalizes_rows(spec: KernelSpec) -> bool:
    """Whether the backward renormalizes each row's recomputed probabilities by their sum.

    ``P = exp2(s - lse2)`` sums to 1 unless ``lse2`` lost ``log2(Σ exp2(s - max))`` to rounding, which
    happens when a row's scores are huge and negative: a row masked entirely by a large finite fill.
    Only additive score terms (mask, bias tensor, relative position table) produce such rows.
    """
    return spec.mask == "additive" or spec.bias in ("tensor", "relpos")


def uses_key_indices(spec: KernelSpec) -> bool:
    """Whether an interior tile (no bound or causal test) still needs the absolute key indices ``cols``."""
    return spec.bias in ("alibi", "relpos") or spec.dropout or spec.write_ds or bool(spec.score_mod)


def causal_test(spec: KernelSpec, tile: Tile) -> str:
    """The per-element causal test, or nothing without causality."""
    if spec.causal == CAUSAL_NONE:
        return ""
    offset = " + causal_offset" if spec.causal == CAUSAL_BOTTOM_RIGHT else ""
    return f"cols{tile.c} <= rows{tile.r}{offset}"


def dropout_keep(tile: Tile, ind: str) -> list[str]:
    return [f"{ind}kept = tl.rand(seed, drop_row{tile.r} + cols{tile.c}) >= dropout_p  # {tile.shape} keep-mask"]


def query_key_range(spec: KernelSpec) -> list[str]:
    """For a query tile: key tiles ``[0, full_end)`` need no element test, ``[full_end, end)`` do."""
    kend = key_end(spec)
    if spec.causal == CAUSAL_NONE:
        return [
            f"    # Key tiles [0, full_end) lie inside {kend}; [full_end, {kend}) is the partial last tile.",
            f"    full_end = {kend} // BLOCK_N * BLOCK_N",
            f"    end = {kend}",
        ]
    if spec.causal == CAUSAL_TOP_LEFT:
        lines = ["    # Causal, top-left: query i sees keys j <= i."]
        first_diag, last_diag = "start_m + 1", "tl.minimum(start_m + BLOCK_M, seq_q)"
    else:
        lines = ["    # Causal, bottom-right: query i sees keys j <= i + causal_offset."]
        first_diag = "start_m + causal_offset + 1"
        last_diag = "tl.minimum(start_m + BLOCK_M, seq_q) + causal_offset"
    return lines + [
        "    # Key tiles [0, full_end) are seen whole by every row of this query tile (no element test);",
        f"    # [full_end, end) cross the diagonal or {kend}; tiles from end on lie above the diagonal (skipped).",
        f"    full_end = tl.minimum({kend} // BLOCK_N * BLOCK_N, tl.maximum({first_diag}, 0) // BLOCK_N * BLOCK_N)",
        f"    end = tl.minimum({kend}, tl.maximum({last_diag}, 0))",
    ]
