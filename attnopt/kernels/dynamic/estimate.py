"""Training-free estimators of block importance: ``[B, Hq, NQ, NK]`` probability mass per (query block, key block).

Each works on pooled, strided or sampled views of q and k and costs at most ``O(S² · D / block)``, never a full
``[Sq, Sk]`` score matrix:

* ``pooled`` (SeerAttention's gate without training, BiFormer's region routing): mean-pooled queries against
  mean-pooled keys, ``softmax(Q̄ K̄ᵀ · scale + log |block|)`` over key blocks. ``O(NQ · NK · D)``.
* ``antidiagonal`` (XAttention): per ``stride × stride`` tile the sum of its antidiagonal scores, from strided
  reshapes of q and k (``[S/stride, stride·D]``), softmaxed per strided row and summed into blocks.
  ``O(S² · D / stride)``.
* ``vertical_slash`` (MInference): the last ``last_q`` queries attend to every key; the mass per key column
  ("vertical") and per diagonal ("slash") is spread over the blocks (the slash part by double prefix sums).
  Beyond MInference, the middle query of each query block also attends to every key and adds its block's own
  vertical mass (the last queries alone miss a key block that only earlier queries attend to).
  ``O(last_q · S · D + S² · D / block_m)``.
* ``lowbit`` (SALE, SEA): ``samples_q`` queries per query block against ``samples_k`` keys per key block, both
  quantized to ``bits`` bits (symmetric, per vector), log-sum-exp per block. ``O(S² · D · sq·sk / (bm · bn))``.
* ``lsh`` (HyperAttention's sortLSH, Routing Transformer's clusters): queries and keys hashed by ``bits`` random
  hyperplanes (SimHash, ``rounds`` independent hashes); a block pair's score is the share of its query/key pairs
  that share a bucket. ``O(S · D · bits + NQ · NK · 2^bits)``.

Every estimator gives zero mass to blocks the site's causal rule hides entirely and rows that sum to one.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from attnopt.kernels.dynamic.blocks import allowed_blocks, num_blocks

ESTIMATORS = ("pooled", "antidiagonal", "vertical_slash", "lowbit", "lsh")


def _blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    """[B, H, S, D] -> [B, H, N, block, D] (zero-padded)."""
    n = num_blocks(x.shape[2], block)
    return F.pad(x, (0, 0, 0, n * block - x.shape[2])).view(*x.shape[:2], n, block, x.shape[-1])


def _pool(x: torch.Tensor, block: int) -> torch.Tensor:
    """[B, H, S, D] -> [B, H, N, D]: the mean of each block's rows (the last block's real rows only)."""
    b, h, s, d = x.shape
    full = s // block
    sums = x[:, :, :full * block].float().reshape(b, h, full, block, d).sum(3)  # a view: no padded copy
    if full * block < s:
        sums = torch.cat([sums, x[:, :, full * block:].float().sum(2, keepdim=True)], 2)
    counts = torch.full((sums.shape[2],), float(block), device=x.device)
    counts[-1] = x.shape[2] - (sums.shape[2] - 1) * block
    return sums / counts[:, None]


def _per_query_head(x: torch.Tensor, hq: int) -> torch.Tensor:
    return x if x.shape[1] == hq else x.repeat_interleave(hq // x.shape[1], 1)


def _normalized(logits: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """softmax over key blocks, hidden blocks excluded (a row with none allowed gives zeros)."""
    p = torch.softmax(logits.masked_fill(~allowed, float("-inf")), -1)
    return torch.nan_to_num(p, nan=0.0)


def pooled(q, k, block_m, block_n, offset, scale):
    qb = _pool(q, block_m)
    kb = _per_query_head(_pool(k, block_n), q.shape[1])
    sizes = torch.full((kb.shape[2],), float(block_n), device=q.device)
    sizes[-1] = k.shape[2] - (kb.shape[2] - 1) * block_n
    logits = torch.matmul(qb, kb.transpose(-2, -1)) * scale + sizes.log()
    return _normalized(logits, allowed_blocks(q.shape[2], k.shape[2], block_m, block_n, offset, q.device))


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
    real = torch.arange(nk * cols_per_k, device=q.device) * stride < sk  # real keys
    allowed = allowed.repeat_interleave(cols_per_k, 1) & real
    out = torch.zeros(b, hq, nq, nk, device=q.device)
    step = max(rows_per_q, (1 << 24) // max(1, b * hq * kr.shape[2]) // rows_per_q * rows_per_q)
    for r0 in range(0, qr.shape[2], step):
        r1 = min(r0 + step, qr.shape[2])
        s = torch.matmul(qr[:, :, r0:r1], kr.transpose(-2, -1)) * (scale / stride)
        p = _normalized(s, allowed[r0:r1])  # [B, H, rows, NK·cols]
        p = p.view(b, hq, r1 - r0, nk, cols_per_k).sum(-1)
        out[:, :, r0 // rows_per_q:num_blocks(r1, rows_per_q)] = p.view(b, hq, -1, rows_per_q, nk).mean(3)
    return out


def vertical_slash(q, k, block_m, block_n, offset, scale, last_q: int = 64):
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
    est = (vertical[:, :, None, :] + _own_vertical(q, k, block_m, block_n, offset, scale)) / 2 + slash
    allowed = allowed_blocks(sq, sk, block_m, block_n, offset, q.device)
    est = est.masked_fill(~allowed, 0.0)
    return est / est.sum(-1, keepdim=True).clamp_min(1e-30)


def _own_vertical(q, k, block_m, block_n, offset, scale):
    """[B, H, NQ, NK]: the key-block mass of each query block's middle query (rows chunked: ~2^24 scores)."""
    b, hq, sq, _ = q.shape
    sk = k.shape[2]
    nq, nk = num_blocks(sq, block_m), num_blocks(sk, block_n)
    rows = torch.clamp(torch.arange(nq, device=q.device) * block_m + block_m // 2, max=sq - 1)
    kq = _per_query_head(k, hq).float()
    out = torch.empty(b, hq, nq, nk, device=q.device)
    step = max(1, (1 << 24) // max(1, b * hq * sk))
    for r0 in range(0, nq, step):
        at = rows[r0:r0 + step]
        s = torch.matmul(q[:, :, at].float(), kq.transpose(-2, -1)) * scale  # [B, H, rows, Sk]
        if offset is not None:
            s = s.masked_fill(torch.arange(sk, device=q.device)[None, :] > at[:, None] + offset, float("-inf"))
        p = torch.nan_to_num(torch.softmax(s, -1), nan=0.0)
        out[:, :, r0:r0 + step] = F.pad(p, (0, nk * block_n - sk)).view(b, hq, len(at), nk, block_n).sum(-1)
    return out


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


def _bucket_counts(x: torch.Tensor, planes: torch.Tensor, block: int) -> torch.Tensor:
    """[B, H, S, D] -> [B, H, N, 2^bits]: how many of each block's rows fall in each SimHash bucket."""
    bits = planes.shape[-1]
    code = ((torch.matmul(x.float(), planes) > 0).long() << torch.arange(bits, device=x.device)).sum(-1)  # [B, H, S]
    n = num_blocks(x.shape[2], block)
    owner = torch.arange(x.shape[2], device=x.device) // block
    counts = torch.zeros(*x.shape[:2], n * (1 << bits), device=x.device)
    counts.scatter_add_(-1, owner * (1 << bits) + code, torch.ones(code.shape, device=x.device))
    return counts.view(*x.shape[:2], n, -1)


def lsh(q, k, block_m, block_n, offset, scale, bits: int = 10, rounds: int = 2, seed: int = 0):
    b, hq, sq, d = q.shape
    sk = k.shape[2]
    gen = torch.Generator().manual_seed(seed)
    kq = _per_query_head(k, hq)
    score = torch.zeros(b, hq, num_blocks(sq, block_m), num_blocks(sk, block_n), device=q.device)
    for _ in range(rounds):
        planes = torch.randn(d, bits, generator=gen).to(q.device)  # on the CPU: the same planes on every device
        score += torch.matmul(_bucket_counts(q, planes, block_m), _bucket_counts(kq, planes, block_n).transpose(-2, -1))
    score = score.masked_fill(~allowed_blocks(sq, sk, block_m, block_n, offset, q.device), 0.0)
    return score / score.sum(-1, keepdim=True).clamp_min(1e-30)


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
