r"""Plain PyTorch reference for linear attention: the quadratic form (the oracle) and the recurrence.

Semantics (linear attention, and Lightning attention with its decay). The operands are *features*: the feature
map φ (:func:`feature_map`) is applied to the queries and keys before they reach these functions (the
variant writes it into the graph). With ``s = scale``, a per-query-head decay ``λ = exp(log_decay)``
(1 without decay) and ``M_ij = λ^(i-j)`` for ``j <= i`` (0 above the diagonal) when causal, ``M = 1``
otherwise::

    num_i = s · Σ_j M_ij (q_i · k_j) v_j          den_i = s · Σ_j M_ij (q_i · k_j)
    out_i = num_i / (den_i + eps)   if normalize      out_i = num_i   otherwise

Q: [B, Hq, Sq, D], K: [B, Hkv, Sk, D], V: [B, Hkv, Sk, Dv], Hq % Hkv == 0 (query head h reads key/value
head h // (Hq / Hkv)); ``log_decay``: [Hq], entries <= 0.

Normalization is the denominator ``φ(Q)(φ(K)ᵀ1)`` of Katharopoulos et al. plus ``eps``; it is only
meaningful for non-negative features (elu+1, relu). TransNormer's alternative, an RMS norm of the
unnormalized output (``attnopt.Linear(normalize="rms")``), is applied by the variant after the op with
``normalize=False`` here.

Causal attention carries a state. After positions ``0..t`` of a call started from ``S₀, z₀``::

    S_t = λ S_{t-1} + k_tᵀ v_t   [D, Dv]          z_t = λ z_{t-1} + k_t   [D]
    num_t = s · q_t S_t                            den_t = s · q_t · z_t

so ``num_t = s · Σ_{j<=t} λ^(t-j) (q_t·k_j) v_j + s · λ^(t+1) q_t S₀`` (the quadratic form above, plus the
initial state decayed across the ``t + 1`` positions of this call). The state holds no scale; it is
what :func:`linear_attention_step` carries from token to token and what lets a long sequence be
processed in pieces. Causal calls need ``Sq == Sk`` (the positions are shared). Non-causal calls have
no decay and no initial state; their final state is ``Σ_j k_jᵀ v_j`` (and ``z = Σ_j k_j``).

Everything is computed in fp32 (fp64 for fp64 inputs); outputs are cast to q's dtype, states stay in
the accumulation dtype. This file is the oracle: it materializes the ``[Sq, Sk]`` score matrix.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from attnopt.kernels.layout import acc_dtype
from attnopt.kernels.linear.operands import EPS, check, expand_kv

FEATURE_MAPS = ("elu", "relu", "identity")


def feature_map(x: torch.Tensor, name: str) -> torch.Tensor:
    """φ(x): ``"elu"`` is elu(x) + 1 (positive), ``"relu"`` max(x, 0), ``"identity"`` x.

    elu(x) + 1 is computed as ``x + 1`` for x > 0 and ``exp(x)`` otherwise: the sum ``(exp(x) - 1) + 1``
    cancels to exactly 0 in bf16/fp16 for x < -5.5 (a zero feature, a zero denominator). The exp branch
    reads ``min(x, 0)`` so that large positive x cannot overflow it (an inf there would make the
    gradient of the unselected branch 0 · inf = NaN).
    """
    if name == "elu":
        return torch.where(x > 0, x + 1.0, torch.exp(x.clamp(max=0.0)))
    if name == "relu":
        return F.relu(x)
    if name == "identity":
        return x
    raise ValueError(f"unknown feature map {name!r}; use one of {FEATURE_MAPS}")


def lightning_log_decay(num_heads: int, layer_idx: int, num_layers: int) -> torch.Tensor:
    """Lightning Attention's per-layer schedule: ``log λ_h = -(8 / H) · (1 - l / L) · h`` for h = 0..H-1.

    Head 0 never decays; decay grows with the head index and shrinks towards the last layer (as fla's
    ``chunk_lightning_attn(layer_idx, num_layers)``). Returns [H] fp32.
    """
    if not 0 <= layer_idx < num_layers:
        raise ValueError(f"layer_idx must be in 0..{num_layers - 1}; got {layer_idx}")
    rate = 8.0 / num_heads * (1.0 - layer_idx / num_layers)
    return -rate * torch.arange(num_heads, dtype=torch.float32)


def decay_matrix(log_decay: torch.Tensor | None, sq: int, sk: int, causal: bool, device, dtype) -> torch.Tensor:
    """M [Hq or 1, Sq, Sk]: ``λ^(i-j)`` on and below the diagonal, 0 above (causal); all ones otherwise."""
    if not causal:
        return torch.ones(1, sq, sk, device=device, dtype=dtype)
    dist = (torch.arange(sq, device=device)[:, None] - torch.arange(sk, device=device)[None, :]).to(dtype)
    below = dist >= 0
    if log_decay is None:
        return below.to(dtype)[None]
    # clamp before exp: above the diagonal (i - j) * log λ would be positive and could overflow
    return torch.exp(dist.clamp_min(0)[None] * log_decay.to(dtype)[:, None, None]) * below


def linear_attention(q, k, v, log_decay=None, causal=True, normalize=True, scale=1.0, eps=EPS,
                     initial_state=None, initial_norm=None):  # fmt: skip
    """The quadratic form. Returns ``(out [B, Hq, Sq, Dv] in q.dtype, state [B, Hq, D, Dv], norm [B, Hq, D] or None)``.

    ``norm`` is None unless ``normalize``. Differentiable by autograd (the oracle of the backward).
    """
    check(q, k, v, log_decay, causal, initial_state, initial_norm)
    acc = acc_dtype(q)
    hq, sq, sk = q.shape[1], q.shape[2], k.shape[2]
    qf, kf, vf = q.to(acc), expand_kv(k.to(acc), hq), expand_kv(v.to(acc), hq)
    m = decay_matrix(log_decay, sq, sk, causal, q.device, acc)  # [Hq or 1, Sq, Sk]
    scores = scale * torch.matmul(qf, kf.transpose(-2, -1)) * m  # [B, Hq, Sq, Sk]
    num = torch.matmul(scores, vf)  # [B, Hq, Sq, Dv]
    den = scores.sum(dim=-1)  # [B, Hq, Sq]
    # weight of the state carried in: λ^(i+1) for query i; of key j in the state carried out: λ^(Sk-1-j)
    if causal and log_decay is not None:
        ld = log_decay.to(acc)[:, None]
        w_in = torch.exp((torch.arange(sq, device=q.device, dtype=acc) + 1) * ld)  # [Hq, Sq]
        w_key = torch.exp((sk - 1 - torch.arange(sk, device=q.device, dtype=acc)) * ld)  # [Hq, Sk]
        carry = torch.exp(sk * ld)[:, :, None]  # [Hq, 1, 1]: λ^Sk on the initial state
    else:
        w_in = torch.ones(1, sq, device=q.device, dtype=acc)
        w_key = torch.ones(1, sk, device=q.device, dtype=acc)
        carry = torch.ones(1, 1, 1, device=q.device, dtype=acc)
    if initial_state is not None:
        num = num + scale * w_in[..., None] * torch.matmul(qf, initial_state.to(acc))
    if initial_norm is not None and normalize:
        den = den + scale * w_in * (qf * initial_norm.to(acc)[:, :, None, :]).sum(-1)
    kw = kf * w_key[..., None]  # [B, Hq, Sk, D]
    state = torch.matmul(kw.transpose(-2, -1), vf)  # [B, Hq, D, Dv]
    if initial_state is not None:
        state = state + carry * initial_state.to(acc)
    norm = None
    if normalize:
        norm = kw.sum(dim=-2)  # [B, Hq, D]
        if initial_norm is not None:
            norm = norm + carry[..., 0] * initial_norm.to(acc)
        num = num / (den + eps)[..., None]
    return num.to(q.dtype), state, norm


def linear_attention_step(q_t, k_t, v_t, state=None, norm_state=None, log_decay=None, scale=1.0, normalize=True,
                          eps=EPS):  # fmt: skip
    """One token of causal linear attention in O(D·Dv) per head: the recurrence of the module docstring.

    q_t [B, Hq, D], k_t [B, Hkv, D], v_t [B, Hkv, Dv]; ``state`` [B, Hq, D, Dv] and ``norm_state``
    [B, Hq, D] in the accumulation dtype (None: zeros, the start of a sequence). Returns
    ``(o_t [B, Hq, Dv] in q_t.dtype, state, norm_state)``; ``norm_state`` stays None unless ``normalize``.
    """
    acc = acc_dtype(q_t)
    hq = q_t.shape[1]
    qf = q_t.to(acc)
    kf, vf = expand_kv(k_t.to(acc), hq), expand_kv(v_t.to(acc), hq)
    kv = kf[..., :, None] * vf[..., None, :]  # [B, Hq, D, Dv]
    lam = None if log_decay is None else torch.exp(log_decay.to(acc))[:, None]  # [Hq, 1]
    state = kv if state is None else (state * lam[..., None] if lam is not None else state) + kv
    num = scale * torch.einsum("bhd,bhde->bhe", qf, state)
    if normalize:
        norm_state = kf if norm_state is None else (norm_state * lam if lam is not None else norm_state) + kf
        den = scale * (qf * norm_state).sum(-1)
        num = num / (den + eps)[..., None]
    return num.to(q_t.dtype), state, norm_state


def linear_attention_recurrent(q, k, v, log_decay=None, normalize=True, scale=1.0, eps=EPS, initial_state=None,
                               initial_norm=None):  # fmt: skip
    """Causal linear attention token by token through :func:`linear_attention_step` (a second oracle).

    Same arguments and results as :func:`linear_attention` with ``causal=True``.
    """
    check(q, k, v, log_decay, True, initial_state, initial_norm)
    state, norm = initial_state, initial_norm if normalize else None
    outs = []
    for t in range(q.shape[2]):
        o, state, norm = linear_attention_step(q[:, :, t], k[:, :, t], v[:, :, t], state, norm, log_decay, scale,
                                               normalize, eps)  # fmt: skip
        outs.append(o)
    if state is None:  # an empty sequence: the initial state (zeros) passes through
        b, hq, _, d = q.shape
        state = q.new_zeros(b, hq, d, v.shape[-1], dtype=acc_dtype(q))
        norm = q.new_zeros(b, hq, d, dtype=acc_dtype(q)) if normalize else None
    out = torch.stack(outs, dim=2) if outs else q.new_empty(*q.shape[:3], v.shape[-1])
    return out, state, norm
