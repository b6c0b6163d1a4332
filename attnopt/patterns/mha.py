"""``nn.MultiheadAttention``: dynamo keeps ``F.multi_head_attention_forward`` as one call in the graph.

The call is replaced by :func:`multi_head_attention_forward`, which does the same projections and
runs the attention core through ``torch.ops.attnopt.attention``. Supported: packed or separate input
projections, ``attn_mask`` (2-D or 3-D, boolean or float), ``key_padding_mask``, dropout; the
attention weights must be unused (``need_weights=False``, or the second output discarded).
"""

from __future__ import annotations

import inspect
import math
import operator

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.fx import Graph, Node

from attnopt.kernels.exact.reference import CAUSAL_NONE
from attnopt.ops import new_seed
from attnopt.patterns import canonical as C
from attnopt.patterns.match import AttentionMatch

_SIGNATURE = inspect.signature(F.multi_head_attention_forward)
_UNSUPPORTED = {
    "bias_k": "bias_k/bias_v (add_bias_kv=True)",
    "bias_v": "bias_k/bias_v (add_bias_kv=True)",
    "static_k": "static_k",
    "static_v": "static_v",
}


def _additive(mask: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """MHA masks use True = masked out; as an additive float mask (-inf where masked)."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, -math.inf)
    return mask.to(dtype)


def multi_head_attention_forward(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    num_heads: int,
    in_proj_weight: Tensor | None,
    in_proj_bias: Tensor | None,
    dropout_p: float,
    out_proj_weight: Tensor,
    out_proj_bias: Tensor | None,
    training: bool,
    key_padding_mask: Tensor | None,
    attn_mask: Tensor | None,
    use_separate_proj_weight: bool,
    q_proj_weight: Tensor | None,
    k_proj_weight: Tensor | None,
    v_proj_weight: Tensor | None,
) -> tuple[Tensor, None]:
    """``F.multi_head_attention_forward`` (sequence-first inputs [L, B, E]) on attnopt's kernel."""
    tgt_len, bsz, embed_dim = query.shape
    src_len = key.shape[0]
    head_dim = embed_dim // num_heads
    if use_separate_proj_weight:
        b_q, b_k, b_v = in_proj_bias.chunk(3) if in_proj_bias is not None else (None, None, None)
        q, k, v = F._in_projection(query, key, value, q_proj_weight, k_proj_weight, v_proj_weight, b_q, b_k, b_v)
    else:
        q, k, v = F._in_projection_packed(query, key, value, in_proj_weight, in_proj_bias)
    # [L, B, E] -> [B, H, L, hd]
    q = q.reshape(tgt_len, bsz, num_heads, head_dim).permute(1, 2, 0, 3)
    k = k.reshape(src_len, bsz, num_heads, head_dim).permute(1, 2, 0, 3)
    v = v.reshape(src_len, bsz, num_heads, v.shape[-1] // num_heads).permute(1, 2, 0, 3)
    mask = _additive(attn_mask, q.dtype)
    if mask is not None:
        mask = mask.reshape(1, 1, tgt_len, src_len) if mask.dim() == 2 else mask.reshape(bsz, num_heads, tgt_len, src_len)
    kpm = _additive(key_padding_mask, q.dtype)
    if kpm is not None:
        kpm = kpm.reshape(bsz, 1, 1, src_len)
        mask = kpm if mask is None else mask + kpm
    p = dropout_p if training else 0.0
    seed = new_seed() if p > 0.0 else None
    out, _ = torch.ops.attnopt.attention(q, k, v, mask, p, CAUSAL_NONE, 1.0 / math.sqrt(head_dim), seed)
    out = out.permute(2, 0, 1, 3).reshape(tgt_len * bsz, -1)  # [L*B, E]
    out = F.linear(out, out_proj_weight, out_proj_bias)
    return out.view(tgt_len, bsz, out.shape[-1]), None


def match(node: Node) -> AttentionMatch | str | None:
    """An :class:`AttentionMatch` for an MHA call, a reason string when it cannot be taken, else None."""
    op = C.classify(node)
    if op is None or op.kind != C.MHA:
        return None
    try:
        bound = _SIGNATURE.bind(*node.args, **node.kwargs)
    except TypeError as exc:
        return f"unrecognized multi_head_attention_forward arguments: {exc}"
    bound.apply_defaults()
    a = bound.arguments
    for name, what in _UNSUPPORTED.items():
        if a[name] is not None:
            return f"nn.MultiheadAttention with {what} is not rewritten yet"
    if a["add_zero_attn"]:
        return "nn.MultiheadAttention with add_zero_attn=True is not rewritten yet"
    qm = C.tensor_meta(a["query"])
    if qm is None or qm.dim() != 3:
        return "unbatched nn.MultiheadAttention input is not rewritten"
    weights_used = [u for u in node.users if not (u.target is operator.getitem and u.args[1] == 0)]
    if a["need_weights"] and weights_used:
        escape = "nn.MultiheadAttention returns its attention weights and they are used (need_weights=True)"
    else:
        escape = None
    keys = [
        "query", "key", "value", "num_heads", "in_proj_weight", "in_proj_bias", "dropout_p", "out_proj_weight",
        "out_proj_bias", "training", "key_padding_mask", "attn_mask", "use_separate_proj_weight", "q_proj_weight",
        "k_proj_weight", "v_proj_weight",
    ]  # fmt: skip
    args = [a[k] for k in keys]

    def custom_emit(graph: Graph, lookup) -> Node:
        return graph.call_function(multi_head_attention_forward, tuple(lookup(x) for x in args))

    heads = a["num_heads"]
    embed = qm.shape[-1]
    m = AttentionMatch(
        kind="mha",
        output=node,
        q=a["query"],
        k=a["key"],
        v=a["value"],
        scale=1.0 / math.sqrt(embed // heads),
        dropout_p=float(a["dropout_p"]) if a["training"] else 0.0,
        escape=escape,
        custom_emit=custom_emit,
    )
    m.info = {"heads": (heads, heads), "head_dims": (embed // heads, embed // heads), "layout": "LBE"}
    m.extra_operands = [x for x in args if isinstance(x, Node)]
    return m
