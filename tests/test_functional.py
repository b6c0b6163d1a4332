"""attnopt.attention, the functional entry point: every variant on raw tensors against its reference, autograd,
torch.compile(fullgraph=True) with no graph break, torch.export, top-left and bottom-right causal, packed
sequences, and the errors for combinations a variant cannot run."""

import math

import pytest
import torch
import torch.nn.functional as F

import attnopt
from attnopt import masks
from attnopt.kernels.linear import reference as linear_reference
from attnopt.kernels.sigmoid import reference as sigmoid_reference


def _qkv(b=2, hq=4, hkv=2, sq=24, sk=24, d=8, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g, dtype=dtype).requires_grad_(True)  # noqa: E731
    return mk(b, hq, sq, d), mk(b, hkv, sk, d), mk(b, hkv, sk, d)


def _sdpa(q, k, v, mask=None, is_causal=False):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, enable_gqa=True)


def _grads(out, inputs, seed=1):
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
    return torch.autograd.grad(out, inputs, dout)


def _assert_same(got, want, inputs, atol=1e-5):
    torch.testing.assert_close(got, want, atol=atol, rtol=atol)
    for g, w in zip(_grads(got, inputs), _grads(want, inputs)):
        torch.testing.assert_close(g, w, atol=atol, rtol=atol)


# One call per variant, and its reference: name -> (attnopt.attention keywords, reference(q, k, v)).
WINDOW = masks.SlidingWindow(5, 2)
CASES = {
    "exact": (dict(is_causal=True), lambda q, k, v: _sdpa(q, k, v, is_causal=True)),
    "exact_descriptor": (dict(mask=WINDOW), lambda q, k, v: _sdpa(q, k, v, WINDOW.dense(24, 24))),
    "sparse": (dict(variant=attnopt.Sparse(WINDOW), is_causal=True),
               lambda q, k, v: _sdpa(q, k, v, WINDOW.dense(24, 24) & masks.causal().dense(24, 24))),
    "exact_sparse": (dict(variant="sparse", is_causal=True), lambda q, k, v: _sdpa(q, k, v, is_causal=True)),
    "linear": (dict(variant=attnopt.Linear("elu"), is_causal=True),
               lambda q, k, v: linear_reference.linear_attention(
                   linear_reference.feature_map(q, "elu"), linear_reference.feature_map(k, "elu"), v, causal=True,
                   scale=q.shape[-1] ** -0.5)[0]),
    "sigmoid": (dict(variant=attnopt.Sigmoid(), is_causal=True),
                lambda q, k, v: sigmoid_reference.sigmoid_attention(q, k, v, causal=1, scale=q.shape[-1] ** -0.5)),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(CASES))
def test_each_variant_matches_its_reference_forward_and_backward(name):
    kwargs, reference = CASES[name]
    q, k, v = _qkv()
    _assert_same(attnopt.attention(q, k, v, enable_gqa=True, **kwargs), reference(q, k, v), (q, k, v))


@pytest.mark.parametrize("name", sorted(CASES))
def test_each_variant_compiles_with_no_graph_break(name):
    """fullgraph=True raises at the first graph break; the compiled call and its gradients equal eager's."""
    kwargs, _ = CASES[name]
    q, k, v = _qkv()

    def f(q, k, v):
        return attnopt.attention(q, k, v, enable_gqa=True, **kwargs)

    torch._dynamo.reset()
    _assert_same(torch.compile(f, fullgraph=True, backend="aot_eager")(q, k, v), f(q, k, v), (q, k, v), atol=0)


@pytest.mark.parametrize("mask", [None, WINDOW])
def test_lse_and_its_gradient_compile_with_no_graph_break(mask):
    q, k, v = _qkv()

    def f(q, k, v):
        out, lse = attnopt.attention(q, k, v, mask=mask, is_causal=True, return_lse=True)
        return out.sum(-1) + lse

    torch._dynamo.reset()
    _assert_same(torch.compile(f, fullgraph=True, backend="aot_eager")(q, k, v), f(q, k, v), (q, k, v), atol=0)


def test_a_compiled_call_follows_new_sizes_and_new_masks():
    """A recompile makes sizes and a mask's int fields symbolic (automatic dynamic shapes): the mask, a constant of the
    graph, is specialized on its values, the sizes stay symbolic, and every call equals eager."""

    def f(q, mask):
        return attnopt.attention(q, q, q, mask=mask)

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    for s, mask in ((16, masks.SlidingWindow(3, 0)), (24, masks.SlidingWindow(3, 0)), (32, masks.SlidingWindow(1, 1)),
                    (32, masks.SlidingWindow(2, 5)), (30, masks.Document((10, 20), causal=True)),
                    (30, masks.Document((15, 15), causal=True)), (30, _even_keys)):  # fmt: skip
        q = torch.randn(1, 2, s, 8, generator=torch.Generator().manual_seed(s))
        torch.testing.assert_close(compiled(q, mask), f(q, mask), atol=0, rtol=0)


def test_descriptors_built_inside_the_compiled_function_are_read_field_by_field():
    """dynamo cannot hand over an object it built: the descriptor crosses as its fields, never as defaults (a
    SlidingWindow rebuilt from its class defaults would be full attention)."""
    q, k, v = _qkv()

    def f(q, k, v):
        window = masks.SlidingWindow(3, 0) & masks.from_mask_mod(_even_keys)
        return attnopt.attention(q, k, v, mask=window, variant=attnopt.Sparse(masks.Neighborhood(3, grid=(4, 6))))

    torch._dynamo.reset()
    got = torch.compile(f, fullgraph=True, backend="aot_eager")(q, k, v)
    dense = masks.SlidingWindow(3, 0).dense(24, 24) & (torch.arange(24) % 2 == 0) & \
        masks.Neighborhood(3, grid=(4, 6)).dense(24, 24)  # fmt: skip
    torch.testing.assert_close(got, _sdpa(q, k, v, dense).nan_to_num(0.0), atol=1e-5, rtol=1e-5)


def _even_keys(b, h, q_idx, kv_idx):
    return kv_idx % 2 == 0


@pytest.mark.parametrize("mask", ["descriptor", "tensor", "none"])
def test_export(mask):
    q, k, v = (t.detach() for t in _qkv())
    chosen = {"descriptor": WINDOW, "tensor": WINDOW.dense(24, 24), "none": None}[mask]

    class M(torch.nn.Module):
        def forward(self, q, k, v):
            return attnopt.attention(q, k, v, mask=chosen, enable_gqa=True)

    ep = torch.export.export(M(), (q, k, v))
    torch.testing.assert_close(ep.module()(q, k, v), M()(q, k, v))
    assert any("attnopt" in str(n.target) for n in ep.graph.nodes)


@pytest.mark.parametrize("variant", [attnopt.Linear("relu", causal=True), attnopt.Sigmoid(bias=-1.0)])
def test_export_other_variants(variant):
    q, k, v = (t.detach() for t in _qkv())

    class M(torch.nn.Module):
        def forward(self, q, k, v):
            return attnopt.attention(q, k, v, variant=variant)

    ep = torch.export.export(M(), (q, k, v))
    torch.testing.assert_close(ep.module()(q, k, v), M()(q, k, v))


@pytest.mark.parametrize("sq,sk", [(8, 24), (24, 8)])
def test_top_left_and_bottom_right_causal(sq, sk):
    q, k, v = _qkv(sq=sq, sk=sk, hkv=4)
    top_left = torch.ones(sq, sk, dtype=torch.bool).tril()
    bottom_right = torch.ones(sq, sk, dtype=torch.bool).tril(diagonal=sk - sq)
    visible = lambda m: m.any(-1)  # noqa: E731  (rows that see no key give 0 here, NaN in SDPA)
    for kwargs, dense in ((dict(is_causal=True, mask=masks.SlidingWindow(None, None)), top_left),
                          (dict(mask=masks.causal("top-left")), top_left),
                          (dict(mask=masks.causal()), bottom_right)):  # fmt: skip
        got = attnopt.attention(q, k, v, **kwargs)
        want = _sdpa(q, k, v, dense)
        rows = visible(dense)
        torch.testing.assert_close(got[:, :, rows], want[:, :, rows], atol=1e-5, rtol=1e-5)
        assert torch.all(got[:, :, ~rows] == 0)


@pytest.mark.parametrize("how", ["descriptor", "tensor", "exact_sparse"])
def test_return_lse_is_the_log_sum_exp_of_the_visible_scaled_scores_with_its_gradient(how):
    """Forward and backward of ``out`` and ``lse`` together (a merge of partial attentions differentiates both)."""
    q, k, v = _qkv()
    dense = masks.causal().dense(24, 24) if how == "exact_sparse" else WINDOW.dense(24, 24)
    kwargs = {"descriptor": dict(mask=WINDOW), "tensor": dict(mask=dense),
              "exact_sparse": dict(variant="sparse", is_causal=True)}[how]  # fmt: skip
    scores = (q @ k.repeat_interleave(2, dim=1).transpose(-2, -1)) / math.sqrt(8)
    want_lse = torch.logsumexp(scores.masked_fill(~dense, float("-inf")), dim=-1)
    out, lse = attnopt.attention(q, k, v, return_lse=True, **kwargs)
    torch.testing.assert_close(lse, want_lse, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out, _sdpa(q, k, v, dense), atol=1e-5, rtol=1e-5)
    weight = torch.randn(lse.shape, generator=torch.Generator().manual_seed(2))
    got = torch.autograd.grad((out.sum(-1) + lse * weight).sum(), (q, k, v))
    want = torch.autograd.grad((_sdpa(q, k, v, dense).sum(-1) + want_lse * weight).sum(), (q, k, v))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)


def test_sparse_variant_reads_a_tensor_mask_on_its_tiles():
    q, k, v = _qkv()
    tensor = torch.rand(24, 24, generator=torch.Generator().manual_seed(3)) > 0.3
    tensor.fill_diagonal_(True)
    got = attnopt.attention(q, k, v, mask=tensor, variant=attnopt.Sparse(WINDOW), is_causal=True)
    want = _sdpa(q, k, v, tensor & WINDOW.dense(24, 24) & masks.causal().dense(24, 24))
    _assert_same(got, want, (q, k, v))


def test_three_dimensional_inputs():
    q, k, v = (t[0] for t in _qkv(hkv=4))
    torch.testing.assert_close(attnopt.attention(q, k, v, mask=WINDOW), _sdpa(q, k, v, WINDOW.dense(24, 24)),
                               atol=1e-5, rtol=1e-5)  # fmt: skip


# --- packed sequences -------------------------------------------------------------------------------------------
def _per_document(q, k, v, lengths, kv_lengths, causal):
    """SDPA on each document alone ([S, H, D] slices), causal aligned bottom-right within the document."""
    outs, q0, k0 = [], 0, 0
    for n, m in zip(lengths, kv_lengths):
        qi, ki, vi = (t.transpose(0, 1)[None] for t in (q[q0:q0 + n], k[k0:k0 + m], v[k0:k0 + m]))
        keep = torch.ones(n, m, dtype=torch.bool).tril(diagonal=m - n) if causal else None
        outs.append(_sdpa(qi, ki, vi, keep)[0].transpose(0, 1))
        q0, k0 = q0 + n, k0 + m
    return torch.cat(outs)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("lengths,kv_lengths", [((5, 11, 8), None), ((3, 9, 4), (6, 9, 10))])
def test_varlen_attention_matches_each_document_alone(lengths, kv_lengths, causal):
    kv = kv_lengths or lengths
    g = torch.Generator().manual_seed(0)
    q = torch.randn(sum(lengths), 4, 8, generator=g, requires_grad=True)
    k = torch.randn(sum(kv), 2, 8, generator=g, requires_grad=True)
    v = torch.randn(sum(kv), 2, 8, generator=g, requires_grad=True)
    cu = lambda xs: [0] + list(torch.tensor(xs).cumsum(0).tolist())  # noqa: E731
    got = attnopt.varlen_attention(q, k, v, cu(lengths), None if kv_lengths is None else cu(kv_lengths),
                                   is_causal=causal, enable_gqa=True)  # fmt: skip
    _assert_same(got, _per_document(q, k, v, lengths, kv, causal), (q, k, v))


def test_varlen_attention_compiles_for_each_packing():
    def f(q, cu):
        return attnopt.varlen_attention(q, q, q, cu, is_causal=True)

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    for cu in ([0, 5, 12, 20], [0, 7, 20], [0, 10, 20, 30]):
        q = torch.randn(cu[-1], 2, 8, generator=torch.Generator().manual_seed(len(cu)))
        torch.testing.assert_close(compiled(q, cu), f(q, cu), atol=0, rtol=0)


def test_document_tiles_across_documents_are_never_visited():
    """A block map of a packed batch visits only tiles where a document meets itself."""
    mask = masks.Document((64, 64, 128), causal=True)
    text = mask.block_map(256, 256, 32, 32, bits=False).text(0)  # one line per query tile: F full, p partial, . skipped
    assert text.splitlines() == ["p.......", "Fp......", "..p.....", "..Fp....",
                                 "....p...", "....Fp..", "....FFp.", "....FFFp"]  # fmt: skip


# --- errors ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("call,error,match", [
    (lambda q, k, v: attnopt.attention(q, k, v, None), TypeError, "positionally.*keyword"),
    (lambda q, k, v: attnopt.attention(q, k, v, mask=WINDOW, attn_mask=WINDOW), ValueError, "once"),
    (lambda q, k, v: attnopt.attention(q, k, v, mask=WINDOW, variant="linear"), ValueError, "no score matrix"),
    (lambda q, k, v: attnopt.attention(q, k, v, mask=WINDOW, variant="sigmoid"), ValueError, "dense"),
    (lambda q, k, v: attnopt.attention(q, k, v, variant="linear", return_lse=True), ValueError, "log-sum-exp"),
    (lambda q, k, v: attnopt.attention(q, k, v, mask=WINDOW, dropout_p=0.1), ValueError, "dropout"),
    (lambda q, k, v: attnopt.attention(q, k, v, score_mod=lambda s, b, h, i, j: s, variant="sigmoid"), ValueError,
     "score_mod runs in the exact"),
    (lambda q, k, v: attnopt.attention(q, k, v, variant=attnopt.Linear(decay="lightning", num_layers=2),
                                       is_causal=True), ValueError, "layer index"),
    (lambda q, k, v: attnopt.attention(q, k[:, :1].repeat(1, 3, 1, 1), v[:, :1].repeat(1, 3, 1, 1)), ValueError,
     "multiple"),
    (lambda q, k, v: attnopt.attention(q, k, v, variant="auto"), TypeError, "variant must be"),
    (lambda q, k, v: attnopt.attention(q, k, v, mask=masks.Document((10, 10))), ValueError, "Sq=24"),
    (lambda q, k, v: attnopt.attention(q, k[:, :, :12], v[:, :, :12], variant=attnopt.Linear(), is_causal=True),
     ValueError, "as many queries as keys"),
])  # fmt: skip
def test_combinations_a_variant_cannot_run_name_the_fix(call, error, match):
    q, k, v = _qkv()
    with pytest.raises(error, match=match):
        call(q, k, v)


def _alibi_like(score, b, h, q_idx, kv_idx):
    return score + (kv_idx - q_idx) * 0.1 * (h + 1)


def _alibi_like_causal(score, b, h, q_idx, kv_idx):
    return torch.where(q_idx >= kv_idx, _alibi_like(score, b, h, q_idx, kv_idx), -float("inf"))


def test_score_mod_with_top_left_causal_matches_flex_attention_eager_and_compiled_across_sizes():
    from torch.nn.attention.flex_attention import flex_attention

    compiled = torch.compile(lambda q, k, v: attnopt.attention(q, k, v, score_mod=_alibi_like, is_causal=True),
                             fullgraph=True)  # fmt: skip
    for sq in (37, 20, 25):  # Sq == Sk, then Sq < Sk (top-left differs from bottom-right), recompiled dynamic
        q = torch.randn(1, 2, sq, 16)
        k, v = torch.randn(1, 2, 37, 16), torch.randn(1, 2, 37, 16)
        want = flex_attention(q, k, v, score_mod=_alibi_like_causal)
        got = attnopt.attention(q, k, v, score_mod=_alibi_like, is_causal=True)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(compiled(q, k, v), want, atol=1e-5, rtol=1e-5)
