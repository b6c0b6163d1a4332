r"""Exact attention on CPU in plain PyTorch ops, tile by tile (FlashAttention-2's algorithm).

The queries are cut in tiles of rows and the keys in tiles of columns (:func:`tile_size`: one tile of scores
``[B, Hq, rows, cols]`` fits in cache). For each query tile the forward walks the key tiles, keeps each row's
running max ``m`` and sum ``l`` and rescales the output accumulator (the online softmax); it returns ``out``
and ``lse = m + log l``. The backward recomputes each tile's probabilities from ``lse``
(``P = exp(S - lse)``) and accumulates ``dQ``, ``dK``, ``dV`` (and the additive mask's gradient). Every tensor
op is vectorized over batch and heads; the largest temporaries are tiles, never ``[Sq, Sk]``.

It computes every feature of the exact op (see :mod:`attnopt.kernels.exact.reference` for the semantics):
masks (bool or additive, any broadcast shape), both causal alignments, softcap, GQA without repeating k and v
(the queries are laid out ``[B, Hkv, Sq·G, D]``, row ``i`` of group member ``g`` at ``i·G + g``, so a query
tile of every head of a group is one matmul against one key tile), dropout and fully masked rows (zeros,
``lse = -inf``).

Tiles that no query sees are skipped: beyond the causal diagonal, and where the mask hides every entry for
every batch and head (:func:`_live_tiles`; a fill ``<= HIDDEN_BELOW`` such as ``finfo.min`` counts as hidden
in rows that see a key with an ordinary score, whose softmax gives such fills a weight of exactly 0).

Dropout draws the reference's keep-mask (``torch.rand`` of ``[B, Hq, Sq, Sk]`` from a generator seeded by
``seed``), so the CPU op stays a pure function of its seed: only with ``dropout_p > 0`` is an ``[Sq, Sk]``
tensor (the bool keep-mask) allocated.

A row whose every key is hidden by a huge finite fill averages V, and fp32 cannot hold its ``lse = m + log l``;
the backward renormalizes such rows (``lse < HIDDEN_BELOW``) by their recomputed sum, as the reference does.
"""

from __future__ import annotations

import math
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from attnopt.codegen.spec import CAUSAL_BOTTOM_RIGHT, CAUSAL_NONE
from attnopt.kernels.layout import HIDDEN_BELOW, acc_dtype

TILE_BUDGET = 1 << 20  # elements of one tile of scores [B, Hq, rows, cols]: 4 MiB in fp32
MIN_TILE, MAX_TILE = 16, 1024


def tile_size(batch_heads: int, sq: int, sk: int) -> tuple[int, int]:
    """``(rows, cols)``: powers of two with ``batch_heads · rows · cols <= TILE_BUDGET`` (within the bounds)."""
    side = 1 << max(int(math.log2(max(TILE_BUDGET // max(batch_heads, 1), 1))) // 2, 0)
    side = max(MIN_TILE, min(MAX_TILE, side))
    return min(side, _pow2_ceil(sq)), min(side, _pow2_ceil(sk))


def _pow2_ceil(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


_POOL: list[ThreadPoolExecutor] = []
_POOL_LOCK = threading.Lock()


def workers() -> int:
    """How many query tiles run at once: torch's intra-op thread count (each tile's ops then run on one thread)."""
    return max(torch.get_num_threads(), 1)


def parallel_rows(tiles: list, work: Callable[[int, object], None]) -> None:
    """Runs ``work(worker, tile)`` for every tile, the tiles dealt round-robin to :func:`workers` threads.

    Each op of a tile is small (one tile); run on torch's intra-op threads, every op would pay a barrier of
    all threads, which on a loaded machine costs more than the op (measured: 5x slower on 2 busy cores).
    So the tiles run in parallel instead, each worker's ops on one thread: ``torch.set_num_threads(1)``
    while the workers run (the pool's threads start then, and keep one thread per op), restored after.
    Worker ``w`` always gets the tiles ``w, w + n, ...``, so the results do not depend on scheduling.
    """
    n = min(workers(), len(tiles))
    if n <= 1:  # one tile: torch's intra-op threads share each op
        for tile in tiles:
            work(0, tile)
        return
    threads = torch.get_num_threads()
    with _POOL_LOCK:  # one blockwise call at a time owns the pool and the thread setting
        torch.set_num_threads(1)
        try:
            if not _POOL or _POOL[0]._max_workers < n:
                _POOL[:] = [ThreadPoolExecutor(max_workers=n, thread_name_prefix="attnopt-cpu")]
            inference = torch.is_inference_mode_enabled()  # thread-local: the workers take the caller's
            jobs = [_POOL[0].submit(_deal, work, w, tiles[w::n], inference) for w in range(n)]
            for job in jobs:
                job.result()
        finally:
            torch.set_num_threads(threads)


def _deal(work: Callable[[int, object], None], worker: int, tiles: list, inference: bool) -> None:
    with torch.inference_mode(inference), torch.no_grad():
        for tile in tiles:
            work(worker, tile)


@dataclass
class _Problem:
    """One call's operands in the tiled layout, in the accumulation dtype."""

    q: Tensor  # [B, Hkv, Sq·G, D], scaled: scores are q @ kᵀ
    k: Tensor  # [B, Hkv, Sk, D]
    v: Tensor  # [B, Hkv, Sk, Dv]
    group: int
    softcap: float
    offset: Optional[int]  # key j is visible to query i iff j <= i + offset; None without a causal mask
    additive: Optional[Tensor]  # the additive mask as [Mb, 1|Hkv, Mq, 1|G, Mk], or None
    hidden: Optional[Tensor]  # ~bool mask as [Mb, 1|Hkv, Mq, 1|G, Mk], or None
    drop: Optional[Tensor]  # dropout keep-mask as [B, Hkv, Sq, G, Sk], or None
    dropout_p: float
    rows: int  # query rows per tile
    cols: int  # keys per tile
    live: Optional[Tensor]  # [tiles of Sq or 1, tiles of Sk or 1] bool: some entry visible, or None

    @property
    def sq(self) -> int:
        return self.q.shape[2] // self.group

    @property
    def sk(self) -> int:
        return self.k.shape[2]

    def key_tiles(self, r0: int, r1: int) -> Iterator[tuple[int, int]]:
        """The key tiles ``[c0, c1)`` that some row of ``[r0, r1)`` may see."""
        end = self.sk if self.offset is None else min(self.sk, r1 + self.offset)
        for c0 in range(0, max(end, 0), self.cols):
            if self.live is None or self.live[min(r0 // self.rows, self.live.shape[0] - 1),
                                              min(c0 // self.cols, self.live.shape[1] - 1)]:
                yield c0, min(c0 + self.cols, self.sk)

    def query_tiles(self) -> Iterator[tuple[int, int]]:
        for r0 in range(0, self.sq, self.rows):
            yield r0, min(r0 + self.rows, self.sq)


def _mask5(mask4: Tensor, hkv: int, group: int) -> Tensor:
    """A [Mb, Mh, Mq, Mk] mask as a view [Mb, 1|Hkv, Mq, 1|G, Mk] broadcasting to the query layout."""
    if mask4.shape[1] == 1:
        return mask4.unsqueeze(3)
    return mask4.reshape(mask4.shape[0], hkv, group, mask4.shape[2], mask4.shape[3]).permute(0, 1, 3, 2, 4)


def _tile(t: Optional[Tensor], r0: int, r1: int, c0: int, c1: int) -> Optional[Tensor]:
    """Rows ``[r0, r1)`` and keys ``[c0, c1)`` of a broadcastable [*, *, rows, *, keys] tensor."""
    if t is None:
        return None
    rows = slice(r0, r1) if t.shape[2] > 1 else slice(None)
    cols = slice(c0, c1) if t.shape[4] > 1 else slice(None)
    return t[:, :, rows, :, cols]


def prepare(q, k, v, attn_mask, causal, scale, softcap, dropout_p, seed) -> _Problem:
    b, hq, sq, d = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    g = hq // hkv
    acc = acc_dtype(q)
    offset = None if causal == CAUSAL_NONE else (sk - sq if causal == CAUSAL_BOTTOM_RIGHT else 0)
    mask4 = None if attn_mask is None else attn_mask.reshape((1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape))
    additive = hidden = drop = None
    if mask4 is not None and mask4.dtype == torch.bool:
        hidden = _mask5(~mask4, hkv, g)  # on the mask's own shape
    elif mask4 is not None:
        additive = _mask5(mask4.to(acc), hkv, g)
    if dropout_p > 0.0:
        drop = _dropout_keep((b, hq, sq, sk), dropout_p, seed).view(b, hkv, g, sq, sk).permute(0, 1, 3, 2, 4)
    rows, cols = tile_size(b * hq, sq, sk)
    q_rows = (q.to(acc) * scale).reshape(b, hkv, g, sq, d).transpose(2, 3).reshape(b, hkv, sq * g, d)
    live = None if mask4 is None else _live_tiles(mask4, offset, sq, rows, cols)
    return _Problem(q_rows, k.to(acc), v.to(acc), g, softcap, offset, additive, hidden, drop, dropout_p, rows, cols,
                    live)


def _live_tiles(mask4: Tensor, offset: Optional[int], sq: int, rows: int, cols: int) -> Optional[Tensor]:
    """[tiles of Mq, tiles of Mk] bool: whether the tile has an entry some batch and head sees; None when every
    tile may (a mask with one entry per row or key, or a row that only finite fills would leave empty)."""
    mq, mk = mask4.shape[2], mask4.shape[3]
    if mq * mk == 1:
        return None
    if mask4.dtype == torch.bool:
        normal = mask4
    else:
        normal = mask4 > HIDDEN_BELOW
        if not _rows_see_a_normal_key(normal, offset, sq):
            return None  # such a row averages its finite fills: every tile of it counts
    seen = normal.any(dim=1).any(dim=0).to(torch.uint8)  # [Mq, Mk]: visible to some batch and head
    rq, rk = (rows if mq > 1 else 1), (cols if mk > 1 else 1)
    seen = F.pad(seen, (0, -mk % rk, 0, -mq % rq))
    return seen.reshape(-(-mq // rq), rq, -(-mk // rk), rk).amax(dim=3).amax(dim=1).bool()


def _rows_see_a_normal_key(normal: Tensor, offset: Optional[int], sq: int) -> bool:
    """Whether every row (of every batch and head) that sees any key sees one whose mask entry is above
    HIDDEN_BELOW; ``normal`` is [Mb, Mh, Mq, Mk] with Mq 1 or ``sq``."""
    seen = normal.any(dim=-1)  # [Mb, Mh, Mq]
    if offset is not None:
        first = normal.to(torch.uint8).argmax(dim=-1)  # [Mb, Mh, Mq]: the first normal key
        i = torch.arange(sq)
        seen = (seen & (first <= i + offset)) | (i + offset < 0)  # [Mb, Mh, Sq]; rows before any key: dead anyway
    return bool(seen.all())


def _dropout_keep(shape, dropout_p: float, seed: Optional[Tensor]) -> Tensor:
    """The reference's dropout keep-mask for ``shape``: the same generator draws, a pure function of ``seed``."""
    if seed is None:
        raise ValueError("attention with dropout_p > 0 needs a seed tensor so that backward can replay the mask")
    gen = torch.Generator(device="cpu")
    gen.manual_seed(int(seed.item()))
    return torch.rand(shape, generator=gen) >= dropout_p


def _scores(pb: _Problem, r0: int, r1: int, c0: int, c1: int) -> tuple[Tensor, Optional[Tensor]]:
    """``(s, t)``: the masked scores of query rows ``[r0, r1)`` (every head of each group) and keys ``[c0, c1)``
    as [B, Hkv, R·G, C] and, with a softcap, ``t = tanh(scale · QKᵀ / cap)`` (for the backward)."""
    g = pb.group
    s = torch.matmul(pb.q[:, :, r0 * g: r1 * g], pb.k[:, :, c0:c1].transpose(-2, -1))  # [B, Hkv, R·G, C]
    t = None
    if pb.softcap > 0.0:
        t = s.div_(pb.softcap).tanh_()
        s = t * pb.softcap
    s5 = s.view(s.shape[0], s.shape[1], r1 - r0, g, c1 - c0)
    if pb.additive is not None:
        s5.add_(_tile(pb.additive, r0, r1, c0, c1))
    if pb.hidden is not None:
        s5.masked_fill_(_tile(pb.hidden, r0, r1, c0, c1), float("-inf"))
    if pb.offset is not None and c1 - 1 > r0 + pb.offset:  # the tile crosses the causal diagonal
        i = torch.arange(r0, r1)[:, None, None]
        s5.masked_fill_(torch.arange(c0, c1) > i + pb.offset, float("-inf"))
    return s, t


def _split_rows(t: Tensor, shape) -> Tensor:
    """[B, Hkv, Sq·G, X] -> [B, Hq, Sq, X] (heads back in SDPA's order)."""
    b, hkv, rows, x = t.shape
    g = shape[1] // hkv
    return t.reshape(b, hkv, rows // g, g, x).transpose(2, 3).reshape(b, hkv * g, rows // g, x)


def _dropped(pb: _Problem, p: Tensor, r0: int, r1: int, c0: int, c1: int) -> Tensor:
    """``p ⊙ keep / (1 - dropout_p)`` on one tile."""
    keep = _tile(pb.drop, r0, r1, c0, c1).reshape(p.shape)
    return p * keep / (1.0 - pb.dropout_p)


def _forward_rows(pb: _Problem, out: Tensor, lse: Tensor, r0: int, r1: int) -> None:
    """Writes the rows ``[r0, r1)`` (every head of each group) of ``out`` and ``lse``: the online softmax."""
    b, hkv, g = pb.q.shape[0], pb.q.shape[1], pb.group
    m = pb.q.new_full((b, hkv, (r1 - r0) * g), float("-inf"))  # running row max
    l = torch.zeros_like(m)  # running row sum of exp(s - m)
    acc = pb.q.new_zeros((b, hkv, (r1 - r0) * g, pb.v.shape[-1]))  # running unnormalized output
    for c0, c1 in pb.key_tiles(r0, r1):
        s, _ = _scores(pb, r0, r1, c0, c1)
        m_t = s.amax(dim=-1)  # the tile's row max
        # The tile's softmax (ATen's fused kernel: several times faster than sub + exp, whose exp takes a slow
        # path on huge negative fills) is exp(s - m_t) / l_t with l_t = 1 / max(p).
        p = torch.softmax(s, dim=-1)  # [B, Hkv, R·G, C]
        blind = m_t == float("-inf")  # rows that see no key of the tile: softmax gives NaN
        if bool(blind.any()):
            p.masked_fill_(blind[..., None], 0.0)
        l_t = 1.0 / p.amax(dim=-1).masked_fill_(blind, 1.0)
        m_new = torch.maximum(m, m_t)
        m_safe = m_new.masked_fill(m_new == float("-inf"), 0.0)  # rows with nothing visible yet
        alpha, beta = torch.exp(m - m_safe), torch.exp(m_t - m_safe) * l_t  # beta: p's share in exp(s - m_new)
        l.mul_(alpha).add_(beta.masked_fill_(blind, 0.0))
        if pb.drop is not None:
            p = _dropped(pb, p, r0, r1, c0, c1)
        acc.mul_(alpha[..., None]).add_(torch.matmul(p, pb.v[:, :, c0:c1]).mul_(beta[..., None]))
        m = m_new
    out[:, :, r0 * g: r1 * g] = acc / l.masked_fill(l == 0, 1.0)[..., None]  # no visible key: acc = 0 -> 0
    lse[:, :, r0 * g: r1 * g] = m.masked_fill(m == float("-inf"), 0.0) + torch.log(l)  # log 0 = -inf there


def forward(q: Tensor, k: Tensor, v: Tensor, attn_mask: Optional[Tensor] = None, causal: int = CAUSAL_NONE,
            scale: float = 1.0, softcap: float = 0.0, dropout_p: float = 0.0,
            seed: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """``(out [B, Hq, Sq, Dv] in q.dtype, lse [B, Hq, Sq] fp32 or fp64)``, the reference's conventions."""
    pb = prepare(q, k, v, attn_mask, causal, scale, softcap, dropout_p, seed)
    b, hkv, n, _ = pb.q.shape
    out = pb.q.new_empty((b, hkv, n, pb.v.shape[-1]))
    lse = pb.q.new_empty((b, hkv, n))
    parallel_rows(list(pb.query_tiles()), lambda worker, tile: _forward_rows(pb, out, lse, *tile))
    return _split_rows(out, q.shape).to(q.dtype), _split_rows(lse[..., None], q.shape)[..., 0]


def _row_scale(pb: _Problem, lse: Tensor, r0: int, r1: int) -> Optional[Tensor]:
    """1 / Σ_j exp(s - lse) for the rows of ``[r0, r1)`` whose ``lse`` lost ``log l`` to a huge finite fill
    (``lse < HIDDEN_BELOW``), 1 for the others; None when no row of the tile needs it."""
    if pb.additive is None:
        return None
    lost = torch.isfinite(lse) & (lse < HIDDEN_BELOW)
    if not bool(lost.any()):
        return None
    total = torch.zeros_like(lse)
    for c0, c1 in pb.key_tiles(r0, r1):
        s, _ = _scores(pb, r0, r1, c0, c1)
        total += s.sub_(lse[..., None]).exp_().sum(dim=-1)
    return torch.where(lost, 1.0 / total, torch.ones_like(total))


def _reduce_to(t: Tensor, shape) -> Tensor:
    """Sums ``t`` over the dims where ``shape`` (same rank) has size 1."""
    dims = tuple(i for i, n in enumerate(shape) if n == 1 and t.shape[i] != 1)
    return t.sum(dim=dims, keepdim=True) if dims else t


def _rows_layout(t: Tensor, hkv: int) -> Tensor:
    """[B, Hq, Sq, X] -> [B, Hkv, Sq·G, X], the query layout of :class:`_Problem`."""
    b, hq, sq, x = t.shape
    return t.reshape(b, hkv, hq // hkv, sq, x).transpose(2, 3).reshape(b, hkv, sq * (hq // hkv), x)


@dataclass
class _Grads:
    """One worker's gradient accumulators (the keys' and the mask's are shared by query tiles: one set per worker)."""

    dk: Tensor  # [B, Hkv, Sk, D]
    dv: Tensor  # [B, Hkv, Sk, Dv]
    dmask: Optional[Tensor]  # like _Problem.additive, or None


def _backward_rows(pb: _Problem, saved: tuple[Tensor, Tensor, Tensor], dq: Tensor, grads: _Grads, r0: int,
                   r1: int) -> None:
    """Accumulates the gradients of the rows ``[r0, r1)``: their ``dq`` rows, and into ``grads``."""
    lse_r, do_r, delta = saved  # [B, Hkv, Sq·G], [B, Hkv, Sq·G, Dv], [B, Hkv, Sq·G]
    hkv, g = pb.q.shape[1], pb.group
    rows = slice(r0 * g, r1 * g)
    row_scale = _row_scale(pb, lse_r[:, :, rows], r0, r1)
    lse_t = lse_r[:, :, rows].masked_fill(lse_r[:, :, rows] == float("-inf"), float("inf"))  # dead rows: P = 0
    for c0, c1 in pb.key_tiles(r0, r1):
        s, t = _scores(pb, r0, r1, c0, c1)
        p = s.sub_(lse_t[..., None]).exp_()  # [B, Hkv, R·G, C]
        if row_scale is not None:
            p.mul_(row_scale[..., None])
        dp = torch.matmul(do_r[:, :, rows], pb.v[:, :, c0:c1].transpose(-2, -1))  # [B, Hkv, R·G, C]
        pd = p
        if pb.drop is not None:
            pd, dp = _dropped(pb, p, r0, r1, c0, c1), _dropped(pb, dp, r0, r1, c0, c1)
        grads.dv[:, :, c0:c1] += torch.matmul(pd.transpose(-2, -1), do_r[:, :, rows])
        ds = dp.sub_(delta[:, :, rows, None]).mul_(p)  # dS = P (dP - delta)
        if grads.dmask is not None:
            target = _tile(grads.dmask, r0, r1, c0, c1)
            target += _reduce_to(ds.view(ds.shape[0], hkv, r1 - r0, g, c1 - c0), target.shape)
        if t is not None:
            ds.mul_(1.0 - t * t)
        dq[:, :, rows] += torch.matmul(ds, pb.k[:, :, c0:c1])
        grads.dk[:, :, c0:c1] += torch.matmul(ds.transpose(-2, -1), pb.q[:, :, rows])


def backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
             attn_mask: Optional[Tensor] = None, causal: int = CAUSAL_NONE, scale: float = 1.0, softcap: float = 0.0,
             dropout_p: float = 0.0, seed: Optional[Tensor] = None,
             mask_grad: bool = False) -> tuple[Tensor, Tensor, Tensor, Optional[Tensor]]:
    """``(dq, dk, dv, dmask)`` of :func:`forward` from its ``out`` and ``lse``; ``dmask`` (the additive mask's
    gradient, in its own shape and dtype) is None unless ``mask_grad``."""
    pb = prepare(q, k, v, attn_mask, causal, scale, softcap, dropout_p, seed)
    hkv, acc = k.shape[1], pb.q.dtype
    lse_r = _rows_layout(lse.to(acc)[..., None], hkv)[..., 0]  # [B, Hkv, Sq·G]
    do_r = _rows_layout(dout.to(acc), hkv)
    delta = (do_r * _rows_layout(out.to(acc), hkv)).sum(dim=-1)  # [B, Hkv, Sq·G]
    tiles = list(pb.query_tiles())
    dq = torch.zeros_like(pb.q)
    grads = [_Grads(torch.zeros_like(pb.k), torch.zeros_like(pb.v),
                    torch.zeros_like(pb.additive) if mask_grad else None)
             for _ in range(max(min(workers(), len(tiles)), 1))]
    parallel_rows(tiles, lambda w, tile: _backward_rows(pb, (lse_r, do_r, delta), dq, grads[w], *tile))
    dk, dv = sum(gr.dk for gr in grads[1:]) + grads[0].dk, sum(gr.dv for gr in grads[1:]) + grads[0].dv
    dmask = None
    if mask_grad:
        dmask = _mask_shape(sum(gr.dmask for gr in grads[1:]) + grads[0].dmask, attn_mask.shape).to(attn_mask.dtype)
    return _split_rows(dq * scale, q.shape).to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dmask


def _mask_shape(dmask5: Tensor, shape) -> Tensor:
    """The [Mb, 1|Hkv, Mq, 1|G, Mk] gradient back in the mask's own shape."""
    mb, h, mq, g, mk = dmask5.shape
    return dmask5.permute(0, 1, 3, 2, 4).reshape(mb, h * g, mq, mk).reshape(shape)
