"""Written forms of attention from vision and diffusion code, each at ranks 4, 5 and 6 where it applies.

* values on the left: ``v @ attn.transpose(-2, -1)`` (channels-first [.., D, S] values and output), its einsum
  and permuted spellings, and the 3-D ``bmm`` of SAGAN-style self-attention;
* attention over more than 4 dims: SDPA on rank-5/6 q, k, v (leading dims fold into the batch, broadcasting
  where SDPA does) and the same written by hand;
* scores changed by in-place slice updates (``attn[..., i:, i:] += rel``, ``attn[..., :n] = -inf``);
* per-head loops (each iteration its own small attention with its own bias, outputs concatenated).

Each has a positive test (rewritten, equal within 1e-6 in fp32) and a negative one (an intermediate escapes, or
the change is no bias or mask: kept as written, with the reason). Softmaxes that are not plain attention (talking
heads, gated, factorized, separable, outlook) are misses whose reason names what they are.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from _detect_helpers import capture
from conftest import rel_err

pytestmark = pytest.mark.usefixtures("one_thread")

H, S, D = 2, 5, 4
LEADS = {4: (2,), 5: (2, 3), 6: (2, 2, 3)}  # the dims before the heads, per rank


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


class Fn(nn.Module):
    def __init__(self, fn, **buffers):
        super().__init__()
        self.fn = fn
        for name, value in buffers.items():
            self.register_buffer(name, value)

    def forward(self, *args):
        return self.fn(self, *args)


def run(fn, *args, **buffers):
    """(sites, misses, number of attnopt ops, output, reference) of ``fn`` through dynamo and the pipeline."""
    module = Fn(fn, **buffers)
    ctxs, got = capture(module, *args)
    with torch.no_grad():
        want = module(*args)
    n = sum(n.target is torch.ops.attnopt.attention.default for c in ctxs for n in c.final.graph.nodes)
    return [s for c in ctxs for s in c.sites], [m for c in ctxs for m in c.misses], n, got, want, ctxs


def assert_exact(fn, *args, sites=1, **buffers):
    found, misses, n, got, want, ctxs = run(fn, *args, **buffers)
    assert not misses, [m.reason for m in misses]
    assert len(found) == sites and all(s.decision == "exact" for s in found), [s.reason for s in found]
    assert n == sites
    for g, w in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,)):
        assert g.shape == w.shape and rel_err(g, w) < 1e-6
    return ctxs


def assert_kept(fn, *args, reason="used by", **buffers):
    found, misses, n, got, want, _ = run(fn, *args, **buffers)
    assert found and all(s.decision == "keep" and reason in s.reason for s in found), [s.reason for s in found]
    assert n == 0 and not misses
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


# --------------------------------------------------------------------------------------- values on the left
def v_left_matmul(m, q, k, v, escape=False):  # v [.., D, Sk]; output [.., D, Sq] as the model lays it out
    p = (q @ k.transpose(-2, -1) * D**-0.5).softmax(-1)
    out = v @ p.transpose(-2, -1)
    return (out.flatten(-2), p) if escape else out.flatten(-2)  # .flatten needs the layout matmul gives


def v_left_permute(m, q, k, v, escape=False):
    p = torch.softmax(torch.matmul(q, k.transpose(-1, -2)) / D**0.5, dim=-1)
    dims = tuple(range(p.dim() - 2)) + (p.dim() - 1, p.dim() - 2)
    out = torch.matmul(v, p.permute(*dims)).view(*v.shape[:-2], -1)
    return (out, p) if escape else out


def v_left_einsum(m, q, k, v, escape=False):
    p = torch.einsum("...qd,...kd->...qk", q, k).mul(D**-0.5).softmax(-1)
    out = torch.einsum("...dk,...qk->...dq", v, p)
    return (out, p) if escape else out


V_LEFT = {"matmul": v_left_matmul, "permute": v_left_permute, "einsum": v_left_einsum}


def _channels_first(rank, sq=S, sk=7):
    lead = LEADS[rank] + (H,)
    return rand(*lead, sq, D, seed=1), rand(*lead, sk, D, seed=2), rand(*lead, D, sk, seed=3)


@pytest.mark.parametrize("rank", [4, 5, 6])
@pytest.mark.parametrize("spelling", list(V_LEFT))
def test_values_on_the_left_are_rewritten(spelling, rank):
    assert_exact(V_LEFT[spelling], *_channels_first(rank))


@pytest.mark.parametrize("rank", [4, 5, 6])
@pytest.mark.parametrize("spelling", list(V_LEFT))
def test_values_on_the_left_with_escaping_probabilities_are_kept(spelling, rank):
    fn = V_LEFT[spelling]
    assert_kept(lambda m, *a: fn(m, *a, escape=True), *_channels_first(rank), reason="probabilities")


def sagan(m, x, escape=False):
    """SAGAN-style self-attention on a feature map: queries [B, N, C'], keys [B, C', N], values [B, C, N]."""
    b, c, hh, ww = x.shape
    f = x.view(b, c, -1)
    energy = torch.bmm(f.permute(0, 2, 1) * m.wq, f * m.wk)
    attn = F.softmax(energy, dim=-1)
    out = torch.bmm(f, attn.permute(0, 2, 1)).view(b, c, hh, ww)
    return (out, attn) if escape else out


@pytest.mark.parametrize("escape", [False, True])
def test_sagan_self_attention(escape):
    x, buffers = rand(2, 4, 3, 3), {"wq": rand(4, seed=5), "wk": rand(4, 1, seed=6)}
    if escape:
        assert_kept(lambda m, x: sagan(m, x, True), x, reason="probabilities", **buffers)
    else:
        assert_exact(sagan, x, **buffers)


def conv_attn_block(m, x, spelling, escape=False):
    """The attention block of convolutional autoencoders (VQGAN, latent diffusion): 1x1-conv q, k, v on a
    feature map, the probabilities permuted and multiplied from the right of the values."""
    b, c, hh, ww = x.shape
    q = (x * m.wq).reshape(b, c, hh * ww).permute(0, 2, 1)
    k, v = (x * m.wk).reshape(b, c, hh * ww), x.reshape(b, c, hh * ww)
    w_ = torch.bmm(q, k) if spelling == "bmm" else torch.einsum("bij,bjk->bik", q, k)
    w_ = F.softmax(w_ * int(c) ** (-0.5), dim=2)
    w_t = w_.permute(0, 2, 1)
    h_ = (torch.bmm(v, w_t) if spelling == "bmm" else torch.einsum("bij,bjk->bik", v, w_t)).reshape(b, c, hh, ww)
    return (x + h_, w_) if escape else x + h_


@pytest.mark.parametrize("spelling", ["bmm", "einsum"])
@pytest.mark.parametrize("escape", [False, True])
def test_convolutional_attention_block(spelling, escape):
    x, buffers = rand(2, 4, 3, 3), {"wq": rand(4, 1, 1, seed=5), "wk": rand(4, 1, 1, seed=6)}
    if escape:
        assert_kept(lambda m, x: conv_attn_block(m, x, spelling, True), x, reason="probabilities", **buffers)
    else:
        assert_exact(lambda m, x: conv_attn_block(m, x, spelling), x, **buffers)


# ------------------------------------------------------------------------------------ more than four dims
def sdpa(m, q, k, v, mask=None):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


@pytest.mark.parametrize("rank", [4, 5, 6])
@pytest.mark.parametrize("case", ["plain", "broadcast_kv", "float_mask", "bool_mask", "gqa"])
def test_sdpa_of_rank_above_four_folds_the_batch(case, rank):
    lead = LEADS[rank]
    q = rand(*lead, H * (2 if case == "gqa" else 1), S, D, seed=1)
    kv_lead = (1,) + lead[1:] if case == "broadcast_kv" else lead
    k, v = rand(*kv_lead, H, 7, D, seed=2), rand(*kv_lead, H, 7, D + 2, seed=3)
    if case == "gqa":
        assert_exact(lambda m, q, k, v: F.scaled_dot_product_attention(q, k, v, enable_gqa=True), q, k, v)
        return
    extra = ()
    if case == "float_mask":
        extra = (rand(lead[-1], H, S, 7, seed=4),)  # broadcast over the leading dim
    elif case == "bool_mask":
        keep = rand(S, 7, seed=4) > 0
        keep[:, 0] = True
        extra = (keep,)
    assert_exact(sdpa, q, k, v, *extra)


def manual(m, q, k, v, escape=False):
    p = (q @ k.transpose(-2, -1) * D**-0.5).softmax(dim=-1)
    return (p @ v, p) if escape else p @ v


@pytest.mark.parametrize("rank", [4, 5, 6])
@pytest.mark.parametrize("escape", [False, True])
@pytest.mark.parametrize("kv_broadcast", [False, True])  # keys and values shared along the first dim
def test_attention_written_at_rank_above_four(rank, escape, kv_broadcast):
    lead = LEADS[rank] + (H,)
    kv_lead = (1,) + lead[1:] if kv_broadcast else lead
    args = rand(*lead, S, D, seed=1), rand(*kv_lead, 7, D, seed=2), rand(*kv_lead, 7, D, seed=3)
    if escape:
        assert_kept(lambda m, *a: manual(m, *a, escape=True), *args, reason="probabilities")
    else:
        assert_exact(manual, *args)


# ------------------------------------------------------------------------------------ in-place slice updates
def _scores(q, k):
    return q @ k.transpose(-2, -1) * D**-0.5


def update_add_region(m, q, k, v, rel):  # relative positions added over part of the scores (e.g. a class token)
    attn = q @ k.transpose(-2, -1)
    attn[..., 1:, 1:] += rel
    attn = attn * m.temp  # then a per-head temperature
    return attn.softmax(-1) @ v, attn


def update_fill_region(m, q, k, v, rel):
    attn = _scores(q, k)
    attn[..., :2] = float("-inf")  # the first keys are hidden
    attn[..., 0] = torch.finfo(attn.dtype).min  # ... and the first key of every row kept at a finite fill
    return attn.softmax(-1) @ v, attn


def update_rewritten_sum(m, q, k, v, rel):
    attn = _scores(q, k)
    attn[..., 1:, 1:] = attn[..., 1:, 1:] - rel
    attn[..., 3:].masked_fill_(m.keep[..., 3:] == 0, float("-inf"))
    attn[..., 1, :].add_(1.5)  # a constant over one query row
    return attn.softmax(-1) @ v, attn


def update_whole(m, q, k, v, rel):
    attn = q @ k.transpose(-2, -1)
    attn *= D**-0.5
    attn.masked_fill_(m.keep == 0, float("-inf"))
    return attn.softmax(-1) @ v, attn


def update_regrouped(m, q, k, v, rel):
    """Decomposed relative positions (MViTv2): the grid part of the scores regrouped [qh, qw, kh, kw] for the sum."""
    attn = _scores(q, k)
    lead = attn.shape[:-2]
    grid = attn[..., 1:, 1:].view(*lead, 2, 2, 2, 2) + m.rel_h[:, :, :, None] + m.rel_w[:, :, None, :]
    attn[..., 1:, 1:] = grid.view(*lead, 4, 4)
    return attn.softmax(-1) @ v, attn


UPDATES = {"add_region": update_add_region, "fill_region": update_fill_region,
           "rewritten_sum": update_rewritten_sum, "whole": update_whole, "regrouped": update_regrouped}  # fmt: skip


def _updated(rank):
    lead = LEADS[rank] + (H,)
    q, k, v = rand(*lead, S, D, seed=1), rand(*lead, S, D, seed=2), rand(*lead, S, D, seed=3)
    keep = torch.ones(S, S).tril()
    rel_hw = {"rel_h": rand(2, 2, 2, seed=5), "rel_w": rand(2, 2, 2, seed=6)}  # [qh, qw, kh] and [qh, qw, kw]
    temp = rand(H, 1, 1, seed=7).abs() + 0.1
    return (q, k, v, rand(H, S - 1, S - 1, seed=4)), {"keep": keep, "temp": temp, **rel_hw}


@pytest.mark.parametrize("rank", [4, 5, 6])
@pytest.mark.parametrize("form", list(UPDATES))
def test_scores_updated_in_place_are_rewritten(form, rank):
    args, buffers = _updated(rank)
    ctxs = assert_exact(lambda m, *a: UPDATES[form](m, *a)[0], *args, **buffers)
    # the writes into the dead scores go with them: no scores product is left
    (final,) = [c.final.graph for c in ctxs]
    assert not [n for n in final.nodes if "setitem" in str(n.target) or "matmul" in str(n.target)], final


@pytest.mark.parametrize("rank", [4, 5, 6])
@pytest.mark.parametrize("form", list(UPDATES))
def test_scores_updated_in_place_and_escaping_are_kept(form, rank):
    args, buffers = _updated(rank)
    assert_kept(UPDATES[form], *args, reason="used by", **buffers)


def update_scaled_region(m, q, k, v, rel):
    attn = _scores(q, k)
    attn[..., 1:, 1:] += rel
    attn[..., 0, :] = attn[..., 0, :] * 2.0  # a region scaled: neither a bias nor a mask
    return attn.softmax(-1) @ v


def update_assigned_tensor(m, q, k, v, rel):
    attn = _scores(q, k)
    attn[..., 1:, 1:] = rel  # a region overwritten by a tensor
    return attn.softmax(-1) @ v


def update_from_itself(m, q, k, v, rel):
    attn = _scores(q, k)
    attn[..., 0] += attn[..., 1]  # one key's scores added to another's: not a bias
    return attn.softmax(-1) @ v


def update_after_read(m, q, k, v, rel):
    attn = _scores(q, k)
    p = attn.softmax(-1)
    attn[..., 1:, 1:] += rel  # after the softmax read the scores: it changes what a later read sees
    return p @ v, attn


@pytest.mark.parametrize("fn, reason", [(update_scaled_region, "neither adding a bias nor a mask fill"),
                                        (update_assigned_tensor, "neither adding a bias nor a mask fill"),
                                        (update_from_itself, "computed from the scores themselves"),
                                        (update_after_read, "in place by iadd")])  # fmt: skip
def test_an_update_that_is_no_bias_or_mask_keeps_the_site_with_its_reason(fn, reason):
    args, _ = _updated(4)
    found, misses, n, got, want, _ = run(fn, *args)
    (site,) = found
    assert site.decision == "keep" and reason in site.reason, site.reason
    assert n == 0 and not misses
    for g, w in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,)):
        torch.testing.assert_close(g, w, rtol=0, atol=0)  # every write still happens


def decomposed_rel_pos(m, q, k, v, escape=False):
    """SAM / ViTDet: relative positions along each axis of a 2x2 grid, added with the scores regrouped
    [.., qh, qw, kh, kw] and regrouped back; a padding mask over the regrouped keys too."""
    attn = _scores(q, k)
    lead = attn.shape[:-2]
    r_q = q.reshape(*lead, 2, 2, D)
    rel_h = torch.einsum("...hwc,hkc->...hwk", r_q, m.rh)
    rel_w = torch.einsum("...hwc,wkc->...hwk", r_q, m.rw)
    grid = attn.view(*lead, 2, 2, 2, 2) + rel_h[..., :, :, :, None] + rel_w[..., :, :, None, :]
    grid = grid.masked_fill(m.pad == 0, float("-inf"))  # [kh, kw]: the last key hidden
    attn = grid.view(*lead, 4, 4)
    p = attn.softmax(dim=-1)
    return (p @ v, p) if escape else p @ v


@pytest.mark.parametrize("rank", [3, 4, 5])
@pytest.mark.parametrize("escape", [False, True])
def test_scores_regrouped_for_decomposed_relative_positions(rank, escape):
    lead = {3: (2,), 4: (2, H), 5: (2, 3, H)}[rank]
    args = rand(*lead, 4, D, seed=1), rand(*lead, 4, D, seed=2), rand(*lead, 4, D, seed=3)
    buffers = {"rh": rand(2, 2, D, seed=4), "rw": rand(2, 2, D, seed=5), "pad": torch.tensor([[1, 1], [1, 0]])}
    if escape:
        assert_kept(lambda m, *a: decomposed_rel_pos(m, *a, escape=True), *args, reason="probabilities", **buffers)
    else:
        assert_exact(decomposed_rel_pos, *args, **buffers)


# ------------------------------------------------------------------------------------------ per-head loops
def head_loop(m, q, k, v, escape_head=None):
    """One small attention per head, each with its own bias; the outputs concatenated along the channels."""
    outs, kept = [], None
    for h in range(q.shape[-3]):
        attn = (q[..., h, :, :] @ k[..., h, :, :].transpose(-2, -1)) * D**-0.5 + m.bias[h]
        p = attn.softmax(dim=-1)
        kept = p if h == escape_head else kept
        outs.append(p @ v[..., h, :, :])
    out = torch.cat(outs, dim=-1)
    return out if escape_head is None else (out, kept)


def head_loop_split(m, q, k, v):
    """Heads taken by ``split`` along the channels of [.., S, H*D] tensors (e.g. a loop over head groups)."""
    outs = []
    for h, (qh, kh, vh) in enumerate(zip(q.split(D, -1), k.split(D, -1), v.split(D, -1))):
        outs.append(F.softmax(qh @ kh.transpose(-1, -2) / D**0.5 + m.bias[h], dim=-1) @ vh)
    return torch.cat(outs, -1)


@pytest.mark.parametrize("rank", [4, 5, 6])
def test_per_head_loops_give_a_site_per_head(rank):
    lead = LEADS[rank] + (H,)
    args = rand(*lead, S, D, seed=1), rand(*lead, 7, D, seed=2), rand(*lead, 7, D, seed=3)
    assert_exact(head_loop, *args, sites=H, bias=rand(H, S, 7, seed=4))
    flat = tuple(a.transpose(-3, -2).flatten(-2) for a in args)  # [.., S, H*D]
    assert_exact(head_loop_split, *flat, sites=H, bias=rand(H, S, 7, seed=4))


@pytest.mark.parametrize("rank", [4, 5, 6])
def test_a_head_whose_probabilities_escape_is_kept_alone(rank):
    lead = LEADS[rank] + (H,)
    args = rand(*lead, S, D, seed=1), rand(*lead, 7, D, seed=2), rand(*lead, 7, D, seed=3)
    found, misses, n, got, want, _ = run(lambda m, *a: head_loop(m, *a, escape_head=1), *args,
                                         bias=rand(H, S, 7, seed=4))  # fmt: skip
    assert [s.decision for s in found] == ["exact", "keep"] and "probabilities" in found[1].reason
    assert n == 1 and not misses
    assert rel_err(got[0], want[0]) < 1e-6 and torch.equal(got[1], want[1])


# --------------------------------------------------------------------------- softmaxes that are not attention
class Special(nn.Module):
    """Softmaxes from vision models that are not plain attention (weights of nn.Linear, so nothing is random)."""

    def __init__(self, kind):
        super().__init__()
        self.kind = kind
        self.mix_pre, self.mix_post = nn.Linear(H, H), nn.Linear(H, H)
        self.gate, self.pos = nn.Parameter(torch.zeros(1, H, 1, 1)), nn.Parameter(rand(1, H, S, S))
        self.ctx, self.outlook = nn.Linear(D, 1), nn.Linear(D, 9 * 9)

    def forward(self, q, k, v):
        if self.kind == "talking_heads":  # heads mixed before and after the softmax (CaiT)
            a = self.mix_pre(_scores(q, k).permute(0, 2, 3, 1)).permute(0, 3, 1, 2).softmax(-1)
            return self.mix_post(a.permute(0, 2, 3, 1)).permute(0, 3, 1, 2) @ v
        if self.kind == "talking_heads_after":
            a = torch.einsum("bhqk,hg->bgqk", _scores(q, k).softmax(-1), self.mix_post.weight)
            return a @ v
        if self.kind == "gated":  # gated positional self-attention (ConViT): two softmaxes gated together
            g = torch.sigmoid(self.gate)
            a = (1.0 - g) * _scores(q, k).softmax(-1) + g * self.pos.softmax(-1)
            return (a / a.sum(-1, keepdim=True)) @ v
        if self.kind == "factorized":  # a softmax over the keys alone (CoaT, efficient attention)
            return q @ (k.softmax(dim=-2).transpose(-2, -1) @ v)
        if self.kind == "separable":  # a context vector (MobileViTv2)
            scores = self.ctx(q).softmax(dim=-2)  # [B, H, S, 1]
            return v * (k * scores).sum(dim=-2, keepdim=True)
        if self.kind == "context_pooling":  # global context pooling (GCNet): values @ softmax over the tokens
            return v.transpose(-2, -1) @ self.ctx(q).squeeze(-1).softmax(dim=-1).unsqueeze(-1)
        # outlook (VOLO): weights projected from the input, no query-key scores
        a = self.outlook(q).reshape(*q.shape[:2], S, 9, 9).softmax(-1)  # S tokens, 9x9 local weights
        return a @ torch.cat([v, v], -2)[..., :9, :].unsqueeze(2)


@pytest.mark.parametrize("kind, what", [("talking_heads", "talking-heads attention"),
                                        ("talking_heads_after", "talking-heads attention"),
                                        ("gated", "two softmaxes gated together"),
                                        ("factorized", "factorized attention"),
                                        ("separable", "separable attention"),
                                        ("context_pooling", "separable attention"),
                                        ("outlook", "outlook attention")])  # fmt: skip
def test_softmaxes_that_are_not_attention_are_named_misses(kind, what):
    module = Special(kind).eval()
    args = rand(2, H, S, D, seed=1), rand(2, H, S, D, seed=2), rand(2, H, S, D, seed=3)
    ctxs, got = capture(module, *args)
    misses = [m for c in ctxs for m in c.misses]
    assert not [s for c in ctxs for s in c.sites]
    assert misses and all(m.reason.startswith(what) for m in misses), [m.reason for m in misses]
    with torch.no_grad():
        assert torch.equal(got, module(*args))


# ---------------------------------------------------------------------------------------- dynamic shapes
def test_the_forms_under_dynamic_shapes_are_rewritten_or_missed_with_a_reason():
    from _detect_helpers import pipeline_backend

    def compiled(fn, *args):
        ctxs = []
        torch._dynamo.reset()
        with torch.no_grad():
            got = torch.compile(fn, backend=pipeline_backend(ctxs), dynamic=True, fullgraph=True)(*args)
            assert rel_err(got, fn(*args)) < 1e-6
        return [s for c in ctxs for s in c.sites], [m.reason for c in ctxs for m in c.misses]

    (site,), _ = compiled(lambda q, k, v: v_left_matmul(None, q, k, v), *_channels_first(4))
    assert site.decision == "exact"
    qkv5 = (rand(2, 3, H, S, D, seed=i) for i in range(3))
    found, (miss,) = compiled(lambda q, k, v: sdpa(None, q, k, v), *qkv5)
    assert not found and "dynamic batch dims" in miss
    args, buffers = _updated(4)
    holder = nn.Module()
    holder.temp = buffers["temp"]
    (site,), _ = compiled(lambda *a: update_add_region(holder, *a)[0], *args)
    assert site.decision == "keep" and "dynamic sizes" in site.reason


def test_gradients_through_the_forms_match_the_original():
    """Values on the left and in-place region updates (bias and mask), trained through the rewrite."""
    import copy

    import attnopt

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv, self.rel = nn.Linear(8, 3 * H * D), nn.Parameter(rand(H, S, S))

        def forward(self, x):
            b, n, _ = x.shape
            q, k, v = self.qkv(x).reshape(b, n, 3, H, D).permute(2, 0, 3, 1, 4)
            attn = q @ k.transpose(-2, -1) * D**-0.5
            attn[..., 1:, 1:] += self.rel
            attn[..., 0, 2:] = float("-inf")
            return (v.transpose(-2, -1) @ attn.softmax(-1).transpose(-2, -1)).flatten(1)

    torch.manual_seed(0)
    model, x = Block(), rand(2, S + 1, 8)
    ref = copy.deepcopy(model)
    opt = attnopt.optimize(model, "exact", (x,))
    (site,) = attnopt.report(opt).sites
    assert site.decision == "exact", site.reason
    got, want = opt(x), ref(x)
    (got ** 2).sum().backward()
    (want ** 2).sum().backward()
    assert rel_err(got, want) < 1e-6
    for a, b in zip(model.parameters(), ref.parameters()):
        assert rel_err(a.grad, b.grad) < 1e-5
