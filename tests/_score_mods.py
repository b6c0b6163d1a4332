"""The score_mod collection the score_mod tests run: attention-gym's and hand-written ones, and a dense reference.

Each entry of :func:`collection` is ``name -> (score_mod, tensors)``: ``tensors`` are the captured tensors that
require a gradient (their gradients are checked too). Sizes: ``H`` heads, sequences up to ``MAX_S``.
"""

import math

import torch
from attn_gym.mods import (
    generate_activation_score_mod,
    generate_alibi_bias,
    generate_graphormer_edge_bias,
    generate_graphormer_spatial_bias,
    generate_sandwich_bias,
    generate_tanh_softcap,
    shortest_path_distances,
    shortest_path_edge_types,
)

H = 4
MAX_S = 40


def t5_bucket(rel, num_buckets=8, max_distance=32):
    """T5's bidirectional ``_relative_position_bucket`` of ``rel = kv_idx - q_idx``."""
    half = num_buckets // 2
    ret = (rel > 0).to(torch.long) * half
    n = torch.abs(rel)
    max_exact = half // 2
    large = max_exact + (torch.log(n.float() / max_exact) / math.log(max_distance / max_exact)
                         * (half - max_exact)).to(torch.long)
    large = torch.minimum(large, torch.full_like(large, half - 1))
    return ret + torch.where(n < max_exact, n, large)


def collection(batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    t5_table = torch.randn(8, H, generator=g).requires_grad_()  # [buckets, H], T5's embedding layout
    rel_table = torch.randn(H, 2 * MAX_S - 1, generator=g).requires_grad_()
    head_scale = torch.rand(H, generator=g) + 0.5
    spatial = torch.randn(H, 6, generator=g).requires_grad_()
    adjacency = torch.rand(batch, MAX_S, MAX_S, generator=g) > 0.7
    distances = shortest_path_distances(adjacency, 4)
    edge_bias = torch.randn(H, 3, 5, generator=g).requires_grad_()
    edge_types = torch.randint(0, 5, (batch, MAX_S, MAX_S), generator=g)
    path_types, path_lengths = shortest_path_edge_types(adjacency, edge_types, 3)
    bias_2d = torch.randn(H, 5, 5, generator=g)

    def t5(score, b, h, q_idx, kv_idx):
        return score + t5_table[t5_bucket(kv_idx - q_idx), h]

    def relative_table(score, b, h, q_idx, kv_idx):
        return score + rel_table[h, kv_idx - q_idx + MAX_S - 1]

    def causal_score(score, b, h, q_idx, kv_idx):
        return torch.where(q_idx >= kv_idx, score, -float("inf"))

    def per_head_scale(score, b, h, q_idx, kv_idx):
        return head_scale[h] * score  # the score on the right: d(a * score) = a

    def blocks(score, b, h, q_idx, kv_idx):  # floor division and remainder on indices; a 2-D bias on blocks
        same = (q_idx // 8) == (kv_idx // 8)
        return torch.where(same, score, score - 1.5) + bias_2d[h, q_idx % 5, torch.remainder(kv_idx - 3, 5)]

    def clamped_alibi(score, b, h, q_idx, kv_idx):
        distance = torch.clamp((kv_idx - q_idx).abs(), max=6)
        return torch.minimum(score, torch.tensor(3.0)) - distance * 0.25 * (h + 1)

    def sigmoid_gate(score, b, h, q_idx, kv_idx):
        return score * torch.sigmoid(score) + torch.exp2(-torch.sqrt((kv_idx + 1.0) / (q_idx + 1.0)))

    return {
        "alibi": (generate_alibi_bias(H), []),
        "softcap": (generate_tanh_softcap(2), []),
        "sandwich": (generate_sandwich_bias(H, MAX_S), []),
        "graphormer_spatial": (generate_graphormer_spatial_bias(spatial, distances), [spatial]),
        "graphormer_edge": (generate_graphormer_edge_bias(edge_bias, path_types, path_lengths), [edge_bias]),
        "activation": (generate_activation_score_mod(), []),
        "t5": (t5, [t5_table]),
        "relative_table": (relative_table, [rel_table]),
        "causal_score": (causal_score, []),
        "per_head_scale": (per_head_scale, []),
        "blocks": (blocks, []),
        "clamped_alibi": (clamped_alibi, []),
        "sigmoid_gate": (sigmoid_gate, []),
    }


NAMES = tuple(collection())


def dense_reference(q, k, v, score_mod, keep=None, scale=None):
    """``(out, lse)`` computing ``score_mod`` on the whole ``[B, Hq, Sq, Sk]`` score matrix (eager, differentiable);
    ``keep(b, h, q_idx, kv_idx)`` hides keys where False."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = (q @ k.transpose(-1, -2)) * scale

    def idx(n, dim):
        return torch.arange(n, dtype=torch.int32).view([-1 if i == dim else 1 for i in range(4)])

    b, h, qi, ki = (idx(n, d) for d, n in enumerate(s.shape))
    s = score_mod(s, b, h, qi, ki)
    if keep is not None:
        s = torch.where(keep(b, h, qi, ki), s, -float("inf"))
    return torch.softmax(s, -1).nan_to_num() @ v, torch.logsumexp(s, -1)
