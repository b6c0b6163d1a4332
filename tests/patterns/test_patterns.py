"""Every written form of attention attnopt detects, captured by dynamo and run through the pipeline.

Each form has a positive test (rewritten exactly: decision "exact", one attnopt op, equal outputs, the
site's heads / causal flag / mask recorded) and a negative one (the probabilities escape: the site is
kept as it was, with the reason). Every pass's output graph is linted.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import attnopt

from _detect_helpers import capture, pipeline_backend, run_pipeline
from conftest import rel_err

pytestmark = pytest.mark.usefixtures("one_thread")


def n_ops(ctxs) -> int:
    """The exact attention ops in the rewritten graphs (a score term such as ALiBi runs in score_mod_attention)."""
    exact = (torch.ops.attnopt.attention.default, torch.ops.attnopt.score_mod_attention.default)
    return sum(n.target in exact for c in ctxs for n in c.final.graph.nodes)


def sites(ctxs):
    return [s for c in ctxs for s in c.sites]


def _first(x):
    return x[0] if isinstance(x, tuple) else x


B, H, S, D = 2, 4, 7, 8
G = torch.Generator().manual_seed(0)


def qkv(sq=S, sk=S, hq=H, hkv=H, d=D, dv=D, dtype=torch.float32):
    g = torch.Generator().manual_seed(1)
    q = torch.randn(B, hq, sq, d, generator=g, dtype=dtype)
    k = torch.randn(B, hkv, sk, d, generator=g, dtype=dtype)
    v = torch.randn(B, hkv, sk, dv, generator=g, dtype=dtype)
    return q, k, v


def pad_mask(sk=S) -> torch.Tensor:
    m = torch.ones(B, sk, dtype=torch.long)
    m[-1, -2:] = 0
    return m


def repeat_kv(x: torch.Tensor, n: int) -> torch.Tensor:
    b, h, s, d = x.shape
    return x[:, :, None, :, :].expand(b, h, n, s, d).reshape(b, h * n, s, d)


class Form(nn.Module):
    """One written form: ``fn(self, q, k, v, *extra) -> (out, probabilities)``."""

    def __init__(self, fn, escape=False, **params):
        super().__init__()
        self.fn, self.escape = fn, escape
        for name, value in params.items():
            if isinstance(value, nn.Parameter):
                self.register_parameter(name, value)
            elif isinstance(value, torch.Tensor):
                self.register_buffer(name, value)
            else:
                setattr(self, name, value)

    def forward(self, *args):
        out, p = self.fn(self, *args)
        return (out, p) if self.escape else out


def softmax_v(s, v):
    p = F.softmax(s, dim=-1)
    return p @ v, p


# --------------------------------------------------------------------------------------------- forms
def scale_mul(m, q, k, v):
    return softmax_v(torch.matmul(q, k.transpose(-2, -1)) * (1 / math.sqrt(D)), v)


def scale_div(m, q, k, v):
    return softmax_v((q @ k.transpose(-1, -2)) / math.sqrt(q.size(-1)), v)


def scale_on_q(m, q, k, v):
    return softmax_v((q * D**-0.5) @ k.mT, v)


def scale_on_k(m, q, k, v):
    return softmax_v(q @ (k / math.sqrt(D)).transpose(2, 3), v)


def scale_split_sqrt(m, q, k, v):
    return softmax_v((q * D**-0.25) @ (k * D**-0.25).transpose(-2, -1), v)


def scale_absent(m, q, k, v):  # T5
    return softmax_v(q @ k.transpose(-2, -1), v)


def scale_tensor(m, q, k, v):  # a 0-d buffer
    return softmax_v(q @ k.transpose(-2, -1) * m.temperature, v)


def scale_per_head(m, q, k, v):  # a learned per-head temperature [1, H, 1, 1] (e.g. Swin v2's logit scale)
    return softmax_v(q @ k.transpose(-2, -1) * m.logit_scale.exp(), v)


def mask_additive(m, q, k, v, mask):
    return softmax_v(q @ k.transpose(-2, -1) / math.sqrt(D) + mask, v)


def mask_masked_fill(m, q, k, v, mask):
    return softmax_v((q @ k.transpose(-2, -1) / math.sqrt(D)).masked_fill(~mask, float("-inf")), v)


def mask_where(m, q, k, v, mask):
    s = q @ k.transpose(-2, -1) / math.sqrt(D)
    return softmax_v(torch.where(mask, s, torch.finfo(s.dtype).min), v)


def mask_tril(m, q, k, v):
    s = q @ k.transpose(-2, -1) / math.sqrt(D)
    n = s.size(-1)
    return softmax_v(s.masked_fill(torch.tril(torch.ones(n, n, dtype=torch.bool)) == 0, float("-inf")), v)


def mask_triu_additive(m, q, k, v):
    n = q.size(-2)
    return softmax_v(q @ k.transpose(-2, -1) / math.sqrt(D) + torch.triu(torch.full((n, n), float("-inf")), 1), v)


def mask_arange_and_padding(m, q, k, v, attention_mask):
    """HF's masking_utils: kv_idx <= q_idx and the padding, then to an additive -inf mask."""
    s = q @ k.transpose(-2, -1) / math.sqrt(D)
    qi = torch.arange(s.size(-2))[None, None, :, None]
    ki = torch.arange(s.size(-1))[None, None, None, :]
    keep = (ki <= qi) & attention_mask[:, None, None, :].bool()
    return softmax_v(s + torch.where(keep, 0.0, float("-inf")), v)


def mask_causal_buffer(m, q, k, v):  # GPT-2 / nanoGPT: a slice of a registered lower-triangular buffer
    s = q @ k.transpose(-2, -1) / math.sqrt(D)
    n = s.size(-1)
    return softmax_v(s.masked_fill(m.bias[:, :, :n, :n] == 0, float("-inf")), v)


def mask_padding_from_attention_mask(m, q, k, v, attention_mask):  # BERT (classic): (1 - m) * -10000
    ext = (1.0 - attention_mask[:, None, None, :].float()) * -10000.0
    return softmax_v(q @ k.transpose(-2, -1) / math.sqrt(D) + ext, v)


def bias_relative(m, q, k, v):  # T5 / Swin: a learned [1, H, S, S] bias
    return softmax_v(q @ k.transpose(-2, -1) + m.rel_bias, v)


def bias_alibi_baddbmm(m, q, k, v, attention_mask):
    """Bloom: ALiBi through baddbmm on merged [B*H, S, D], views between the softmax and the bmm."""
    b, h, s, d = q.shape
    slopes = torch.tensor([2 ** (-8 * (i + 1) / h) for i in range(h)])
    pos = (attention_mask.cumsum(-1) - 1) * attention_mask
    alibi = (slopes[None, :, None] * pos[:, None, :]).reshape(b * h, 1, s)
    scores = torch.baddbmm(alibi, q.reshape(b * h, s, d), k.reshape(b * h, s, d).transpose(-1, -2),
                           beta=1.0, alpha=1 / math.sqrt(d))  # fmt: skip
    w = scores.view(b, h, s, s)
    w = w + torch.where(attention_mask[:, None, None, :].bool(), 0.0, torch.finfo(w.dtype).min)
    p = F.softmax(w, dim=-1, dtype=torch.float32).to(q.dtype)
    out = torch.bmm(p.view(b * h, s, s), v.reshape(b * h, s, d)).view(b, h, s, d)
    return out, p


def softcap(m, q, k, v):  # Gemma 2
    s = q @ k.transpose(-2, -1) * D**-0.5
    s = torch.tanh(s / 50.0) * 50.0
    return softmax_v(s, v)


def layout_einsum_bshd(m, q, k, v):  # inputs [B, S, H, D]
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(D)
    p = s.softmax(-1)
    return torch.einsum("bhqk,bkhd->bqhd", p, v), p


def layout_einsum_ellipsis(m, q, k, v):
    p = torch.softmax(torch.einsum("...qd,...kd->...qk", q, k) * D**-0.5, dim=-1)
    return torch.einsum("...qk,...kd->...qd", p, v), p


def layout_merged_bmm(m, q, k, v):
    b, h, s, d = q.shape
    q3, k3, v3 = (t.reshape(b * h, -1, d) for t in (q, k, v))
    p = torch.softmax(torch.bmm(q3, k3.transpose(1, 2)) / math.sqrt(d), dim=-1)
    return torch.bmm(p, v3).view(b, h, s, d), p


def layout_k_pretransposed(m, q, k_t, v):  # keys stored [B, H, D, S]
    return softmax_v(q @ k_t / math.sqrt(D), v)


def layout_fp32_upcast(m, q, k, v):
    s = q @ k.transpose(-2, -1) / math.sqrt(D)
    p = F.softmax(s.float(), dim=-1).to(q.dtype)
    return p @ v, p


def gqa_repeat_kv(m, q, k, v):
    k, v = repeat_kv(k, q.shape[1] // k.shape[1]), repeat_kv(v, q.shape[1] // k.shape[1])
    return softmax_v(q @ k.transpose(2, 3) / math.sqrt(D), v)


def gqa_repeat_interleave(m, q, k, v):
    n = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(n, dim=1), torch.repeat_interleave(v, n, dim=1)
    return softmax_v(q @ k.transpose(2, 3) / math.sqrt(D), v)


def gqa_mqa_broadcast(m, q, k, v):  # one key/value head, broadcast by matmul
    return softmax_v(q @ k.transpose(2, 3) / math.sqrt(D), v)


def gqa_grouped_5d(m, q, k, v):
    b, hq, s, d = q.shape
    hkv = k.shape[1]
    sc = q.view(b, hkv, hq // hkv, s, d) @ k.unsqueeze(2).transpose(-1, -2) / math.sqrt(d)
    p = sc.softmax(-1)
    return (p @ v.unsqueeze(2)).flatten(1, 2), p


def cross_attention(m, q, k, v):  # Sq != Sk, keys from an encoder
    return softmax_v(q @ k.transpose(-2, -1) / math.sqrt(D), v)


def rowmax_shift(m, q, k, v):  # the numerically-stable spelling subtracts the row max first
    s = q @ k.transpose(-2, -1) / math.sqrt(D)
    return softmax_v(s - s.amax(dim=-1, keepdim=True), v)


def softmax_written_out(m, q, k, v):  # exp / sum, with the row max subtracted
    s = q @ k.transpose(-2, -1) / math.sqrt(D)
    e = torch.exp(s - s.max(dim=-1, keepdim=True)[0])
    p = e / e.sum(dim=-1, keepdim=True)
    return p @ v, p


def dropout_train(m, q, k, v):
    p = F.dropout(F.softmax(q @ k.transpose(-2, -1) / math.sqrt(D), dim=-1), p=0.25, training=True)
    return p @ v, p


def _bool_mask(sq=S, sk=S):
    g = torch.Generator().manual_seed(2)
    mask = torch.rand(B, 1, sq, sk, generator=g) > 0.3
    mask[..., 0] = True
    return mask


def _pretransposed(q, k, v):
    return q, k.transpose(-2, -1).contiguous(), v


def _float_mask():
    return torch.zeros(B, 1, S, S).masked_fill(~_bool_mask(), float("-inf"))


# name -> (fn, inputs, params, expectations)
FORMS = {
    "scale_mul": (scale_mul, lambda: qkv(), {}, {"scale": D**-0.5}),
    "scale_div": (scale_div, lambda: qkv(), {}, {"scale": D**-0.5}),
    "scale_on_q": (scale_on_q, lambda: qkv(), {}, {"scale": D**-0.5}),
    "scale_on_k": (scale_on_k, lambda: qkv(), {}, {"scale": D**-0.5}),
    "scale_split_sqrt": (scale_split_sqrt, lambda: qkv(), {}, {"scale": D**-0.5}),
    "scale_absent": (scale_absent, lambda: qkv(), {}, {"scale": 1.0}),
    "scale_tensor": (scale_tensor, lambda: qkv(), {"temperature": torch.tensor(D**-0.5)}, {}),
    "scale_per_head": (scale_per_head, lambda: qkv(), {"logit_scale": nn.Parameter(torch.randn(1, H, 1, 1) * 0.1)}, {}),
    "mask_additive": (mask_additive, lambda: (*qkv(), _float_mask()), {}, {"mask": "additive"}),
    "mask_masked_fill": (mask_masked_fill, lambda: (*qkv(), _bool_mask()), {}, {"mask": "bool"}),
    "mask_where": (mask_where, lambda: (*qkv(), _bool_mask()), {}, {"mask": "bool"}),
    "mask_tril_causal": (mask_tril, lambda: qkv(), {}, {"causal": "top-left", "mask": "none"}),
    "mask_triu_additive_causal": (mask_triu_additive, lambda: qkv(), {}, {"causal": "top-left", "mask": "none"}),
    "mask_arange_and_padding": (mask_arange_and_padding, lambda: (*qkv(), pad_mask()), {},
                                {"causal": "top-left", "mask": "bool"}),
    "mask_causal_buffer": (mask_causal_buffer, lambda: qkv(),
                           {"bias": torch.tril(torch.ones(16, 16)).view(1, 1, 16, 16)}, {"mask": "bool"}),
    "mask_padding_from_attention_mask": (mask_padding_from_attention_mask, lambda: (*qkv(), pad_mask()), {},
                                         {"mask": "additive"}),
    "bias_relative": (bias_relative, lambda: qkv(), {"rel_bias": nn.Parameter(torch.randn(1, H, S, S))},
                      {"mask": "additive", "scale": 1.0}),
    "bias_alibi_baddbmm": (bias_alibi_baddbmm, lambda: (*qkv(), pad_mask()), {},
                           {"mask": "additive", "heads": (H, H), "scale": D**-0.5}),
    "softcap": (softcap, lambda: qkv(), {}, {"scale": D**-0.5, "softcap": 50.0}),
    "layout_einsum_bshd": (layout_einsum_bshd, lambda: tuple(t.transpose(1, 2).contiguous() for t in qkv()), {},
                           {"heads": (H, H), "seq": (S, S)}),
    "layout_einsum_ellipsis": (layout_einsum_ellipsis, lambda: qkv(), {}, {}),
    "layout_merged_bmm": (layout_merged_bmm, lambda: qkv(), {}, {"heads": (H, H)}),
    "layout_k_pretransposed": (layout_k_pretransposed, lambda: _pretransposed(*qkv()), {}, {}),
    "layout_fp32_upcast_bf16": (layout_fp32_upcast, lambda: qkv(dtype=torch.bfloat16), {}, {"tol": 3e-2}),
    "gqa_repeat_kv": (gqa_repeat_kv, lambda: qkv(hkv=2), {}, {"heads": (H, 2)}),
    "gqa_repeat_interleave": (gqa_repeat_interleave, lambda: qkv(hkv=2), {}, {"heads": (H, 2)}),
    "gqa_mqa_broadcast": (gqa_mqa_broadcast, lambda: qkv(hkv=1), {}, {"heads": (H, 1)}),
    "gqa_grouped_5d": (gqa_grouped_5d, lambda: qkv(hkv=2), {}, {"heads": (H, 2)}),
    "cross_attention": (cross_attention, lambda: qkv(sq=5, sk=11), {}, {"seq": (5, 11)}),
    "rowmax_shift": (rowmax_shift, lambda: qkv(), {}, {"mask": "none"}),
    "softmax_written_out": (softmax_written_out, lambda: qkv(), {}, {"mask": "none", "scale": D**-0.5}),
    "dropout_train": (dropout_train, lambda: qkv(), {}, {"dropout_p": 0.25}),
}  # fmt: skip


@pytest.mark.parametrize("name", list(FORMS))
def test_form_is_rewritten_exactly(name):
    fn, make_inputs, params, want = FORMS[name]
    module = Form(fn, **params)
    args = make_inputs()
    ctxs, got = capture(module, *args)
    (site,) = sites(ctxs)
    assert site.decision == "exact", site.reason
    assert not [m for c in ctxs for m in c.misses]
    assert n_ops(ctxs) == 1
    if "dropout_p" in want:
        assert site.dropout_p == want["dropout_p"] and "dropout is random" in site.reason
        return
    with torch.no_grad():
        ref = module(*args)
    assert rel_err(got, ref) < want.get("tol", 1e-4)
    assert site.deviation is not None and site.deviation < want.get("tol", 1e-4)
    assert site.heads == want.get("heads", (site.heads[0], site.heads[0]))
    for key in ("causal", "mask", "seq"):
        if key in want:
            assert getattr(site, key) == want[key], (key, getattr(site, key))
    if "scale" in want:
        assert site.scale == pytest.approx(want["scale"])
    if "softcap" in want:
        (d,) = [r.detection for c in ctxs for r in c.records]
        assert d.match.softcap == pytest.approx(want["softcap"])


@pytest.mark.parametrize("name", [n for n in FORMS if n != "dropout_train"])
def test_form_with_escaping_probabilities_is_kept(name):
    fn, make_inputs, params, _ = FORMS[name]
    module = Form(fn, escape=True, **params)
    args = make_inputs()
    ctxs, (out, p) = capture(module, *args)
    (site,) = sites(ctxs)
    assert site.decision == "keep" and "probabilities" in site.reason and "used by" in site.reason
    assert n_ops(ctxs) == 0
    with torch.no_grad():
        ref_out, ref_p = module(*args)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(p, ref_p)


def test_escaping_scores_are_kept():
    def fn(m, q, k, v):
        s = q @ k.transpose(-2, -1) / math.sqrt(D)
        out, _ = softmax_v(s, v)
        return out, s  # e.g. a model returning pre-softmax logits

    ctxs, _ = capture(Form(fn, escape=True), *qkv())
    (site,) = sites(ctxs)
    assert site.decision == "keep" and "scores" in site.reason


def test_safe_softmax_is_read_as_softmax():
    """``torch._safe_softmax`` (zeros for fully masked rows) appears in graphs from make_fx/export; dynamo
    cannot trace it, so this form is checked on a symbolically traced graph."""
    class SafeSoftmax(nn.Module):
        def forward(self, q, k, v, mask):
            s = (q @ k.transpose(-2, -1) / math.sqrt(D)).masked_fill(~mask, float("-inf"))
            return torch._safe_softmax(s, -1) @ v

    args = (*qkv(), _bool_mask())
    gm, ctx = run_pipeline(SafeSoftmax(), args)
    (site,) = ctx.sites
    assert site.decision == "exact" and site.mask == "bool"
    assert rel_err(gm(*args), SafeSoftmax()(*args)) < 1e-5


# ------------------------------------------------------------------------------------------ modules
def _mha_case(batch_first, **kw):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 4, batch_first=batch_first, **kw).eval()
    x = torch.randn(2, 6, 16)
    kv_in = torch.randn(2, 9, kw.get("kdim", 16)), torch.randn(2, 9, kw.get("vdim", 16))
    if not batch_first:
        x, kv_in = x.transpose(0, 1), tuple(t.transpose(0, 1) for t in kv_in)
    return mha, x, kv_in


MHA_CASES = ["self", "self_seq_first", "cross_kdim_vdim", "key_padding_mask", "attn_mask_bool", "attn_mask_float_3d",
             "need_weights_unused", "bias_kv_zero_attn", "is_causal"]  # fmt: skip


@pytest.mark.parametrize("case", MHA_CASES)
def test_multihead_attention_is_rewritten(case):
    kw = {"kdim": 8, "vdim": 12} if case == "cross_kdim_vdim" else {}
    if case == "bias_kv_zero_attn":
        kw = {"add_bias_kv": True, "add_zero_attn": True}
    mha, x, (k, v) = _mha_case(case != "self_seq_first", **kw)
    call = {"need_weights": case == "need_weights_unused"}
    if case == "cross_kdim_vdim":
        inputs = (x, k, v)
    else:
        inputs = (x, x, x)
    if case == "key_padding_mask":
        kpm = torch.zeros(2, 6, dtype=torch.bool)
        kpm[1, -2:] = True
        call["key_padding_mask"] = kpm
    elif case == "attn_mask_bool":
        call["attn_mask"] = torch.triu(torch.ones(6, 6, dtype=torch.bool), 1)
    elif case == "attn_mask_float_3d":
        call["attn_mask"] = torch.randn(2 * 4, 6, 6)
    elif case == "bias_kv_zero_attn":
        call["key_padding_mask"] = torch.zeros(2, 6, dtype=torch.bool)
        call["attn_mask"] = torch.triu(torch.ones(6, 6, dtype=torch.bool), 1)
    elif case == "is_causal":
        call.update(attn_mask=torch.triu(torch.ones(6, 6, dtype=torch.bool), 1), is_causal=True)

    class Wrap(nn.Module):
        def forward(self, *a):
            return mha(*a, **call)[0]

    ctxs, got = capture(Wrap(), *inputs)
    (site,) = sites(ctxs)
    assert site.kind == "mha" and site.decision == "exact", site.reason
    assert n_ops(ctxs) == 0  # MHA is replaced by attnopt's implementation, which calls the op at run time
    with torch.no_grad():
        assert rel_err(got, Wrap()(*inputs)) < 1e-5
    if case == "cross_kdim_vdim":
        assert site.seq == (6, 9)
    if case == "is_causal":
        assert site.causal == "top-left"


def test_multihead_attention_weights_used_are_kept():
    mha, x, _ = _mha_case(True)

    class Wrap(nn.Module):
        def forward(self, x):
            out, w = mha(x, x, x, need_weights=True)
            return out, w

    ctxs, _ = capture(Wrap(), x)
    (site,) = sites(ctxs)
    assert site.decision == "keep" and "weights" in site.reason


def test_multi_head_attention_forward_called_directly():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 4).eval()
    x = torch.randn(6, 2, 16)

    def fn(x):
        return F.multi_head_attention_forward(x, x, x, 16, 4, mha.in_proj_weight, mha.in_proj_bias, None, None,
                                              False, 0.0, mha.out_proj.weight, mha.out_proj.bias,
                                              training=False, need_weights=False)[0]  # fmt: skip

    ctxs, got = capture(fn, x)
    (site,) = sites(ctxs)
    assert site.decision == "exact"
    assert rel_err(got, fn(x)) < 1e-5


def _enc_inputs():
    torch.manual_seed(0)
    x = torch.randn(2, 6, 16)
    kpm = torch.zeros(2, 6, dtype=torch.bool)
    kpm[1, -2:] = True
    return x, kpm


@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("activation", ["relu", "gelu"])
@pytest.mark.parametrize("masks", ["none", "padding", "both"])
def test_encoder_layer_fast_path_is_rewritten(norm_first, activation, masks):
    """eval + no_grad: nn.TransformerEncoderLayer runs torch._transformer_encoder_layer_fwd (one call)."""
    layer = nn.TransformerEncoderLayer(16, 4, 32, batch_first=True, norm_first=norm_first, activation=activation)
    layer.eval()
    x, kpm = _enc_inputs()
    kw = {} if masks == "none" else {"src_key_padding_mask": kpm}
    if masks == "both":
        kw["src_mask"] = torch.triu(torch.ones(6, 6, dtype=torch.bool), 1)

    class Wrap(nn.Module):
        def forward(self, x):
            return layer(x, **kw)

    ctxs, got = capture(Wrap(), x)
    assert any(n.target is torch._transformer_encoder_layer_fwd for c in ctxs for n in c.original.graph.nodes)
    (site,) = sites(ctxs)
    assert site.decision == "exact" and site.kind == "mha", site.reason
    assert not any(n.target is torch._transformer_encoder_layer_fwd for c in ctxs for n in c.final.graph.nodes)
    with torch.no_grad():
        assert rel_err(got, Wrap()(x)) < 1e-5


def test_encoder_layer_in_training_goes_through_multi_head_attention():
    layer = nn.TransformerEncoderLayer(16, 4, 32, batch_first=True, dropout=0.0)  # training mode, no dropout
    x, kpm = _enc_inputs()
    ctxs, got = capture(lambda x: layer(x, src_key_padding_mask=kpm), x)
    (site,) = sites(ctxs)
    assert site.decision == "exact" and site.kind == "mha"
    assert rel_err(got, layer(x, src_key_padding_mask=kpm)) < 1e-5


@pytest.mark.parametrize("train", [False, True])
def test_transformer_every_attention_is_rewritten(train):
    torch.manual_seed(0)
    model = nn.Transformer(16, 4, 2, 2, 32, dropout=0.0, batch_first=True).train(train)
    src, tgt = torch.randn(2, 9, 16), torch.randn(2, 6, 16)
    # tgt_is_causal=True as PyTorch recommends: left unset, nn.Transformer checks the mask's values (a
    # data-dependent graph break). In eval + no_grad the encoder layers take the fast path.
    kw = {"tgt_mask": nn.Transformer.generate_square_subsequent_mask(6), "tgt_is_causal": True}
    opt = attnopt.optimize(model, "exact", (src, tgt), kw)
    rep = attnopt.report(opt)
    assert len(rep.sites) == 6 and all(s.decision == "exact" for s in rep.sites), str(rep)
    assert {s.name for s in rep.sites} >= {"decoder.layers.0.self_attn", "decoder.layers.1.multihead_attn"}
    assert rep.site("decoder.layers.0.self_attn").causal == "top-left"
    with torch.no_grad():
        assert rel_err(opt(src, tgt, **kw), model(src, tgt, **kw)) < 1e-4


# ---------------------------------------------------------------------------------- canonical helpers
def test_layout_regrouping():
    from attnopt.patterns.layout import LayoutError, convert, groups

    assert groups((8,), (2, 4)) == [((0, 1), (0, 2))]
    assert groups((2, 2, 3), (2, 6)) == [((0, 1), (0, 1)), ((1, 3), (1, 2))]
    ops, lead = convert((2, 1), (2, 2, 3)[:2], (2, 2), "kv")
    assert lead == (2, 1) and ops == ()
    ops, lead = convert((2, 2, 1), (2, 2, 3), (2, 6), "kv")  # GQA by broadcasting: 2 kv heads for 6 queries
    assert lead == (2, 2) and ops == (("flatten", (1, 2)),)
    ops, lead = convert((8,), (8,), (2, 4), "full")
    assert lead == (2, 4) and ops == (("unflatten", (0, (2, 4))),)
    ops, lead = convert((1,), (8,), (2, 4), "term")
    assert lead == (1, 1)
    with pytest.raises(LayoutError):
        convert((3,), (8,), (2, 4), "term")


def test_causal_recognition_is_exact_only():
    from attnopt.kernels.exact.reference import CAUSAL_BOTTOM_RIGHT, CAUSAL_NONE, CAUSAL_TOP_LEFT
    from attnopt.patterns.causal import causal_kind, has_empty_rows

    tl = torch.tril(torch.ones(4, 4, dtype=torch.bool))
    assert causal_kind(tl, 4, 4) == CAUSAL_TOP_LEFT
    br = torch.ones(3, 5, dtype=torch.bool).tril(2)
    assert causal_kind(br, 3, 5) == CAUSAL_BOTTOM_RIGHT
    window = tl & ~torch.tril(torch.ones(4, 4, dtype=torch.bool), -2)
    assert causal_kind(window, 4, 4) == CAUSAL_NONE  # a sliding window is not the causal mask
    assert causal_kind(tl[None, None].expand(2, 1, 4, 4), 4, 4) == CAUSAL_TOP_LEFT
    assert has_empty_rows(CAUSAL_BOTTOM_RIGHT, 5, 3) and not has_empty_rows(CAUSAL_TOP_LEFT, 5, 3)


# ------------------------------------------------------------------------------------- dynamic shapes
@pytest.mark.parametrize("name", ["scale_div", "mask_tril_causal", "layout_merged_bmm", "bias_alibi_baddbmm",
                                  "gqa_repeat_kv", "layout_einsum_bshd"])  # fmt: skip
def test_forms_under_dynamic_shapes(name):
    """Symbolic sizes: nothing is baked in (views use -1 or sizes read at run time), a mask built from
    symbolic sizes is not provably causal and stays a mask, and every shape runs exactly."""
    fn, make_inputs, params, _ = FORMS[name]
    module = Form(fn, **params)
    contexts = []
    torch._dynamo.reset()
    compiled = torch.compile(module, backend=pipeline_backend(contexts), dynamic=True, fullgraph=True)
    base = make_inputs()
    with torch.no_grad():
        for seq in (7, 5, 9):
            args = tuple(_resize(t, seq, name) for t in base)
            assert rel_err(compiled(*args), module(*args)) < 1e-5, seq
    assert any(isinstance(x, torch.SymInt) for x in contexts[0].example_inputs)  # a symbolic graph
    for ctx in contexts:
        (site,) = ctx.sites
        assert site.decision == "exact", site.reason
        if name == "mask_tril_causal":
            assert site.causal == "none" and site.mask == "bool"


def _resize(t: torch.Tensor, seq: int, name: str) -> torch.Tensor:
    """The example input ``t`` with its sequence dims (those of size S) made ``seq`` long."""
    if t.dtype == torch.long:  # an attention mask [B, S]
        m = torch.ones(t.shape[0], seq, dtype=torch.long)
        m[-1, -2:] = 0
        return m
    out = t
    for d, n in enumerate(t.shape):
        if n == S and not (name == "layout_einsum_bshd" and d == 3) and not (d == t.dim() - 1 and n == D):
            reps = math.ceil(seq / n)
            out = torch.cat([out] * reps, dim=d).narrow(d, 0, seq).contiguous()
    return out
