"""Causal linear attention over a sharded sequence by state passing (LASP-style).

Chunk ``c`` (``L`` positions, global order) reduces its keys and values to a state with no initial one,
``S_c = Σ_t λ^(L-1-t) k_tᵀ v_t`` ``[D, Dv]`` per query head (and the normalizer ``z_c = Σ_t λ^(L-1-t) k_t``).
One all-gather shares these states (``chunks per rank · B · Hq · (D·Dv + D)`` elements sent per rank,
independent of S); each rank then forms the exclusive prefix ``I_{c+1} = Λ I_c + S_c`` (``Λ = λ^L``, the
decay across one chunk) and runs attnopt's linear kernel on its chunks from ``I_c``: exactly the
sequential recurrence, which the kernels define.

The backward runs the kernel's backward per chunk from ``I_c``, giving ``∂/∂I_c``; one all-gather of those
gradients gives every chunk's ``∂/∂S_j = T_{j+1}`` with ``T_c = ∂/∂I_c + Λ T_{c+1}``, whose contribution to
``dk`` and ``dv`` is closed form (``S_j`` is a weighted sum of ``k_tᵀ v_t``). The returned final state is that
of the whole sequence (the same on every rank); a gradient on it enters as ``T_n`` (summed over ranks).
"""

from __future__ import annotations

import torch
from torch import Tensor

from attnopt.distributed.comm import acc
from attnopt.distributed.softmax import Shards


def _weights(log_decay: Tensor | None, hq: int, size: int, like: Tensor) -> Tensor:
    """``[Hq, L]``: ``λ^(L-1-t)``, the weight of position t in its chunk's state."""
    steps = torch.arange(size - 1, -1, -1, dtype=acc(like), device=like.device)
    if log_decay is None:
        return torch.ones(hq, size, dtype=acc(like), device=like.device)
    return torch.exp(log_decay.to(acc(like))[:, None] * steps)


def _chunk_state(k: Tensor, v: Tensor, w: Tensor) -> Tensor:
    """``[B, Hq, D·Dv + D]``: the chunk's state and normalizer, flattened (k, v ``[B, Hkv, L, *]``)."""
    b, hkv, _, d = k.shape
    wg = w.view(hkv, -1, w.shape[1])
    kk, vv = k.to(w.dtype), v.to(w.dtype)
    state = torch.einsum("hgt,bhtd,bhte->bhgde", wg, kk, vv).reshape(b, -1, d * v.shape[-1])
    norm = torch.einsum("hgt,bhtd->bhgd", wg, kk).reshape(b, -1, d)
    return torch.cat([state, norm], -1)


def _global_order(shards: Shards, stacked: Tensor) -> list[Tensor]:
    """Per global chunk, from ``[W, slots, ...]`` gathered per rank's chunks."""
    out = [None] * shards.layout.chunks
    for rank in range(shards.layout.world):
        for slot, c in enumerate(shards.layout.chunks_of(rank)):
            out[c] = stacked[rank, slot]
    return out


def _prefixes(shards: Shards, k: Tensor, v: Tensor, log_decay, hq: int) -> tuple[list[Tensor], Tensor, Tensor]:
    """``(I_c for every global chunk and one past the end, Λ [1, Hq, 1], weights [Hq, L])``."""
    mine = shards.layout.chunks_of(shards.comm.rank)
    size = k.shape[2] // len(mine)
    w = _weights(log_decay, hq, size, k)
    local = torch.stack([_chunk_state(kc, vc, w) for kc, vc in zip(k.chunk(len(mine), 2), v.chunk(len(mine), 2))])
    states = _global_order(shards, shards.comm.all_gather(local))
    lam = torch.ones(1, hq, 1, dtype=w.dtype, device=w.device) if log_decay is None else \
        torch.exp(log_decay.to(w.dtype) * size).reshape(1, hq, 1)  # fmt: skip
    prefix = [torch.zeros_like(states[0])]
    for s in states:
        prefix.append(lam * prefix[-1] + s)
    return prefix, lam, w


def _split(flat: Tensor, d: int, dv: int) -> tuple[Tensor, Tensor]:
    return flat[..., :d * dv].reshape(*flat.shape[:2], d, dv), flat[..., d * dv:]


def _check(causal: bool, initial_state, initial_norm) -> None:
    if not causal:
        raise NotImplementedError("context parallelism runs causal linear attention (Linear(causal=True)); a "
                                  "non-causal linear site needs no sequence order: run it without context_parallel")  # fmt: skip
    if initial_state is not None or initial_norm is not None:
        raise NotImplementedError("context parallelism of linear attention starts from no initial state (the "
                                  "state is passed between ranks); recurrent generation runs on one process")  # fmt: skip


def forward(shards: Shards, q, k, v, log_decay, causal, normalize, scale, eps, initial_state, initial_norm):
    """The op's ``(out, den, state, norm)`` for this rank's shards; the state is the whole sequence's."""
    _check(causal, initial_state, initial_norm)
    d, dv, hq = q.shape[-1], v.shape[-1], q.shape[1]
    prefix, _, _ = _prefixes(shards, k, v, log_decay, hq)
    mine = shards.layout.chunks_of(shards.comm.rank)
    n = len(mine)
    outs, dens = [], []
    for c, qc, kc, vc in zip(mine, q.chunk(n, 2), k.chunk(n, 2), v.chunk(n, 2)):
        state, norm = _split(prefix[c], d, dv)
        out, den, _, _ = torch.ops.attnopt.linear_attention.default(
            qc.contiguous(), kc.contiguous(), vc.contiguous(), log_decay, True, normalize, scale, eps,
            state.contiguous(), norm.contiguous() if normalize else None)  # fmt: skip
        outs.append(out)
        dens.append(den)
    state, norm = _split(prefix[-1], d, dv)
    den = torch.cat(dens, 2) if normalize else dens[0]
    return (torch.cat(outs, 2).contiguous(), den.contiguous(), state.contiguous(),
            norm.contiguous() if normalize else norm.new_empty(0))  # fmt: skip


def backward(shards: Shards, dout, q, k, v, out, den, log_decay, causal, normalize, scale, eps, initial_state,
             initial_norm, dstate, dnorm):  # fmt: skip
    """``(dq, dk, dv, None, None)`` for this rank's shards."""
    _check(causal, initial_state, initial_norm)
    d, dv_, hq = q.shape[-1], v.shape[-1], q.shape[1]
    prefix, lam, w = _prefixes(shards, k, v, log_decay, hq)
    mine = shards.layout.chunks_of(shards.comm.rank)
    n = len(mine)
    pieces = [t.chunk(n, 2) for t in (dout, q, k, v, out)]
    dens = den.chunk(n, 2) if normalize else [den] * n
    grads, direct = [], []
    for i, c in enumerate(mine):
        state, norm = _split(prefix[c], d, dv_)
        dq, dk, dv, dinit, dnorm_c = torch.ops.attnopt.linear_attention_backward.default(
            *(p[i].contiguous() for p in pieces), dens[i].contiguous(),
            log_decay, True, normalize, scale, eps, state.contiguous(), norm.contiguous() if normalize else None,
            None, None)  # fmt: skip
        grads.append([dq, dk, dv])
        dnorm_c = dnorm_c if normalize else torch.zeros_like(norm)
        direct.append(torch.cat([dinit.flatten(2), dnorm_c], -1))
    direct.append(_final_grad(dstate, dnorm, prefix[-1], d, dv_))
    gathered = shards.comm.all_gather(torch.stack(direct))  # [W, n + 1, B, Hq, F]
    total = gathered[:, n].sum(0)
    per_chunk = _global_order(shards, gathered[:, :n])
    dstates = [None] * shards.layout.chunks  # ∂/∂S_j = T_{j+1}
    for c in range(shards.layout.chunks - 1, -1, -1):
        dstates[c] = total
        total = per_chunk[c] + lam * total
    for i, c in enumerate(mine):
        dk_s, dv_s = _state_grads(pieces[2][i], pieces[3][i], w, dstates[c], d, dv_)
        grads[i][1] = grads[i][1] + dk_s.to(k.dtype)
        grads[i][2] = grads[i][2] + dv_s.to(v.dtype)
    dq, dk, dv = (torch.cat([g[j] for g in grads], 2).contiguous() for j in range(3))
    return dq, dk, dv, None, None


def _final_grad(dstate, dnorm, like: Tensor, d: int, dv: int) -> Tensor:
    """The gradient on the returned final state, flattened like a chunk state (zeros when none)."""
    flat = torch.zeros_like(like)
    if dstate is not None and dstate.numel():
        flat[..., :d * dv] = dstate.flatten(2).to(flat.dtype)
    if dnorm is not None and dnorm.numel():
        flat[..., d * dv:] = dnorm.to(flat.dtype)
    return flat


def _state_grads(k: Tensor, v: Tensor, w: Tensor, dflat: Tensor, d: int, dv: int) -> tuple[Tensor, Tensor]:
    """``(dk, dv)`` of the chunk state ``S = Σ_t w_t k_tᵀ v_t`` (and ``z = Σ_t w_t k_t``) given their gradient."""
    b, hkv = k.shape[:2]
    dstate, dnorm = _split(dflat, d, dv)
    dstate = dstate.reshape(b, hkv, -1, d, dv)
    dnorm = dnorm.reshape(b, hkv, -1, d)
    wg = w.view(hkv, -1, w.shape[1])
    kk, vv = k.to(w.dtype), v.to(w.dtype)
    dk = torch.einsum("hgt,bhgde,bhte->bhtd", wg, dstate, vv) + torch.einsum("hgt,bhgd->bhtd", wg, dnorm)
    dv_ = torch.einsum("hgt,bhgde,bhtd->bhte", wg, dstate, kk)
    return dk, dv_
