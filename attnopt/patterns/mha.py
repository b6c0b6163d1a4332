"""``nn.MultiheadAttention`` and the fast path of ``nn.TransformerEncoderLayer``, each one call in the graph.

Dynamo keeps ``F.multi_head_attention_forward`` as one call; it is replaced by
:func:`multi_head_attention_forward`, which does the same projections and runs the attention core
through ``torch.ops.attnopt.attention``. Supported: packed or separate input projections (kdim/vdim),
``attn_mask`` (2-D or 3-D, boolean or float), ``key_padding_mask``, dropout; the attention weights
must be unused (``need_weights=False``, or the second output discarded).

``nn.TransformerEncoderLayer`` in eval mode without gradients (and ``nn.Transformer``'s encoder)
takes PyTorch's fast path, ``torch._transformer_encoder_layer_fwd``: the whole layer is one call, and
is replaced by :func:`transformer_encoder_layer_forward`, the same layer with attnopt's kernel.
"""

from __future__ import annotations

import inspect
import math
import operator

import networkx as nx
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.fx import Graph, Node

from attnopt.kernels.exact.reference import CAUSAL_NONE, CAUSAL_TOP_LEFT
from attnopt.kernels.exact.ops import new_seed
from attnopt.patterns.canonical import ENCODER_LAYER, MHA, bind_call, tensor_meta
from attnopt.patterns.match import AttentionMatch, BoolMask, Miss, Term
from attnopt.patterns.operands import as_int, describe

_SIGNATURE = inspect.signature(F.multi_head_attention_forward)


def _additive(mask: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """MHA masks use True = masked out; as an additive float mask (-inf where masked)."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, -math.inf)
    return mask.to(dtype)


def _in_projection(query: Tensor, key: Tensor, value: Tensor, weights: Tensor | tuple,
                   bias: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """q, k, v projected by the packed in_proj weight, or by separate (q, k, v) weights."""
    if not isinstance(weights, tuple):
        return F._in_projection_packed(query, key, value, weights, bias)
    b_q, b_k, b_v = bias.chunk(3) if bias is not None else (None, None, None)
    return F._in_projection(query, key, value, *weights, b_q, b_k, b_v)


def _pad_keys(masks: tuple) -> tuple:
    """The masks with one more key (attended): after a key is appended (bias_k, add_zero_attn)."""
    return tuple(F.pad(m, (0, 1)) if m is not None else None for m in masks)


def _heads(x: Tensor, static: Tensor | None, bsz: int, num_heads: int, head_dim: int) -> Tensor:
    """A projected [S, B, E] key or value (or its static [B*H, S, hd] replacement) as [B, H, S, hd]."""
    if static is not None:
        return static.reshape(bsz, num_heads, static.shape[1], head_dim)
    return x.reshape(x.shape[0], bsz, num_heads, head_dim).permute(1, 2, 0, 3)


def _merged_mask(mask: Tensor | None, kpm: Tensor | None, bsz: int, num_heads: int, tgt_len: int,
                 src_len: int) -> Tensor | None:  # fmt: skip
    """The additive attn_mask (2-D or 3-D) and key padding mask as one mask broadcasting to [B, H, L, S]."""
    if mask is not None:
        shape = (1, 1, tgt_len, src_len) if mask.dim() == 2 else (bsz, num_heads, tgt_len, src_len)
        mask = mask.reshape(shape)
    if kpm is not None:
        kpm = kpm.reshape(bsz, 1, 1, src_len)
        mask = kpm if mask is None else mask + kpm
    return mask


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
    bias_k: Tensor | None = None,
    bias_v: Tensor | None = None,
    add_zero_attn: bool = False,
    static_k: Tensor | None = None,
    static_v: Tensor | None = None,
    need_weights: bool = False,
    is_causal: bool = False,
) -> tuple[Tensor, None]:
    """``F.multi_head_attention_forward`` (sequence-first inputs [L, B, E]) on attnopt's kernel.

    Mirrors PyTorch's function step by step: in-projections, ``bias_k``/``bias_v`` appended to the keys
    and values, ``static_k``/``static_v``, ``add_zero_attn``, the ``is_causal`` hint (the mask is dropped
    for the causal flag exactly when PyTorch drops it), masks (True = masked out, or additive).
    """
    tgt_len, bsz, embed_dim = query.shape
    head_dim = embed_dim // num_heads
    weights = (q_proj_weight, k_proj_weight, v_proj_weight) if use_separate_proj_weight else in_proj_weight
    q, k, v = _in_projection(query, key, value, weights, in_proj_bias)
    causal = CAUSAL_NONE
    if is_causal and key_padding_mask is None and not need_weights:
        attn_mask, causal = None, CAUSAL_TOP_LEFT  # PyTorch trusts the hint and runs SDPA with is_causal
    masks = (_additive(attn_mask, q.dtype), _additive(key_padding_mask, q.dtype))
    if bias_k is not None and bias_v is not None:
        k = torch.cat([k, bias_k.repeat(1, bsz, 1)])
        v = torch.cat([v, bias_v.repeat(1, bsz, 1)])
        masks = _pad_keys(masks)
    # [L, B, E] -> [B, H, L, hd] (static_k/static_v arrive as [B*H, S, hd])
    q = q.reshape(tgt_len, bsz, num_heads, head_dim).permute(1, 2, 0, 3)
    k = _heads(k, static_k, bsz, num_heads, head_dim)
    v = _heads(v, static_v, bsz, num_heads, head_dim)
    if add_zero_attn:
        k = torch.cat([k, k.new_zeros(bsz, num_heads, 1, head_dim)], dim=2)
        v = torch.cat([v, v.new_zeros(bsz, num_heads, 1, head_dim)], dim=2)
        masks = _pad_keys(masks)
    mask = _merged_mask(*masks, bsz, num_heads, tgt_len, k.shape[2])
    p = dropout_p if training else 0.0
    seed = new_seed() if p > 0.0 else None
    out, _ = torch.ops.attnopt.attention(q, k, v, mask, p, causal, 1.0 / math.sqrt(head_dim), seed)
    out = out.permute(2, 0, 1, 3).reshape(tgt_len * bsz, -1)  # [L*B, E]
    out = F.linear(out, out_proj_weight, out_proj_bias)
    return out.view(tgt_len, bsz, out.shape[-1]), None


def _fast_path_mask(mask: Tensor | None, mask_type: int | None, bsz: int, heads: int, seq: int,
                    dtype: torch.dtype) -> Tensor | None:  # fmt: skip
    """The fast path's merged mask (True = masked out, or additive) as an additive [B or 1, H or 1, S, S] mask."""
    if mask is None:
        return None
    mask = _additive(mask, dtype)
    if mask_type == 1:
        return mask.reshape(bsz, 1, 1, seq)
    if mask.dim() == 2:
        return mask.reshape(1, 1, seq, seq)
    if mask.dim() == 3:
        return mask.reshape(bsz, -1, seq, seq)
    return mask


def transformer_encoder_layer_forward(
    src: Tensor,
    embed_dim: int,
    num_heads: int,
    qkv_weight: Tensor,
    qkv_bias: Tensor,
    proj_weight: Tensor,
    proj_bias: Tensor,
    use_gelu: bool,
    norm_first: bool,
    eps: float,
    norm_weight_1: Tensor,
    norm_bias_1: Tensor,
    norm_weight_2: Tensor,
    norm_bias_2: Tensor,
    ffn_weight_1: Tensor,
    ffn_bias_1: Tensor,
    ffn_weight_2: Tensor,
    ffn_bias_2: Tensor,
    mask: Tensor | None = None,
    mask_type: int | None = None,
) -> Tensor:
    """``torch._transformer_encoder_layer_fwd`` (batch-first [B, S, E], eval) on attnopt's kernel."""
    bsz, seq, _ = src.shape
    head_dim = embed_dim // num_heads

    def self_attention(x: Tensor) -> Tensor:
        q, k, v = F.linear(x, qkv_weight, qkv_bias).chunk(3, dim=-1)
        q, k, v = (t.reshape(bsz, seq, num_heads, head_dim).transpose(1, 2) for t in (q, k, v))
        attn_mask = _fast_path_mask(mask, mask_type, bsz, num_heads, seq, q.dtype)
        out, _ = torch.ops.attnopt.attention(q, k, v, attn_mask, 0.0, CAUSAL_NONE, 1.0 / math.sqrt(head_dim), None)
        return F.linear(out.transpose(1, 2).reshape(bsz, seq, embed_dim), proj_weight, proj_bias)

    def feed_forward(x: Tensor) -> Tensor:
        h = F.linear(x, ffn_weight_1, ffn_bias_1)
        h = F.gelu(h) if use_gelu else F.relu(h)
        return F.linear(h, ffn_weight_2, ffn_bias_2)

    shape = (embed_dim,)
    if norm_first:
        x = src + self_attention(F.layer_norm(src, shape, norm_weight_1, norm_bias_1, eps))
        return x + feed_forward(F.layer_norm(x, shape, norm_weight_2, norm_bias_2, eps))
    x = F.layer_norm(src + self_attention(src), shape, norm_weight_1, norm_bias_1, eps)
    return F.layer_norm(x + feed_forward(x), shape, norm_weight_2, norm_bias_2, eps)


_ENCODER_SIGNATURE = inspect.signature(transformer_encoder_layer_forward)


def match_encoder_layer(node: Node, dag: nx.DiGraph | None = None) -> AttentionMatch:
    """The match of the fast path of ``nn.TransformerEncoderLayer`` (the whole layer is replaced)."""
    a = bind_call(node, ENCODER_LAYER, _ENCODER_SIGNATURE, "_transformer_encoder_layer_fwd")
    if not isinstance(a, dict):
        raise Miss(a or f"{describe(node)} is not a _transformer_encoder_layer_fwd call")
    src = tensor_meta(a["src"])
    if src is None or src.dim() != 3 or getattr(src, "is_nested", False):
        raise Miss("the fast path's input is not a dense batch-first [B, S, E] tensor")
    if not isinstance(a["embed_dim"], int) or not isinstance(a["num_heads"], int):
        raise Miss("embed_dim/num_heads are not constants in the graph")
    args = list(a.values())

    def custom_emit(graph: Graph, lookup) -> Node:
        return graph.call_function(transformer_encoder_layer_forward, tuple(lookup(x) for x in args))

    heads, hd = a["num_heads"], a["embed_dim"] // a["num_heads"]
    info = {"heads": (heads, heads), "head_dims": (hd, hd), "layout": "BSE (encoder layer fast path)",
            "seq": (as_int(src.shape[1]), as_int(src.shape[1])), "batch": as_int(src.shape[0])}  # fmt: skip
    return AttentionMatch(kind="mha", output=node, q=a["src"], k=a["src"], v=a["src"], scale=1.0 / math.sqrt(hd),
                          custom_emit=custom_emit, info=info, extra_operands=[x for x in args if isinstance(x, Node)],
                          additive=[Term(a["mask"])] if a["mask"] is not None else [])  # fmt: skip


def refuse_native(node: Node, dag: nx.DiGraph | None = None) -> AttentionMatch:
    """``torch._native_multi_head_attention`` is never taken: a :class:`Miss` saying so."""
    raise Miss("torch._native_multi_head_attention (a MultiheadAttention fast path) is not rewritten")


_KEYS = [
    "query", "key", "value", "num_heads", "in_proj_weight", "in_proj_bias", "dropout_p", "out_proj_weight",
    "out_proj_bias", "training", "key_padding_mask", "attn_mask", "use_separate_proj_weight", "q_proj_weight",
    "k_proj_weight", "v_proj_weight", "bias_k", "bias_v", "add_zero_attn", "static_k", "static_v",
    "need_weights", "is_causal",
]  # fmt: skip


def _arguments(node: Node) -> dict:
    """The call's arguments by name; a :class:`Miss` when they are not ones the rewrite takes."""
    a = bind_call(node, MHA, _SIGNATURE, "multi_head_attention_forward")
    if not isinstance(a, dict):
        raise Miss(a or f"{describe(node)} is not a multi_head_attention_forward call")
    if not isinstance(a["add_zero_attn"], bool) or not isinstance(a["is_causal"], bool):
        raise Miss("add_zero_attn/is_causal are not constants in the graph")
    if not isinstance(a["need_weights"], bool) or not isinstance(a["training"], bool):
        raise Miss("need_weights/training are not constants in the graph")
    qm = tensor_meta(a["query"])
    if qm is None or qm.dim() != 3:
        raise Miss("unbatched nn.MultiheadAttention input is not rewritten")
    return a


def _info(a: dict) -> dict:
    qm, km, vm = tensor_meta(a["query"]), tensor_meta(a["key"]), tensor_meta(a["value"])
    heads, embed = a["num_heads"], as_int(qm.shape[-1])
    dv = vm.shape[-1] if vm is not None else embed
    if a["use_separate_proj_weight"] and tensor_meta(a["v_proj_weight"]) is not None:
        dv = tensor_meta(a["v_proj_weight"]).shape[0]
    dv = as_int(dv)
    return {"heads": (heads, heads), "head_dims": (embed // heads, dv // heads if isinstance(dv, int) else dv),
            "layout": "LBE", "seq": (as_int(qm.shape[0]), as_int(km.shape[0]) if km is not None else "?"),
            "batch": as_int(qm.shape[1])}  # fmt: skip


def _masks(a: dict) -> dict:
    """The causal flag (when PyTorch drops the mask for it), the attn_mask and the key padding mask."""
    fields: dict = {"additive": [], "bool_masks": []}
    if a["is_causal"] and a["key_padding_mask"] is None and not a["need_weights"]:
        fields["causal"] = CAUSAL_TOP_LEFT  # the mask is dropped for the causal flag, as PyTorch does
    elif a["attn_mask"] is not None:
        fields["additive"].append(Term(a["attn_mask"]))
    if a["key_padding_mask"] is not None:
        fields["bool_masks"].append(BoolMask(a["key_padding_mask"], attend_when=False))
    return fields


def match(node: Node, dag: nx.DiGraph | None = None) -> AttentionMatch:
    """The :class:`AttentionMatch` of an MHA call; a :class:`Miss` with the reason when it cannot be taken."""
    a = _arguments(node)
    weights_used = [u for u in node.users if not (u.target is operator.getitem and u.args[1] == 0)]
    escape = None
    if a["need_weights"] and weights_used:
        escape = "nn.MultiheadAttention returns its attention weights and they are used (need_weights=True)"
    args = [a[k] for k in _KEYS]

    def custom_emit(graph: Graph, lookup) -> Node:
        return graph.call_function(multi_head_attention_forward, tuple(lookup(x) for x in args))

    embed = as_int(tensor_meta(a["query"]).shape[-1])
    operands = [x for x in args if isinstance(x, Node)]
    return AttentionMatch(kind="mha", output=node, q=a["query"], k=a["key"], v=a["value"],
                          scale=1.0 / math.sqrt(embed // a["num_heads"]),
                          dropout_p=float(a["dropout_p"]) if a["training"] else 0.0, escape=escape,
                          custom_emit=custom_emit, info=_info(a), extra_operands=operands, **_masks(a))  # fmt: skip
