"""attnopt.Linear and attnopt.Sigmoid as policies: validation, string and dict forms, rewriting sites, the
report, and on zoo models: training through the rewrite."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import attnopt
from attnopt import zoo
from attnopt.kernels.linear import reference as linear_ref
from attnopt.kernels.sigmoid import reference as sigmoid_ref
from attnopt.policy import Policy, parse_variant

from conftest import rel_err


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(feature_map="softmax"), "Linear.feature_map"),
        (dict(causal="yes"), "Linear.causal"),
        (dict(normalize="l2"), "Linear.normalize"),
        (dict(feature_map="identity"), "Linear.normalize: the identity feature map"),
        (dict(decay=1.5), "Linear.decay must be a decay"),
        (dict(decay=[0.9, 0.0]), r"Linear.decay\[1\]"),
        (dict(decay="alibi"), "Linear.decay must be None"),
        (dict(decay="lightning"), "Linear.num_layers"),
        (dict(num_layers=4), "only used with decay='lightning'"),
        (dict(causal=False, decay=0.9), "needs causal"),
    ],
)
def test_linear_validates_its_fields(kwargs, match):
    with pytest.raises(ValueError, match=match):
        attnopt.Linear(**kwargs)


def test_sigmoid_validates_its_bias():
    with pytest.raises(ValueError, match="Sigmoid.bias"):
        attnopt.Sigmoid(bias=float("nan"))
    assert attnopt.Sigmoid(bias=-2).bias == -2.0


def test_string_and_dict_forms():
    assert parse_variant("linear") == attnopt.Linear()
    assert parse_variant("linear:relu,causal=true,decay=0.9") == attnopt.Linear("relu", True, 0.9)
    assert parse_variant("linear:decay=lightning,num_layers=12,normalize=rms") == attnopt.Linear(
        decay="lightning", num_layers=12, normalize="rms")
    assert parse_variant("sigmoid") == attnopt.Sigmoid() and parse_variant("sigmoid:-2.5") == attnopt.Sigmoid(-2.5)
    with pytest.raises(ValueError, match="unknown option 'window'"):
        parse_variant("linear:window=3")
    policy = Policy(default=attnopt.Linear(decay=[0.9, 0.8, 0.7, 0.6], causal=True), overrides={"h.0.*": "sigmoid"})
    assert Policy.from_dict(policy.to_dict()) == policy
    assert attnopt.Linear(normalize="sum") == attnopt.Linear(normalize=True)


@pytest.mark.parametrize("variant", [attnopt.Linear(), attnopt.Linear("relu", True, 0.9),
                                     attnopt.Linear(decay=(0.9, 0.8, 1), causal=True),
                                     attnopt.Linear(decay="lightning", num_layers=12, normalize="rms"),
                                     attnopt.Linear("identity", normalize=False)])  # fmt: skip
def test_linear_string_form_round_trips(variant):
    assert parse_variant(variant.to_string()) == variant


def test_linear_string_form_of_a_per_head_decay():
    assert attnopt.Linear("relu", True, (0.9, 0.8)).to_string() == "linear:relu,causal=true,decay=0.9/0.8"
    with pytest.raises(ValueError, match=r"Linear.decay\[1\] must be a decay"):
        parse_variant("linear:decay=0.9/fast")


class Causal(nn.Module):
    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


class Masked(nn.Module):
    """Manual attention with an additive mask passed in (a causal or a padding mask, the graph cannot tell)."""

    def forward(self, q, k, v, m):
        s = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1)) + m
        return torch.softmax(s, dim=-1) @ v


def _qkv(sq=20, sk=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, 4, sq, 16, generator=g), torch.randn(2, 4, sk, 16, generator=g),
            torch.randn(2, 4, sk, 16, generator=g))  # fmt: skip


@pytest.mark.parametrize("variant", [attnopt.Linear(), attnopt.Linear("relu", decay=0.9, normalize=False),
                                     attnopt.Linear(decay=(0.5, 0.9, 0.99, 1.0), normalize="rms")])
def test_linear_rewrites_a_causal_site_into_the_linear_function(variant):
    q, k, v = _qkv()
    opt = attnopt.optimize(Causal(), variant, (q, k, v))
    (site,) = attnopt.report(opt).sites
    assert site.decision == "linear" and site.deviation is not None and "approximate" in site.reason
    decay = variant.decay if isinstance(variant.decay, tuple) else (variant.decay or 1.0,) * 4
    ld = torch.log(torch.tensor(decay)) if variant.decay is not None else None
    want, _, _ = linear_ref.linear_attention(linear_ref.feature_map(q, variant.feature_map),
                                             linear_ref.feature_map(k, variant.feature_map), v, ld, True,
                                             variant.normalize is True, 0.25)  # fmt: skip
    if variant.normalize == "rms":
        want = F.rms_norm(want, (16,), eps=1e-6)
    assert rel_err(opt(q, k, v), want) < 1e-5
    assert site.deviation == pytest.approx(rel_err(want, F.scaled_dot_product_attention(q, k, v, is_causal=True)),
                                           rel=1e-4)  # fmt: skip


def test_a_causal_and_padding_mask_becomes_causal_linear_without_the_padded_keys():
    q, k, v = _qkv()
    pad = torch.zeros(2, 1, 1, 20)
    pad[1, ..., 15:] = float("-inf")  # the second sequence is 15 tokens long
    causal = torch.full((20, 20), float("-inf")).triu(1)
    opt = attnopt.optimize(Masked(), attnopt.Linear(causal=True), (q, k, v, causal + pad))
    (site,) = attnopt.report(opt).sites
    assert site.decision == "linear", site.reason
    got = opt(q, k, v, causal + pad)
    fq, fk = linear_ref.feature_map(q, "elu"), linear_ref.feature_map(k, "elu")
    want0, _, _ = linear_ref.linear_attention(fq[:1], fk[:1], v[:1], None, True, True, 0.25)
    want1, _, _ = linear_ref.linear_attention(fq[1:, :, :15], fk[1:, :, :15], v[1:, :, :15], None, True, True, 0.25)
    assert rel_err(got[:1], want0) < 1e-5 and rel_err(got[1:, :, :15], want1) < 1e-5


def test_a_padding_mask_becomes_non_causal_linear_over_the_kept_keys():
    q, k, v = _qkv(sq=7, sk=20)
    pad = torch.zeros(2, 1, 1, 20)
    pad[0, ..., 11:] = torch.finfo(torch.float32).min
    opt = attnopt.optimize(Masked(), attnopt.Linear(causal=False), (q, k, v, pad))
    got = opt(q, k, v, pad)
    fq, fk = linear_ref.feature_map(q, "elu"), linear_ref.feature_map(k, "elu")
    want, _, _ = linear_ref.linear_attention(fq[:1], fk[:1, :, :11], v[:1, :, :11], None, False, True, 0.25)
    assert rel_err(got[:1], want) < 1e-5


@pytest.mark.parametrize(
    "module, variant, reason",
    [
        (Masked(), attnopt.Linear(), "Linear(causal=True) for a causal mask"),
        (Causal(), attnopt.Linear(causal=False), "would let queries see later keys"),
        (Causal(), attnopt.Linear(decay="lightning", num_layers=2), "needs the site's layer index"),
    ],
)
def test_sites_linear_attention_cannot_take_are_kept_with_the_reason(module, variant, reason):
    q, k, v = _qkv()
    band = (torch.arange(20)[:, None] - torch.arange(20)).abs() > 2  # neither causal nor padding: no inference
    args = (q, k, v, torch.zeros(20, 20).masked_fill(band, -1e9)) if isinstance(module, Masked) else (q, k, v)
    opt = attnopt.optimize(module, variant, args)
    (site,) = attnopt.report(opt).sites
    assert site.decision == "keep" and reason in site.reason
    torch.testing.assert_close(opt(*args), module(*args))


def test_max_error_rolls_linear_back():
    q, k, v = _qkv()
    opt = attnopt.optimize(Causal(), Policy(default=attnopt.Linear(), max_error=1e-3), (q, k, v))
    (site,) = attnopt.report(opt).sites
    assert site.decision == "keep" and "max_error" in site.reason


@pytest.mark.parametrize("kind", ["bool", "additive"])
def test_sigmoid_rewrites_a_masked_site(kind):
    q, k, v = _qkv(sq=9, sk=20)
    keep = torch.rand(2, 1, 9, 20, generator=torch.Generator().manual_seed(2)) > 0.3
    m = keep if kind == "bool" else torch.zeros(keep.shape).masked_fill(~keep, float("-inf"))

    class Sdpa(nn.Module):
        def forward(self, q, k, v, m):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=m)

    opt = attnopt.optimize(Sdpa(), attnopt.Sigmoid(), (q, k, v, m))
    (site,) = attnopt.report(opt).sites
    assert site.decision == "sigmoid" and "approximate" in site.reason
    assert rel_err(opt(q, k, v, m), sigmoid_ref.sigmoid_attention(q, k, v, m, 0, 0.25)) < 1e-5
    q.requires_grad_()
    opt(q, k, v, m).sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()


def test_variants_are_selectable_per_site():
    z = zoo.build("gpt2")
    policy = Policy(default="exact", overrides={"h.0.*": attnopt.Sigmoid(), "h.1.*": attnopt.Linear(causal=True)})
    rep = attnopt.report(attnopt.optimize(z.model, policy, z.args, z.kwargs))
    assert [(s.name, s.decision) for s in rep.sites] == [("h.0.attn", "sigmoid"), ("h.1.attn", "linear")], str(rep)
    assert all(s.deviation is not None and s.deviation > 1e-3 and "approximate" in s.reason for s in rep.sites)


def _lm(opt, model):
    """Logits of a zoo base model through its tied input embedding: [B, T, V]."""
    emb = model.get_input_embeddings().weight

    def logits(ids, pos):
        return opt(input_ids=ids, position_ids=pos, use_cache=False).last_hidden_state @ emb.T

    return logits


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_zoo_model_trains_through_linear_attention(name):
    """(Generation through the recurrent states: tests/test_linear_generate.py.)"""
    z = zoo.build(name)
    prompt = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(0))
    example = dict(input_ids=prompt, position_ids=torch.arange(9).expand(2, -1).contiguous(), use_cache=False)
    opt = attnopt.optimize(z.model, attnopt.Linear(causal=True, decay="lightning", num_layers=2), kwargs=example)
    rep = attnopt.report(opt)
    assert [s.decision for s in rep.sites] == ["linear", "linear"], str(rep)
    assert all(s.deviation is not None and "approximate" in s.reason for s in rep.sites)
    logits = _lm(opt, z.model)

    # a short fine-tune on synthetic data (each token is the previous one plus one) lowers the loss
    opt.train()
    optimizer = torch.optim.Adam(z.model.parameters(), lr=3e-3)
    start = torch.randint(0, 256, (8, 1), generator=torch.Generator().manual_seed(1))
    ids = (start + torch.arange(17)) % 256
    pos = torch.arange(16).expand(8, -1).contiguous()
    losses = []
    for _ in range(20):
        loss = F.cross_entropy(logits(ids[:, :-1], pos).flatten(0, 1), ids[:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses
