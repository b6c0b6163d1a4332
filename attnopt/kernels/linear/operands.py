"""The operands of linear attention, shared by the reference, the chunked CPU path and the ops: their check,
GQA key/value expansion and the denominator's epsilon (the semantics are in
:mod:`attnopt.kernels.linear.reference`)."""

from __future__ import annotations

import torch

from attnopt.kernels.layout import check_qkv

EPS = 1e-6  # added to the normalizing denominator


def expand_kv(t: torch.Tensor, hq: int) -> torch.Tensor:
    """[B, Hkv, ...] -> [B, Hq, ...]: query head h reads key/value head h // (Hq / Hkv)."""
    return t.repeat_interleave(hq // t.shape[1], dim=1) if t.shape[1] != hq else t


def check(q, k, v, log_decay, causal, initial_state, initial_norm) -> None:
    """Raises ValueError for operands outside the semantics of :mod:`attnopt.kernels.linear.reference`."""
    check_qkv(q, k, v, "linear attention")
    b, hq, sq, d = q.shape
    if log_decay is not None and tuple(log_decay.shape) != (hq,):
        raise ValueError(f"log_decay must have shape [{hq}] (one per query head); got {tuple(log_decay.shape)}")
    if causal and sq != k.shape[2]:
        raise ValueError(f"causal linear attention needs as many queries as keys; got {sq} and {k.shape[2]}")
    if not causal and (log_decay is not None or initial_state is not None or initial_norm is not None):
        raise ValueError("non-causal linear attention takes no decay and no initial state")
    if initial_state is not None and tuple(initial_state.shape) != (b, hq, d, v.shape[3]):
        raise ValueError(f"initial_state must have shape {(b, hq, d, v.shape[3])}; got {tuple(initial_state.shape)}")
    if initial_norm is not None and tuple(initial_norm.shape) != (b, hq, d):
        raise ValueError(f"initial_norm must have shape {(b, hq, d)}; got {tuple(initial_norm.shape)}")
