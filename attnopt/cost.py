"""The cost model: FLOPs and bytes moved by every variant as sympy expressions, and a roofline clock.

Symbols: ``B`` batch, ``H``/``H_kv`` query/key-value heads, ``S_q``/``S_k`` sequence lengths, ``D``/``D_v``
head dims, ``E`` bytes per element, ``B_N`` key-tile size, ``T`` key tiles a query tile visits (a mask's
parameter: ``n = ceil(S_k/B_N)`` dense, ``(n + 1)/2`` causal, :func:`window_tiles` for windows), ``C`` the
chunk of chunked linear attention. A :class:`Cost` is the kernels a variant launches; each kernel takes

    max(flops / matmul_rate + scores / softmax_rate, bytes / bandwidth) + launch

seconds on a :class:`Hardware`. Counting pairs (query, key) visited: a fused kernel does ``2(D + D_v)``
FLOPs per pair on tensor cores plus online-softmax bookkeeping (max, exp, sum, rescale) per score,
which runs beside the matmuls at its own rate. :data:`H100` is calibrated to measured anchors
(listed in its comment); predictions are for a half-precision run on that GPU, whatever the example's dtype.

A speedup is relative to the site as the model wrote it: unfused eager (two GEMMs and a pointwise
kernel per score op, each reading and writing the S_q x S_k scores) for a manual site, SDPA's flash
kernel (its memory-efficient kernel when given an explicit mask) for an SDPA call.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import sympy

from attnopt import masks
from attnopt.variants.registry import handler_for

B, H, H_KV, SQ, SK, D, DV = sympy.symbols("B H H_kv S_q S_k D D_v", positive=True)
E, BN, T, C = sympy.symbols("E B_N T C", positive=True)
S = sympy.Symbol("S", positive=True)  # Sq = Sk = S, the unknown of :func:`crossover`

BLOCK = 128  # key (and query) tile of the fused kernels
CHUNK = 64  # chunk of chunked linear attention (flash-linear-attention's)
ELEMENT_BYTES = 2  # bf16 / fp16


@dataclass(frozen=True)
class Kernel:
    """One kernel launch: ``flops`` at the hardware's ``rate`` (a key of its rates), ``scores`` through softmax
    bookkeeping, ``bytes`` moved to and from memory."""

    name: str
    rate: str
    flops: sympy.Expr
    bytes: sympy.Expr
    scores: sympy.Expr = sympy.Integer(0)
    launches: int = 1


@dataclass(frozen=True)
class Cost:
    kernels: tuple[Kernel, ...]

    @property
    def flops(self) -> sympy.Expr:
        return sympy.Add(*(k.flops for k in self.kernels))

    @property
    def bytes(self) -> sympy.Expr:
        return sympy.Add(*(k.bytes for k in self.kernels))


@dataclass(frozen=True)
class Hardware:
    name: str
    bandwidth: float  # bytes/s
    launch: float  # seconds per kernel launch
    matmul: dict  # rate name -> FLOP/s
    softmax: dict  # rate name -> scores/s

    def seconds(self, cost: Cost, values: dict) -> sympy.Expr:
        """Roofline time of ``cost`` with ``values`` substituted (a number, or an expression in what is left)."""
        total = sympy.Integer(0)
        for k in cost.kernels:
            compute = k.flops / self.matmul[k.rate] + k.scores / self.softmax.get(k.rate, sympy.oo)
            memory = k.bytes / self.bandwidth
            total += sympy.Max(compute.subs(values), memory.subs(values)) + k.launches * self.launch
        return total


# H100 SXM, bf16. FA2's "flash" rates solve 4D/P + 1/R seconds per score pair for SDPA flash's 353 (D128)
# and 308 (D64) TFLOP/s, S16k full; "mem_efficient" the same for 178 and 134. Bandwidth: 3.0 of 3.35 TB/s,
# which puts fla's chunk_linear_attn (memory-bound by its fp32 chunk states) at its measured ~1 ms.
# "gemm" (cuBLAS) is assumed, not anchored: the unfused GEMMs are memory-bound at attention's D.
H100 = Hardware(
    name="H100 SXM (bf16)",
    bandwidth=3.0e12,
    launch=3e-6,
    matmul={"flash": 413.5e12, "mem_efficient": 265e12, "gemm": 600e12, "pointwise": sympy.oo},
    softmax={"flash": 4.72e12, "mem_efficient": 1.06e12},
)


def _qkvo_bytes() -> sympy.Expr:
    return E * (B * H * SQ * (D + DV) + B * H_KV * SK * (D + DV))


def fused(tiles: sympy.Expr, masked: bool = False, softmax: bool = True, rate: str = "flash",
          name: str = "attention") -> Cost:  # fmt: skip
    """A FlashAttention-style kernel visiting ``tiles`` key tiles per query tile; a materialized mask (shared by
    the heads, as Hugging Face's [B, 1, S_q, S_k]) is read once per visited pair; ``softmax=False`` for
    sigmoid attention (no row max and sum)."""
    pairs = B * H * SQ * tiles * BN
    io = _qkvo_bytes() + (E * pairs / H if masked else 0)
    return Cost((Kernel(name, rate, 2 * pairs * (D + DV), io, pairs if softmax else sympy.Integer(0)),))


def dense_tiles(causal: bool) -> sympy.Expr:
    """Key tiles per query tile of exact attention: all, or up to the diagonal (the diagonal tile whole);
    :func:`window_tiles` with unbounded windows. A partial last tile costs a whole one."""
    n = sympy.ceiling(SK / BN)
    return (n + 1) / 2 if causal else n


def window_tiles(left: int, right: int, block: int = BLOCK) -> sympy.Expr:
    """Key tiles per query tile under the window i - left <= j <= i + right (Sq = Sk), on average over the
    n = ceil(S_k / B_N) query tiles: tile t visits tiles t - min(t, a) .. t + min(n - 1 - t, r) with
    a = ceil(left / block), r = ceil(right / block); the sums of those mins are closed forms in Min(a, n - 1)."""
    n = sympy.ceiling(SK / BN)

    def reach(tiles: int) -> sympy.Expr:  # sum over t of min(t, tiles)
        m = sympy.Min(tiles, n - 1)
        return m * n - m * (m + 1) / 2

    return 1 + (reach(-(-left // block)) + reach(-(-right // block))) / n


def exact(causal: bool = False, masked: bool = False) -> Cost:
    return fused(dense_tiles(causal), masked, name="exact")


def sparse(tiles: sympy.Expr = T, masked: bool = False) -> Cost:
    """A structured mask: key tiles skipped from the descriptor (a site's mask tensor, if it goes along,
    is read on the visited tiles only)."""
    return fused(tiles, masked, name="sparse")


def mask_tiles(mask: masks.Mask, sq: int, sk: int, heads: int = 1) -> float:
    """Key tiles per query tile that ``mask`` visits at these sizes (its block map: what the kernel visits; a
    strided mask runs on keys in residue order, see :func:`attnopt.masks.residue_order`)."""
    mask = masks.residue_order(mask) or mask
    bm = mask.block_map(sq, sk, BLOCK, BLOCK, heads if mask.head_dependent else 1)
    return float(bm.visited().double().mean())


def sigmoid(causal: bool = False, masked: bool = False) -> Cost:
    return fused(dense_tiles(causal), masked, softmax=False, name="sigmoid")


def linear(causal: bool = True, normalize: bool | str = True) -> Cost:
    """Chunked linear attention (chunk ``C``): causal, per token, the intra-chunk (QKᵀ ⊙ M)V and the
    inter-chunk Q·state and state update; the fp32 chunk states are written and read back.
    Non-causal: φ(K)ᵀV once, then φ(Q)·(φ(K)ᵀV). ``normalize`` (True or "sum": by φ(Q)(φ(K)ᵀ1)) carries
    one more value column."""
    dv = DV + 1 if normalize in (True, "sum") else DV
    if not causal:
        flops = 2 * B * H * D * dv * (SQ + SK)
        return Cost((Kernel("kv_state", "gemm", flops, _qkvo_bytes() + 8 * B * H * D * dv, launches=2),))
    flops = B * H * SQ * (2 * C * (D + dv) + 4 * D * dv)
    states = 2 * 4 * B * H * (SQ / C) * D * dv
    return Cost((Kernel("chunked_linear", "gemm", flops, _qkvo_bytes() + states, launches=3),))


def eager(score_ops: int) -> Cost:
    """Attention as written in eager PyTorch: QKᵀ, ``score_ops`` pointwise kernels over the scores (scale,
    masks, softmax), then PV; every one reads or writes the whole B·H·S_q·S_k score tensor."""
    pairs = B * H * SQ * SK
    return Cost((
        Kernel("qk", "gemm", 2 * pairs * D, E * (B * H * SQ * D + B * H_KV * SK * D + pairs)),
        Kernel("score_ops", "pointwise", sympy.Integer(0), 2 * score_ops * E * pairs, launches=score_ops),
        Kernel("pv", "gemm", 2 * pairs * DV, E * (pairs + B * H_KV * SK * DV + B * H * SQ * DV)),
    ))  # fmt: skip


@dataclass(frozen=True)
class Shape:
    """A site's problem: sizes, whether it is causal or carries a materialized mask, and how it is written."""

    batch: int
    heads: int
    kv_heads: int
    sq: int
    sk: int
    d: int
    dv: int
    causal: bool = False
    masked: bool = False
    kind: str = "manual"  # "manual" | "sdpa" | "mha", as in the report
    own_mask: masks.Mask | None = None  # the site's mask recognized as a structured one (what exact-sparse runs)

    @classmethod
    def from_site(cls, site: Any, seq_len: int | None = None) -> "Shape | None":
        """The shape of a report :class:`~attnopt.report.Site`, at ``Sq = Sk = seq_len`` when given; None when
        a size is unknown (symbolic without a hint)."""
        seq = (seq_len, seq_len) if seq_len else tuple(site.seq)
        sizes = (site.batch or 1, *site.heads, *seq, *site.head_dims)
        if len(sizes) != 7 or not all(isinstance(x, int) for x in sizes):
            return None
        return cls(*sizes, causal=site.causal != "none", masked=site.mask != "none", kind=site.kind)

    def values(self) -> dict:
        return {B: self.batch, H: self.heads, H_KV: self.kv_heads, SQ: self.sq, SK: self.sk, D: self.d,
                DV: self.dv, E: ELEMENT_BYTES, BN: BLOCK, C: CHUNK}  # fmt: skip


def original(shape: Shape) -> Cost:
    """The site as written: SDPA's kernel for an SDPA call, else eager (one score op for the scale, one per
    mask, one for the softmax)."""
    if shape.kind == "sdpa":
        if shape.masked:
            return fused(dense_tiles(False), masked=True, rate="mem_efficient", name="sdpa_mem_efficient")
        return fused(dense_tiles(shape.causal), name="sdpa_flash")
    return eager(2 + int(shape.masked) + int(shape.causal))


def variant_cost(variant: Any, shape: Shape) -> Cost | None:
    """The cost of ``variant`` at a site of ``shape``, from its handler (:mod:`attnopt.variants.registry`); None
    when it has no cost model."""
    return handler_for(variant).cost(variant, shape)


def seconds(cost: Cost, shape: Shape, hw: Hardware = H100) -> float:
    return float(hw.seconds(cost, shape.values()))


def predict_seconds(variant: Any, shape: Shape, hw: Hardware = H100) -> float | None:
    cost = variant_cost(variant, shape)
    return None if cost is None else seconds(cost, shape, hw)


def predict_speedup(site: Any, variant: Any, seq_len: int | None = None, hw: Hardware = H100) -> float | None:
    """Predicted time of ``site`` as written over its time with ``variant``, at ``seq_len`` (default: its own)."""
    shape = site if isinstance(site, Shape) else Shape.from_site(site, seq_len)
    if shape is None:
        return None
    new = predict_seconds(variant, shape, hw)
    return None if new is None else seconds(original(shape), shape, hw) / new


def annotate(report: Any, policy: Any) -> None:
    """Sets every site's ``predicted_speedup`` for what was decided, at the policy's ``seq_len``."""
    for site in report.sites:  # a kept site runs as written: Keep's cost is the original's (speedup 1)
        site.predicted_speedup = None if site.variant is None else predict_speedup(site, site.variant, policy.seq_len)
        site.predicted_for = H100.name.split()[0] if site.predicted_speedup is not None else ""  # "H100"


def crossover(a: Any, b: Any, shape: Shape, hw: Hardware = H100) -> list[float]:
    """The sequence lengths S (Sq = Sk = S, other sizes from ``shape``) where the faster of ``a`` and ``b``
    (variants or :class:`Cost`) changes, solved with sympy branch by branch of the roofline's max/min (tile
    counts relaxed to fractions)."""
    costs = [x if isinstance(x, Cost) else variant_cost(x, shape) for x in (a, b)]
    if None in costs:
        raise ValueError(f"no cost model for {a if costs[0] is None else b!r}")
    values = {**shape.values(), SQ: S, SK: S}
    relax = lambda e: e.replace(sympy.ceiling, lambda x: x)  # noqa: E731  (whole tiles -> fractions, to solve)
    ta, tb = relax(hw.seconds(costs[0], values)), relax(hw.seconds(costs[1], values))
    roots: set[float] = set()
    for branch in _branches(ta - tb):
        roots.update(float(r) for r in sympy.solve(branch, S) if r.is_real and r > 0)

    def sign(s: float) -> int:  # of ta - tb, 0 within rounding
        a, b = float(ta.subs(S, s)), float(tb.subs(S, s))
        return 0 if abs(a - b) <= 1e-9 * max(a, b) else (1 if a > b else -1)

    return sorted(r for r in roots if sign(r * (1 - 1e-6)) != sign(r * (1 + 1e-6)))


def _branches(expr: sympy.Expr):
    """``expr`` with each max/min replaced by one of its arguments, every combination."""
    pieces = sorted(expr.atoms(sympy.Max, sympy.Min), key=sympy.default_sort_key)
    if not pieces:
        yield expr
        return
    for arg in pieces[0].args:
        yield from _branches(expr.subs(pieces[0], arg))
