"""Training-free estimators of block importance: ``[B, Hq, NQ, NK]`` probability mass per (query block, key block).

Each works on pooled, strided or sampled views of q and k and costs at most ``O(S² · D / block)``, never a full
``[Sq, Sk]`` score matrix:

* ``pooled`` (SeerAttention's gate without training, BiFormer's region routing): mean-pooled queries against
  mean-pooled keys with the spread pooling loses put back: a pair's log-mass ``log |block| + μ + σ²/2``
  (``μ = q̄ · k̄ · scale``, ``σ²`` the variance of ``q · k · scale`` over the pair from per-channel second
  moments), softmaxed over key blocks; the near blocks (sinks, diagonal band) exact on sampled rows
  (:mod:`.near`). ``O(NQ · NK · D)`` plus ``O(S · D · rows · (sink + local + 1))``.
* ``antidiagonal`` (XAttention): per ``stride × stride`` tile the sum of its antidiagonal scores, from strided
  reshapes of q and k (``[S/stride, stride·D]``), softmaxed per strided row and summed into blocks.
  ``O(S² · D / stride)``.
* ``vertical_slash`` (MInference): the last ``last_q`` queries attend to every key; the mass per key column
  ("vertical") and per diagonal ("slash") is spread over the blocks (the slash part by double prefix sums).
  Beyond MInference, ``probes`` rows of each query block also attend to every key: their own mass, weighted as
  much as the last queries' vertical and slash parts together (the last queries alone miss a key block that
  only earlier queries attend to). ``O(last_q · S · D + probes · S² · D / block_m)``.
* ``lowbit`` (SALE, SEA): ``samples_q`` queries per query block against ``samples_k`` keys per key block, both
  quantized to ``bits`` bits (symmetric, per vector), log-sum-exp per block. ``O(S² · D · sq·sk / (bm · bn))``.
* ``lsh`` (HyperAttention's sortLSH, Routing Transformer's clusters): queries and keys hashed by SimHash
  (``rounds`` hashes of ``bits`` random hyperplanes); each hyperplane's agreement rate over a block pair
  estimates the pair's angle (``P[agree] = 1 - θ/π``), hence its mean score; spread and near blocks as ``pooled``.
  ``O(S · D · P + NQ · NK · P)``, ``P = bits · rounds`` (512): within ``O(S² · D / block)`` from ``S = P · block``
  (32k at the defaults); below that a fixed cost of about 0.3 ms per 1k tokens and head.

Every estimator gives zero mass to blocks the site's causal rule hides entirely and rows that sum to one.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from attnopt.kernels.dynamic.blocks import allowed_blocks, num_blocks
from attnopt.kernels.dynamic.near import near_logmass, with_near

ESTIMATORS = ("pooled", "antidiagonal", "vertical_slash", "lowbit", "lsh")


def _blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    """[B, H, S, D] -> [B, H, N, block, D] (zero-padded; a view when ``block`` divides S)."""
    n = num_blocks(x.shape[2], block)
    if n * block != x.shape[2]:
        x = F.pad(x, (0, 0, 0, n * block - x.shape[2]))
    return x.reshape(*x.shape[:2], n, block, x.shape[-1])


def _pool(x: torch.Tensor, block: int) -> torch.Tensor:
    """[B, H, S, D] -> [B, H, N, D]: the mean of each block's rows (the last block's real rows only)."""
    sums = _blocks(x.float(), block).sum(3)
    counts = torch.full((sums.shape[2],), float(block), device=x.device)
    counts[-1] = x.shape[2] - (sums.shape[2] - 1) * block
    return sums / counts[:, None]


def _per_query_head(x: torch.Tensor, hq: int) -> torch.Tensor:
    return x if x.shape[1] == hq else x.repeat_interleave(hq // x.shape[1], 1)


def _normalized(logits: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """softmax over key blocks, hidden blocks excluded (a row with none allowed gives zeros)."""
    p = torch.softmax(logits.masked_fill(~allowed, float("-inf")), -1)
    return torch.nan_to_num(p, nan=0.0)


def _moments(x: torch.Tensor, block: int, hq: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per block and channel the mean and the mean square of ``x`` [B, H, S, D] (``[B, Hq, N, D]`` each); the
    mean square from every ``block // 16``-th row (16 rows per block estimate a second moment well, at a
    fraction of the memory traffic)."""
    x = x.float()
    step = max(1, block // 16)
    sizes = _sizes(x.shape[2], block, num_blocks(x.shape[2], block), x.device)
    squares = _blocks(x, block)[:, :, :, ::step].square().sum(3) / torch.ceil(sizes / step)[:, None]
    return _per_query_head(_pool(x, block), hq), _per_query_head(squares, hq)


def _sizes(s: int, block: int, n: int, device=None) -> torch.Tensor:
    """[N]: the number of real rows of each block (the last one may be short)."""
    sizes = torch.full((n,), float(block), device=device)
    sizes[-1] = s - (n - 1) * block
    return sizes


def _variance(qm, q2, km, k2, scale: float) -> torch.Tensor:
    """``[B, H, NQ, NK]``: the variance of ``q · k · scale`` over each block pair's (query, key) pairs, channels
    taken independent: ``Σ_d (E[q_d²] E[k_d²] - q̄_d² k̄_d²)`` from the blocks' moments (:func:`_moments`)."""
    var = torch.matmul(q2, k2.transpose(-2, -1)) - torch.matmul(qm * qm, (km * km).transpose(-2, -1))
    return var.clamp_min(0.0) * scale**2


def pooled(q, k, block_m, block_n, offset, scale, rows: int = 4, sub: int | None = None):
    """Mean pooling keeps ``E[q·k]`` of a block pair but loses its spread, and ``log Σ exp`` grows with the spread:
    the pair's log-mass is taken as the Gaussian (second-cumulant) value ``log n + μ + σ²/2``, ``μ = q̄ · k̄``
    and ``σ² = Σ_d (E[q_d²] E[k_d²] - q̄_d² k̄_d²)``, the variance of ``q · k`` over the pairs with channels taken
    independent (two more pooled products: ``O(NQ · NK · D)``). The near blocks (sinks, diagonal band: not
    Gaussian, the local peak) are measured exactly on ``rows`` sampled rows (:mod:`.near`).

    ``sub`` (a divisor of ``block_m``) pools the queries in sub-blocks of ``sub`` rows, each with its own
    distribution over key blocks, and a query block's is their mean: a block that only some of its rows attend
    to keeps the mass those rows give it, which one mean over all rows dilutes (``block_m / sub`` times the
    query-side work; each sub-block's near blocks are measured on its own sampled rows)."""
    sub = block_m if sub is None else int(sub)
    if sub < 1 or block_m % sub:
        raise ValueError(f"pooled: sub={sub} must divide block_m={block_m} (rows per pooled query sub-block)")
    hq, sq, sk = q.shape[1], q.shape[2], k.shape[2]
    qm, q2 = _moments(q, sub, hq)  # [B, Hq, NS, D]
    km, k2 = _moments(k, block_n, hq)  # [B, Hq, NK, D]
    mean = torch.matmul(qm, km.transpose(-2, -1)) * scale
    logits = mean + _variance(qm, q2, km, k2, scale) / 2 + _sizes(sk, block_n, km.shape[2], q.device).log()
    return pooled_probabilities(logits, q, k, block_m, block_n, offset, scale, rows, sub)


def pooled_probabilities(logits, q, k, block_m, block_n, offset, scale, rows: int = 4, sub: int | None = None):
    """``pooled``'s block logits ``[B, Hq, NS, NK]`` (one row per query sub-block of ``sub`` rows) made its
    ``[B, Hq, NQ, NK]`` probabilities: near blocks exact, softmax over allowed key blocks, mean over a query
    block's sub-blocks. Public for the Triton ``pooled``, whose kernel computes the logits only."""
    sub = block_m if sub is None else sub
    sq, sk = q.shape[2], k.shape[2]
    near = near_logmass(q, k, sub, block_n, offset, scale, rows)  # [B, Hq, NS, NK]: each sub-block's own rows
    p = _normalized(with_near(logits, near), allowed_blocks(sq, sk, sub, block_n, offset, q.device))
    if sub == block_m:
        return p
    parent = torch.arange(p.shape[2], device=q.device) * sub // block_m  # each sub-block's query block
    count = torch.bincount(parent, minlength=num_blocks(sq, block_m)).to(p.dtype)
    out = p.new_zeros(*p.shape[:2], num_blocks(sq, block_m), p.shape[3])
    return out.index_add_(2, parent, p) / count[:, None]


def antidiagonal(q, k, block_m, block_n, offset, scale, stride: int = 16):
    """The strided rows are computed in chunks (at most ~2^24 scores at a time)."""
    if block_m % stride or block_n % stride:
        raise ValueError(f"antidiagonal: stride {stride} must divide block_m {block_m} and block_n {block_n}")
    b, hq, sq, d = q.shape
    sk = k.shape[2]
    nq, nk = num_blocks(sq, block_m), num_blocks(sk, block_n)
    # Query tile i as its rows reversed, key tile j as is: their dot product sums tile (i, j)'s antidiagonal.
    qr = _blocks(q.float(), block_m).view(b, hq, -1, stride, d).flip(3).reshape(b, hq, -1, stride * d)
    kr = _per_query_head(_blocks(k.float(), block_n).reshape(b, k.shape[1], -1, stride * d), hq)
    rows_per_q, cols_per_k = block_m // stride, block_n // stride
    allowed = allowed_blocks(sq, sk, block_m, block_n, offset, q.device).repeat_interleave(rows_per_q, 0)
    allowed = allowed.repeat_interleave(cols_per_k, 1) & (torch.arange(nk * cols_per_k, device=q.device) * stride < sk)  # real keys
    out = torch.zeros(b, hq, nq, nk, device=q.device)
    step = max(rows_per_q, (1 << 24) // max(1, b * hq * kr.shape[2]) // rows_per_q * rows_per_q)
    for r0 in range(0, qr.shape[2], step):
        r1 = min(r0 + step, qr.shape[2])
        s = torch.matmul(qr[:, :, r0:r1], kr.transpose(-2, -1)) * (scale / stride)
        p = _normalized(s, allowed[r0:r1])  # [B, H, rows, NK·cols]
        p = p.view(b, hq, r1 - r0, nk, cols_per_k).sum(-1)
        out[:, :, r0 // rows_per_q:num_blocks(r1, rows_per_q)] = p.view(b, hq, -1, rows_per_q, nk).mean(3)
    return out


def vertical_slash(q, k, block_m, block_n, offset, scale, last_q: int = 64, probes: int = 2):
    """Beyond MInference, ``probes`` rows of every query block (evenly spaced) attend to every key too: their
    mean key-block mass is measured on the block itself, so it weighs as much as the last queries' vertical
    and slash parts together (which describe the last rows and miss a far block only earlier queries attend
    to). ``O((last_q + NQ · probes) · S · D)``."""
    b, hq, sq, _ = q.shape
    sk = k.shape[2]
    n = min(last_q, sq)
    rows = torch.arange(sq - n, sq, device=q.device)
    s = torch.matmul(q[:, :, sq - n:].float(), _per_query_head(k, hq).float().transpose(-2, -1)) * scale
    keys = torch.arange(sk, device=q.device)
    if offset is not None:
        s = s.masked_fill(keys[None, :] > rows[:, None] + offset, float("-inf"))
    p = torch.nan_to_num(torch.softmax(s, -1), nan=0.0)  # [B, H, n, Sk]
    vertical = F.pad(p.mean(2), (0, num_blocks(sk, block_n) * block_n - sk)).view(b, hq, -1, block_n).sum(-1)
    # Slash: the mass per diagonal e = row - key + Sk - 1 (0 .. Sq + Sk - 2), averaged over the last rows.
    diag = (rows[:, None] - keys[None, :] + sk - 1).expand(b, hq, n, sk).reshape(b, hq, -1)
    w = torch.zeros(b, hq, sq + sk, device=q.device).scatter_add_(-1, diag, p.reshape(b, hq, -1)) / n
    slash = _slash_blocks(w, sq, sk, block_m, block_n)  # [B, H, NQ, NK]
    est = _own_vertical(q, k, block_m, block_n, offset, scale, probes) + (vertical[:, :, None, :] + slash) / 2
    allowed = allowed_blocks(sq, sk, block_m, block_n, offset, q.device)
    est = est.masked_fill(~allowed, 0.0)
    return est / est.sum(-1, keepdim=True).clamp_min(1e-30)


def _own_vertical(q, k, block_m, block_n, offset, scale, probes: int):
    """[B, H, NQ, NK]: the mean key-block mass of each query block's ``probes`` evenly spaced rows (rows chunked:
    ~2^24 scores at a time)."""
    b, hq, sq, _ = q.shape
    sk = k.shape[2]
    nq, nk = num_blocks(sq, block_m), num_blocks(sk, block_n)
    rows = torch.arange(nq, device=q.device)[:, None] * block_m + \
        ((2 * torch.arange(probes, device=q.device) + 1) * block_m) // (2 * probes)
    rows = torch.clamp(rows, max=sq - 1).flatten()  # [NQ · probes]
    kq = _per_query_head(k, hq).float()
    out = torch.empty(b, hq, nq * probes, nk, device=q.device)
    step = max(1, (1 << 24) // max(1, b * hq * sk))
    for r0 in range(0, len(rows), step):
        at = rows[r0:r0 + step]
        s = torch.matmul(q[:, :, at].float(), kq.transpose(-2, -1)) * scale  # [B, H, rows, Sk]
        if offset is not None:
            s = s.masked_fill(torch.arange(sk, device=q.device)[None, :] > at[:, None] + offset, float("-inf"))
        p = torch.nan_to_num(torch.softmax(s, -1), nan=0.0)
        out[:, :, r0:r0 + step] = F.pad(p, (0, nk * block_n - sk)).view(b, hq, len(at), nk, block_n).sum(-1)
    return out.view(b, hq, nq, probes, nk).mean(3)


def _slash_blocks(w: torch.Tensor, sq: int, sk: int, block_m: int, block_n: int) -> torch.Tensor:
    """Per block (i, j) the mean over its rows r of ``Σ_{key in block j} w[r - key + Sk - 1]``, by double prefix
    sums: a row's sum over a key block is ``P[r + Sk - j·bn] - P[r + Sk - j·bn - bn]`` (``P[n] = Σ_{e<n} w[e]``),
    and a block's sum over its rows of ``P[r + c]`` is ``Q[r1 + c] - Q[r0 + c]`` (``Q[n] = Σ_{m<n} P[m]``)."""
    pad = block_n + block_m
    w = F.pad(w, (pad, pad))  # index e lives at e + pad
    p = F.pad(torch.cumsum(w.double(), -1), (1, 0))  # P[n] at n + pad
    qq = F.pad(torch.cumsum(p, -1), (1, 0))  # Q[n] at n + pad
    nq, nk = num_blocks(sq, block_m), num_blocks(sk, block_n)
    r0 = torch.arange(nq, device=w.device) * block_m
    r1 = torch.clamp(r0 + block_m, max=sq)
    c = sk - torch.arange(nk, device=w.device) * block_n

    def block_sum(shift):  # Σ_{r in [r0, r1)} P[r + c + shift]
        hi = (r1[:, None] + c[None, :] + shift + pad).clamp(0, qq.shape[-1] - 1)
        lo = (r0[:, None] + c[None, :] + shift + pad).clamp(0, qq.shape[-1] - 1)
        return qq[..., hi] - qq[..., lo]

    return ((block_sum(0) - block_sum(-block_n)) / (r1 - r0)[:, None]).float()


def _quantize(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Symmetric per-vector quantization to ``bits`` bits (values kept in float)."""
    levels = 2 ** (bits - 1) - 1
    step = x.abs().amax(-1, keepdim=True).clamp_min(1e-12) / levels
    return torch.round(x / step) * step


def _samples(x: torch.Tensor, block: int, count: int) -> torch.Tensor:
    """[B, H, S, D] -> [B, H, N, count, D]: ``count`` evenly spaced rows of each block (clamped to S)."""
    n = num_blocks(x.shape[2], block)
    at = torch.arange(n, device=x.device)[:, None] * block + (torch.arange(count, device=x.device) * block) // count
    return x[:, :, at.clamp(max=x.shape[2] - 1)]


def lowbit(q, k, block_m, block_n, offset, scale, bits: int = 4, samples_q: int = 4, samples_k: int = 8):
    b, hq, sq, d = q.shape
    sk = k.shape[2]
    nq, nk = num_blocks(sq, block_m), num_blocks(sk, block_n)
    qs = _quantize(_samples(q.float(), block_m, samples_q), bits).reshape(b, hq, nq * samples_q, d)
    ks = _quantize(_samples(_per_query_head(k, hq).float(), block_n, samples_k), bits).reshape(b, hq, -1, d)
    s = torch.matmul(qs, ks.transpose(-2, -1)) * scale  # [B, H, NQ·sq, NK·sk]
    logits = torch.logsumexp(s.view(b, hq, nq * samples_q, nk, samples_k), -1) + math.log(block_n / samples_k)
    allowed = allowed_blocks(sq, sk, block_m, block_n, offset, q.device)
    p = _normalized(logits, allowed.repeat_interleave(samples_q, 0))
    return p.view(b, hq, nq, samples_q, nk).mean(3)


def _sign_sketch(x: torch.Tensor, planes: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, H, S, D] -> per block the mean SimHash code (``±1`` per hyperplane) ``[B, H, N, P]`` and the rows' RMS
    norm ``[B, H, N, 1]``."""
    x = x.float()
    codes = torch.sign(torch.matmul(x, planes))  # [B, H, S, P]
    return _pool(codes, block), _pool(torch.linalg.vector_norm(x, dim=-1, keepdim=True).square(), block).sqrt()


def lsh(q, k, block_m, block_n, offset, scale, bits: int = 16, rounds: int = 32, seed: int = 0, rows: int = 4):
    """SimHash (Charikar): for a random hyperplane the codes of q and k agree with probability ``1 - θ/π``, θ
    their angle. ``rounds`` hashes of ``bits`` hyperplanes each give every query and key a ``P = bits · rounds``
    sign code; the mean agreement over a block pair's (query, key) pairs is exact from the blocks' mean codes,
    ``a = (1 + c̄_q · c̄_k / P) / 2``, and estimates their angle ``θ = π (1 - a)``: the pair's mean score is
    ``|q| |k| cos θ · scale`` (RMS norms per block), and its logit adds ``log |block|`` and half the pair's score
    variance (as ``pooled``: ``log Σ exp`` exceeds the mean score by the spread), softmaxed. Rather than
    counting whole-code bucket collisions (which a pair at a moderate angle almost never has with many bits),
    every hyperplane votes: the angle's standard error falls as ``1/√P``. The near blocks (sinks, diagonal band)
    are measured exactly on ``rows`` sampled rows (:mod:`.near`). ``O(S · D · P + NQ · NK · P)``."""
    b, hq, sq, d = q.shape
    sk = k.shape[2]
    gen = torch.Generator().manual_seed(seed)
    planes = torch.randn(d, bits * rounds, generator=gen).to(q.device)
    code_q, norm_q = _sign_sketch(q, planes, block_m)
    code_k, norm_k = (_per_query_head(x, hq) for x in _sign_sketch(k, planes, block_n))
    agree = (1.0 + torch.matmul(code_q, code_k.transpose(-2, -1)) / planes.shape[1]) / 2
    cos = torch.cos(math.pi * (1.0 - agree.clamp(0.0, 1.0)))
    logits = scale * norm_q * norm_k.transpose(-2, -1) * cos + _sizes(sk, block_n, code_k.shape[2], q.device).log()
    qm, q2 = _moments(q, block_m, hq)
    km, k2 = _moments(k, block_n, hq)
    logits = logits + _variance(qm, q2, km, k2, scale) / 2  # the spread the mean angle leaves out, as pooled
    logits = with_near(logits, near_logmass(q, k, block_m, block_n, offset, scale, rows))
    return _normalized(logits, allowed_blocks(sq, sk, block_m, block_n, offset, q.device))


_FUNCTIONS = {"pooled": pooled, "antidiagonal": antidiagonal, "vertical_slash": vertical_slash, "lowbit": lowbit,
              "lsh": lsh}  # fmt: skip


def estimate(name: str, q, k, block_m: int, block_n: int, offset: int | None, scale: float | None = None,
             **params) -> torch.Tensor:  # fmt: skip
    """``[B, Hq, NQ, NK]`` fp32 block probabilities by estimator ``name`` (one of :data:`ESTIMATORS`)."""
    if name not in _FUNCTIONS:
        raise ValueError(f"unknown estimator {name!r}; known: {', '.join(ESTIMATORS)}")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    with torch.no_grad():
        return _FUNCTIONS[name](q.detach(), k.detach(), block_m, block_n, offset, scale, **params)
