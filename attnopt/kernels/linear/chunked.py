r"""Chunked linear attention in PyTorch: the CPU implementation of ``torch.ops.attnopt.linear_attention``.

Same semantics as :mod:`attnopt.kernels.linear.reference`, in O(S·C·D + S·D·Dv) work instead of
O(S²·D).

Causal, chunked (Lightning Attention-2). Split the sequence into chunks of ``C`` positions; chunk n
covers ``[nC, nC + len_n)`` (``len_n = C`` except for the last). With local indices a, b, the scaled
queries ``q = s · q``, and ``h_n`` the state carried into chunk n (``h_0`` = the initial state)::

    num_a   = Σ_{b<=a} λ^(a-b) (q_a·k_b) v_b  +  λ^(a+1) q_a h_n          (intra-chunk + inter-chunk)
    h_{n+1} = λ^(len_n) h_n + Σ_b λ^(len_n-1-b) k_bᵀ v_b                  (the final state is h_N)

and the same with ``v_b = 1`` for the denominator (state ``z``). The chunk products ``K_nᵀ V_n`` are
batched over the chunks; only the scan over the chunk states is sequential.

Backward. Normalization rides along as one more value column: with ``v' = [v, 1]`` the numerator and
the denominator are one linear attention ``num' = [num, den]``, whose gradient is ``dO' = [dnum, dden]``
with ``dnum = dO / (den + eps)`` and ``dden = -(dO · out) / (den + eps)`` (``dO' = dO`` unnormalized).
The gradient of the state carried *out of* chunk n, ``g_n = ∂L/∂h_{n+1}``, runs the same scan backwards
with queries in the role of keys and ``dO'`` in the role of values::

    g_{N-1} = dstate_out      g_{n-1} = λ^(len_n) g_n + Σ_a λ^(a+1) q_aᵀ dO'_a      dstate_in = g_{-1}

and, with ``A = (q kᵀ) ⊙ M`` and ``dP = (dO' v'ᵀ) ⊙ M`` the intra-chunk matrices (``M_ab = λ^(a-b)``, b <= a)::

    dq_a = s · [ (dP k)_a + λ^(a+1) dO'_a h_nᵀ ]
    dk_b = (dPᵀ q)_b + λ^(len_n-1-b) v'_b g_nᵀ
    dv'_b = (Aᵀ dO')_b + λ^(len_n-1-b) k_b g_n

Non-causal: ``num' = q (Kᵀ V')``; ``dq = s · dO' (Kᵀ V')ᵀ``, and with ``G = qᵀ dO' + dstate_out``,
``dk = V' Gᵀ``, ``dv' = K G``.

Work items. The CPU path flattens batch and heads and cuts the work by a memory budget: groups of
whole heads, or, when one head's temporaries exceed :data:`PIECE_BYTES`, one head at a time in pieces
of the sequence, the state carried from piece to piece (in the backward, a forward sweep keeps each
piece's incoming state and a reverse sweep carries ``g``). Each item reads contiguous rows, and its
chunked temporaries ([G, N, C, C] and the like) stay a few MiB: allocations of that size are reused from
the heap, while larger ones are mapped fresh and page-faulted in on every call, which costs more than
the arithmetic.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from attnopt.kernels.layout import acc_dtype
from attnopt.kernels.linear.operands import EPS, check, expand_kv

CHUNK = 64
PIECE_BYTES = 8 << 20  # the budget of one chunked temporary of a work item (see "Work items")


def _flush(w: torch.Tensor) -> torch.Tensor:
    """Decay weights below the smallest normal number become 0: fast decays (Lightning's last heads reach
    λ = e^-7) would otherwise leave subnormal weights, which x86 multiplies tens of times slower."""
    return w.masked_fill_(w < torch.finfo(w.dtype).tiny, 0.0)


class _Tables:
    """Decay weights of a chunking of ``s`` positions into ``n`` chunks of ``c`` (see the module docstring).

    For G heads with ``log_decay`` [G] (or none): ``mask`` [G|1, C, C] = λ^(a-b) (b <= a); ``w_q`` [G|1, C]
    = λ^(a+1); ``w_k`` [G|1, N, C] = λ^(len_n-1-b) (0 beyond len_n); ``carry`` [G|1, N] = λ^(len_n).
    """

    def __init__(self, log_decay: torch.Tensor | None, s: int, c: int, device, dtype):
        n = max(-(-s // c), 1)
        a = torch.arange(c, device=device)
        lens = torch.full((n,), c, device=device)
        lens[-1] = s - (n - 1) * c
        dist = a[:, None] - a[None, :]  # [C, C]
        tail = lens[:, None] - 1 - a[None, :]  # [N, C]: positions after b within its chunk
        if log_decay is None:
            self.mask = (dist >= 0).to(dtype)[None]
            self.w_q = torch.ones(1, c, device=device, dtype=dtype)
            self.w_k = (tail >= 0).to(dtype)[None]
            self.carry = torch.ones(1, n, device=device, dtype=dtype)
        else:
            ld = log_decay.to(dtype)
            # exponents are clamped to >= 0 before exp: outside the valid region they would be positive
            self.mask = _flush(torch.exp(dist.clamp_min(0).to(dtype)[None] * ld[:, None, None]) * (dist >= 0))
            self.w_q = _flush(torch.exp((a + 1).to(dtype)[None] * ld[:, None]))
            self.w_k = _flush(torch.exp(tail.clamp_min(0).to(dtype)[None] * ld[:, None, None]) * (tail >= 0))
            self.carry = _flush(torch.exp(lens.to(dtype)[None] * ld[:, None]))
        self.n, self.c = n, c
        self.decay = log_decay is not None


def _plan(bh: int, s: int, widest: int, log_decay, c: int, device, dtype) -> list[tuple[int, int, list]]:
    """How the ``bh`` heads (batch and heads flattened) and ``s`` positions are cut into work items.

    ``[(first head, end head, [(start, end, tables), ...]), ...]``: groups of whole heads when one head's
    temporaries ([S, max(C, D, Dv)] per head) fit :data:`PIECE_BYTES`, else one head at a time in pieces
    of the sequence; either way every item reads contiguous rows of the [BH, S, ·] operands.
    ``log_decay`` is per flattened head ([BH]) or None.
    """
    per_position = max(c, widest) * torch.finfo(dtype).bits // 8
    per_head = max(s, 1) * per_position
    group = max(1, PIECE_BYTES // per_head)
    length = max(1, s) if group > 1 or per_head <= PIECE_BYTES else max(c, PIECE_BYTES // per_position // c * c)
    plan = []
    for h0 in range(0, bh, group):
        h1 = min(bh, h0 + group)
        ld = None if log_decay is None else log_decay[h0:h1]
        pieces, full = [], None
        for lo in range(0, s, length):
            hi = min(s, lo + length)
            if hi - lo < length:
                pieces.append((lo, hi, _Tables(ld, hi - lo, c, device, dtype)))
                continue
            if full is None:
                full = _Tables(ld, length, c, device, dtype)
            pieces.append((lo, hi, full))
        plan.append((h0, h1, pieces))
    return plan


def _chunks(x: torch.Tensor, t: _Tables) -> torch.Tensor:
    """[G, S, E] -> [G, N, C, E], zero-padded at the end."""
    pad = t.n * t.c - x.shape[1]
    return (F.pad(x, (0, 0, 0, pad)) if pad else x).unflatten(1, (t.n, t.c))


def _unchunk(x: torch.Tensor, s: int) -> torch.Tensor:
    return x.flatten(1, 2)[:, :s]


def _scan(init: torch.Tensor, inc: torch.Tensor, t: _Tables, reverse: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """States around each chunk: forward ``h_n`` (before chunk n), reverse ``g_n`` (after chunk n).

    init [G, D, E]; inc [G, N, D, E] (each chunk's own contribution). Forward:
    ``h_{n+1} = carry_n h_n + inc_n``; reverse: ``g_{n-1} = carry_n g_n + inc_n``. Returns (the
    per-chunk states [G, N, D, E], the state past the last step: h_N, or g_{-1}): one small fused step
    per chunk, each writing the next state in place.
    """
    states = torch.empty_like(inc)
    carry = t.carry[..., None, None] if t.decay else None  # [G, N, 1, 1]
    order = list(reversed(range(t.n))) if reverse else list(range(t.n))
    states[:, order[0]] = init
    for prev, i in zip(order, order[1:]):
        if t.decay:
            torch.addcmul(inc[:, prev], states[:, prev], carry[:, prev], out=states[:, i])
        else:
            torch.add(states[:, prev], inc[:, prev], out=states[:, i])
    last = order[-1]
    if t.decay:
        return states, torch.addcmul(inc[:, last], states[:, last], carry[:, last])
    return states, states[:, last] + inc[:, last]


def _causal_forward(qf, kf, vf, init, init_norm, t: _Tables):
    """Unscaled causal numerator [G, S, Dv] and, with ``init_norm`` given, denominator [G, S] of one work item.

    Also returns the final state and norm. Every pass over an [S, ·]-sized tensor counts on a CPU: the
    masks apply in place, decay weights exist only with decay, and the denominator takes row sums of
    the scores rather than a ones column in V.
    """
    s = qf.shape[1]
    qc, kc, vc = _chunks(qf, t), _chunks(kf, t), _chunks(vf, t)  # [G, N, C, *]
    scores = torch.matmul(qc, kc.transpose(-2, -1))  # [G, N, C, C]
    if t.decay:
        scores.mul_(t.mask[:, None])
        kc, qc = kc * t.w_k[..., None], qc * t.w_q[:, None, :, None]
    else:
        scores.tril_()
    before, final = _scan(init, torch.matmul(kc.transpose(-2, -1), vc), t, reverse=False)  # [G, N, D, Dv]
    num = torch.matmul(scores, vc)
    num.flatten(0, 1).baddbmm_(qc.flatten(0, 1), before.flatten(0, 1))  # num += qc @ before, in place
    if init_norm is None:
        return _unchunk(num, s), None, final, None
    z_before, z_final = _scan(init_norm[..., None], kc.sum(dim=-2)[..., None], t, reverse=False)  # [G, N, D, 1]
    den = scores.sum(dim=-1) + torch.matmul(qc, z_before)[..., 0]  # [G, N, C]
    return _unchunk(num, s), _unchunk(den[..., None], s)[..., 0], final, z_final[..., 0]


def _flat(x: torch.Tensor) -> torch.Tensor:
    """[B, H, ...] -> [B*H, ...] (a view when possible)."""
    return x.flatten(0, 1)


def _flat_decay(log_decay: torch.Tensor | None, b: int, dtype) -> torch.Tensor | None:
    """log λ per flattened head [B*H] (head h of every batch)."""
    return None if log_decay is None else log_decay.to(dtype).repeat(b)


def forward(q, k, v, log_decay=None, causal=True, normalize=True, scale=1.0, eps=EPS, initial_state=None,
            initial_norm=None, chunk=CHUNK):  # fmt: skip
    """Returns ``(out [B, Hq, Sq, Dv] in q.dtype, den [B, Hq, Sq], state [B, Hq, D, Dv], norm [B, Hq, D])``.

    ``den`` (the scaled denominator, without eps) and ``norm`` are in the accumulation dtype, and empty
    (shape [0]) unless ``normalize``. The scale multiplies numerator and denominator alike, so it is
    applied once to the output (or to eps: ``s·num / (s·den + eps) = num / (den + eps / s)``).
    """
    check(q, k, v, log_decay, causal, initial_state, initial_norm)
    b, hq, s, d = q.shape
    dv = v.shape[-1]
    acc = acc_dtype(q)
    qf, kf, vf = q.to(acc), expand_kv(k.to(acc), hq), expand_kv(v.to(acc), hq)
    if not causal:
        state = torch.matmul(kf.transpose(-2, -1), vf)  # [B, Hq, D, Dv]
        num = torch.matmul(qf, state)
        norm = kf.sum(dim=-2) if normalize else None  # [B, Hq, D]
        den = torch.matmul(qf, norm[..., None])[..., 0] if normalize else None
    else:
        qf, kf, vf = _flat(qf).contiguous(), _flat(kf).contiguous(), _flat(vf).contiguous()  # [BH, S, *]
        state = qf.new_zeros(b * hq, d, dv) if initial_state is None else _flat(initial_state).to(acc).clone()
        norm = None
        if normalize:
            norm = qf.new_zeros(b * hq, d) if initial_norm is None else _flat(initial_norm).to(acc).clone()
        num = qf.new_empty(b * hq, s, dv)
        den = qf.new_empty(b * hq, s) if normalize else None
        for h0, h1, pieces in _plan(b * hq, s, max(d, dv), _flat_decay(log_decay, b, acc), chunk, q.device, acc):
            for lo, hi, t in pieces:
                rows = (slice(h0, h1), slice(lo, hi))
                piece, piece_den, state[h0:h1], z = _causal_forward(qf[rows], kf[rows], vf[rows], state[h0:h1],
                                                                    norm[h0:h1] if normalize else None, t)  # fmt: skip
                num[rows] = piece
                if normalize:
                    den[rows], norm[h0:h1] = piece_den, z
        num, den, state = num.unflatten(0, (b, hq)), den.unflatten(0, (b, hq)) if normalize else None, \
            state.unflatten(0, (b, hq))
        norm = norm.unflatten(0, (b, hq)) if normalize else None
    if normalize:
        out = num.div_((den + eps / scale)[..., None])
        return out.to(q.dtype), den * scale, state, norm
    return num.mul_(scale).to(q.dtype), qf.new_empty(0), state, qf.new_empty(0)


def _prepare(q, k, v, scale, normalize):
    """Scaled queries and keys/values at Hq heads in the accumulation dtype; v' = [v, 1] when normalized."""
    acc = acc_dtype(q)
    hq = q.shape[1]
    qs = q.to(acc) * scale
    kf, vf = expand_kv(k.to(acc), hq), expand_kv(v.to(acc), hq)
    if normalize:
        vf = torch.cat([vf, vf.new_ones(*vf.shape[:-1], 1)], dim=-1)
    return qs, kf, vf


def _joint_state(state, norm, b, h, d, dv, normalize, like) -> torch.Tensor:
    """[state | norm] as one [B, H, D, Dv (+1)] state (zeros where None)."""
    e = dv + 1 if normalize else dv
    out = like.new_zeros(b, h, d, e)
    if state is not None:
        out[..., :dv] = state
    if normalize and norm is not None:
        out[..., dv] = norm
    return out


def _group_sum(t: torch.Tensor, hkv: int) -> torch.Tensor:
    """[B, Hq, ...] -> [B, Hkv, ...] summing the query heads of each GQA group."""
    b, hq = t.shape[:2]
    return t.reshape(b, hkv, hq // hkv, *t.shape[2:]).sum(dim=2)


def _causal_backward(qs, kf, vf, do, init, dfinal, t: _Tables):
    """``(dq / s, dk, dv', dinit)`` of one work item [G, S, ·], entered with state ``init`` and left with
    gradient ``dfinal``."""
    s = qs.shape[1]
    qc, kc, vc, doc = _chunks(qs, t), _chunks(kf, t), _chunks(vf, t), _chunks(do, t)
    w_q = t.w_q[:, None, :, None]  # [G, 1, C, 1]
    w_k = t.w_k[..., None]  # [G, N, C, 1]
    before, _ = _scan(init, torch.matmul((kc * w_k).transpose(-2, -1), vc), t, reverse=False)
    after, dinit = _scan(dfinal, torch.matmul((qc * w_q).transpose(-2, -1), doc), t, reverse=True)
    mask = t.mask[:, None]  # [G, 1, C, C]
    a = torch.matmul(qc, kc.transpose(-2, -1)) * mask  # [G, N, C, C]
    dp = torch.matmul(doc, vc.transpose(-2, -1)) * mask
    dq = torch.matmul(dp, kc) + w_q * torch.matmul(doc, before.transpose(-2, -1))
    dk = torch.matmul(dp.transpose(-2, -1), qc) + w_k * torch.matmul(vc, after.transpose(-2, -1))
    dvf = torch.matmul(a.transpose(-2, -1), doc) + w_k * torch.matmul(kc, after)
    return _unchunk(dq, s), _unchunk(dk, s), _unchunk(dvf, s), dinit


def _piece_state(kf, vf, init, t: _Tables) -> torch.Tensor:
    """The state a work item hands on: ``λ^len init + Σ_j λ^(len-1-j) k_jᵀ v'_j``, chunk by chunk."""
    kc, vc = _chunks(kf, t), _chunks(vf, t)
    return _scan(init, torch.matmul((kc * t.w_k[..., None]).transpose(-2, -1), vc), t, reverse=False)[1]


def backward(dout, q, k, v, out, den, log_decay=None, causal=True, normalize=True, scale=1.0, eps=EPS,
             initial_state=None, initial_norm=None, dstate=None, dnorm=None, chunk=CHUNK):  # fmt: skip
    """Gradients ``(dq, dk, dv, dinitial_state, dinitial_norm)`` of :func:`forward` (formulas in the module docstring).

    ``dstate``/``dnorm`` are the gradients of the returned final state (None: zero). The two initial-state
    gradients are in the accumulation dtype; ``dinitial_norm`` is None unless ``normalize``; both are
    None for non-causal calls.
    """
    b, hq, s, d = q.shape
    hkv, dv = k.shape[1], v.shape[-1]
    qs, kf, vf = _prepare(q, k, v, scale, normalize)
    acc = qs.dtype
    do = dout.to(acc)
    if normalize:
        inv = 1.0 / (den.to(acc) + eps)  # [B, H, S]
        dden = -(do * out.to(acc)).sum(-1) * inv
        do = torch.cat([do * inv[..., None], dden[..., None]], dim=-1)  # dO' [B, H, S, Dv + 1]
    dfinal = _joint_state(dstate, dnorm, b, hq, d, dv, normalize, qs)
    dinit = None
    if not causal:
        kv = torch.matmul(kf.transpose(-2, -1), vf)  # [B, H, D, E]
        g = torch.matmul(qs.transpose(-2, -1), do) + dfinal
        dq = torch.matmul(do, kv.transpose(-2, -1))
        dk = torch.matmul(vf, g.transpose(-2, -1))
        dvf = torch.matmul(kf, g)
    else:
        qs, kf, vf, do = (_flat(x).contiguous() for x in (qs, kf, vf, do))  # [BH, S, *]
        init = _flat(_joint_state(initial_state, initial_norm, b, hq, d, dv, normalize, qs))
        dinit = _flat(dfinal).clone()
        dq, dk, dvf = torch.empty_like(qs), torch.empty_like(kf), torch.empty_like(vf)
        for h0, h1, pieces in _plan(b * hq, s, max(d, dv + 1), _flat_decay(log_decay, b, acc), chunk, q.device, acc):
            entering = [init[h0:h1]]  # the state entering each piece: a forward sweep
            for lo, hi, t in pieces[:-1]:
                entering.append(_piece_state(kf[h0:h1, lo:hi], vf[h0:h1, lo:hi], entering[-1], t))
            for (lo, hi, t), state in reversed(list(zip(pieces, entering))):  # then the gradients, backwards
                rows = (slice(h0, h1), slice(lo, hi))
                dq[rows], dk[rows], dvf[rows], dinit[h0:h1] = _causal_backward(qs[rows], kf[rows], vf[rows], do[rows],
                                                                               state, dinit[h0:h1], t)  # fmt: skip
        dq, dk, dvf, dinit = (x.unflatten(0, (b, hq)) for x in (dq, dk, dvf, dinit))
    dq = (dq * scale).to(q.dtype)
    dk = _group_sum(dk, hkv).to(k.dtype)
    dv_ = _group_sum(dvf[..., :dv], hkv).to(v.dtype)
    if dinit is None:
        return dq, dk, dv_, None, None
    if not normalize:
        return dq, dk, dv_, dinit, None
    return dq, dk, dv_, dinit[..., :dv].clone(), dinit[..., dv].clone()  # separate tensors, not views of one
