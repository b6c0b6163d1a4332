"""score_mods compiled into attnopt's exact attention: against FlexAttention (compiled, CPU) forward, against a
dense eager reference backward (FlexAttention has no CPU backward), and through the generated Triton kernels."""

import pytest
import torch
from _exact_helpers import DEVICE, kernel_cache  # noqa: F401  (autouse fixture)
from _score_mods import NAMES, collection, dense_reference
from torch.nn.attention.flex_attention import flex_attention

from attnopt import masks
from attnopt.codegen.score_expr import parse
from attnopt.kernels.exact import score_mod as sm
from attnopt.kernels.exact import triton_impl
from attnopt.kernels.exact.reference import CAUSAL_BOTTOM_RIGHT, CAUSAL_NONE
from attnopt.kernels.exact.render import render
from attnopt.kernels.exact.score_trace import ScoreModError, trace

TOL = dict(atol=1e-5, rtol=1e-5)
# Compiled FlexAttention's CPU lowering fails on these (InductorError, torch 2.13): eager FlexAttention instead.
FLEX_EAGER = {"graphormer_edge", "activation"}
MODS = collection()


def inputs(hq=4, hkv=4, sq=19, sk=23, d=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, h, s, d, generator=g).requires_grad_() for h, s in ((hq, sq), (hkv, sk), (hkv, sk))]


@pytest.fixture(scope="module")
def flex():
    return torch.compile(flex_attention)


@pytest.mark.parametrize("name", NAMES)
def test_forward_matches_flex_attention(name, flex):
    score_mod, _ = MODS[name]
    q, k, v = inputs()
    out, lse = sm.attention(q, k, v, score_mod)
    run = flex_attention if name in FLEX_EAGER else flex
    with torch.no_grad():
        expected = run(q.detach(), k.detach(), v.detach(), score_mod=score_mod)
    torch.testing.assert_close(out, expected, **TOL)
    torch.testing.assert_close(lse, dense_reference(q, k, v, score_mod)[1], **TOL)


@pytest.mark.parametrize("name", NAMES)
def test_backward_matches_dense_reference(name):
    """Gradients of q, k, v and of every captured tensor that requires one (bias tables), with GQA."""
    score_mod, tensors = MODS[name]
    q, k, v = inputs(hq=4, hkv=2)
    out, _ = sm.attention(q, k, v, score_mod, enable_gqa=True)
    expected, _ = dense_reference(q, k, v, score_mod)
    dout = torch.randn_like(out)
    wrt = [q, k, v, *tensors]
    for got, want in zip(torch.autograd.grad(out, wrt, dout), torch.autograd.grad(expected, wrt, dout)):
        torch.testing.assert_close(got, want, **TOL)


@pytest.mark.parametrize("mask, keep", [
    (masks.causal(), lambda b, h, i, j: j <= i + 4),  # bottom-right, Sk - Sq = 4: the kernels' causal mode
    (masks.SlidingWindow(5, 0), lambda b, h, i, j: (j <= i + 4) & (j >= i + 4 - 5)),  # traced into the expression
])
def test_mask_descriptor(mask, keep):
    score_mod, tensors = MODS["t5"]
    q, k, v = inputs(sq=19, sk=23)
    out, lse = sm.attention(q, k, v, score_mod, mask=mask)
    expected, expected_lse = dense_reference(q, k, v, score_mod, keep=keep)
    torch.testing.assert_close(out, expected, **TOL)
    torch.testing.assert_close(lse, expected_lse, **TOL)
    dout = torch.randn_like(out)
    wrt = [q, k, v, *tensors]
    for got, want in zip(torch.autograd.grad(out, wrt, dout), torch.autograd.grad(expected, wrt, dout)):
        torch.testing.assert_close(got, want, **TOL)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("causal", [CAUSAL_NONE, CAUSAL_BOTTOM_RIGHT])
def test_generated_kernels(name, causal):
    """The Triton kernels (the interpreter on CPU) with the traced expression and its derivative compiled in."""
    score_mod, _ = MODS[name]
    traced = trace(score_mod)
    q, k, v = (t.detach().to(DEVICE) for t in inputs(hq=4, hkv=2, sq=21, sk=27))
    buffers = [t.detach().to(DEVICE) for t in traced.buffers]
    out, lse = triton_impl.forward(q, k, v, None, causal, None, score_mod=traced.expr, mod_buffers=buffers)
    dout = torch.randn_like(out)
    grads = triton_impl.backward(dout, q, k, v, out, lse, None, causal, None, score_mod=traced.expr,
                                 mod_buffers=buffers)
    keep = (lambda b, h, i, j: j <= i + 6) if causal else None
    ref_q, ref_k, ref_v = (t.cpu().requires_grad_() for t in (q, k, v))
    ref_out, ref_lse = dense_reference(ref_q, ref_k, ref_v, score_mod, keep=keep)
    torch.testing.assert_close(out.cpu(), ref_out, **TOL)
    torch.testing.assert_close(lse.cpu(), ref_lse, **TOL)
    for got, want in zip(grads[:3], torch.autograd.grad(ref_out, (ref_q, ref_k, ref_v), dout.cpu())):
        torch.testing.assert_close(got.cpu(), want, **TOL)


@pytest.mark.parametrize("direction", ["fwd", "bwd_dq", "bwd_dkdv"])
def test_generated_source_shows_the_expression(direction):
    traced = trace(MODS["t5"][0])
    q, k, v = inputs(hq=4, hkv=2)
    call_spec = triton_impl.forward.__globals__["_prepare"]  # the launcher's own spec choice
    call = triton_impl.forward.__globals__["_with_score_mod"](
        call_spec(q, k, v, None, 0, None, 0.0, 0.0, None, 0, None, None, None, None, None), traced.expr,
        traced.buffers)
    spec = call.spec(direction)
    source = render(spec)
    text = traced.expr.text()
    assert spec.score_mod == text and f"# score_mod: {text}" in source
    assert "load(buf0, " in text and "tl.load(ModBuf0 + " in source
    assert ("dmod = " in source) == (direction != "fwd")
    assert parse(text) == traced.expr


def test_error_for_data_dependent_branch():
    def branchy(score, b, h, q_idx, kv_idx):
        if score > 0:
            return score
        return -score

    with pytest.raises(ScoreModError, match="torch.where"):
        sm.attention(*inputs(), branchy)


def test_error_names_unsupported_op():
    def arctan(score, b, h, q_idx, kv_idx):
        return torch.atan(score)

    with pytest.raises(ScoreModError, match="aten.atan"):
        sm.attention(*inputs(), arctan)


def test_error_for_slice_of_captured_tensor():
    table = torch.randn(4, 8)

    def row(score, b, h, q_idx, kv_idx):
        return score + table[:, kv_idx].sum()

    with pytest.raises(ScoreModError):
        sm.attention(*inputs(), row)


def test_gqa_needs_enable_gqa():
    with pytest.raises(ValueError, match="enable_gqa"):
        sm.attention(*inputs(hq=4, hkv=2), MODS["alibi"][0])


def test_opcheck():
    """The custom op's fake implementation, schema and autograd registration (torch.library.opcheck)."""
    score_mod, tensors = MODS["relative_table"]
    q, k, v = inputs(hq=4, hkv=2, sq=9, sk=11)
    traced = trace(score_mod)
    args = (q, k, v, traced.expr.text(), list(traced.buffers), 0.3, CAUSAL_BOTTOM_RIGHT)
    torch.library.opcheck(torch.ops.attnopt.score_mod_attention.default, args)


def test_compiles_without_graph_break_and_recompiles_for_other_constants():
    """torch.compile(fullgraph=True): the trace is a constant of the graph, guarded on what it depends on (the
    function's code and captured numbers), so another softcap value recompiles rather than reusing the first."""
    from attn_gym.mods import generate_tanh_softcap

    def f(q, k, v, score_mod):
        return sm.attention(q, k, v, score_mod, mask=masks.causal())[0]

    compiled = torch.compile(f, fullgraph=True)
    q, k, v = (t.detach() for t in inputs(sq=9, sk=9))
    for score_mod in (MODS["t5"][0], MODS["graphormer_edge"][0], generate_tanh_softcap(1), generate_tanh_softcap(5),
                      generate_tanh_softcap(0.5), generate_tanh_softcap(3.0)):
        torch.testing.assert_close(compiled(q, k, v, score_mod), f(q, k, v, score_mod), **TOL)
    window = torch.compile(lambda q, k, v: sm.attention(q, k, v, MODS["alibi"][0], mask=masks.SlidingWindow(3, 0)),
                           fullgraph=True)
    with pytest.raises(Exception, match="masks.causal"):
        window(q, k, v)  # refused, not run with a mask whose fields torch.compile lost
