"""CUDA: the op's generated-kernel path against the reference, and a whole model. Skipped without a GPU.

Run with ``ATTNOPT_TEST_GPU=1`` for the compiled kernels (else tests/conftest.py selects Triton's interpreter).
"""

import pytest
import torch

import attnopt
from attnopt import zoo
from attnopt.kernels.exact import reference as R

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("causal", [R.CAUSAL_NONE, R.CAUSAL_TOP_LEFT, R.CAUSAL_BOTTOM_RIGHT])
@pytest.mark.parametrize("hq,hkv,sq,sk,d", [(8, 8, 129, 129, 64), (8, 2, 77, 300, 96), (4, 1, 1000, 1000, 128)])
def test_cuda_forward_matches_reference(dtype, causal, hq, hkv, sq, sk, d):
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(2, hq, sq, d, device="cuda", dtype=dtype, generator=g)
    k = torch.randn(2, hkv, sk, d, device="cuda", dtype=dtype, generator=g)
    v = torch.randn(2, hkv, sk, d, device="cuda", dtype=dtype, generator=g)
    out, lse = torch.ops.attnopt.attention(q, k, v, None, 0.0, causal, 0.125, None)
    ref_out, ref_lse = R.attention_forward(q.double(), k.double(), v.double(), None, 0.0, causal, 0.125)
    # within 2x of PyTorch's own low-precision math attention error against the fp64 reference
    math_out, _ = R.attention_forward(q, k, v, None, 0.0, causal, 0.125)
    budget = 2 * (math_out.double() - ref_out).abs().max().item() + 1e-6
    assert (out.double() - ref_out).abs().max().item() <= max(budget, 1e-5 if dtype == torch.float32 else 2e-2)
    finite = ref_lse.isfinite()
    torch.testing.assert_close(lse[finite].double(), ref_lse[finite], atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("name,impl", [("llama", "eager"), ("bert", "sdpa"), ("vit", "eager")])
def test_cuda_model_optimize(name, impl):
    z = zoo.build(name, impl)
    model = z.model.cuda()
    args = tuple(a.cuda() for a in z.args)
    kwargs = {k: v.cuda() for k, v in z.kwargs.items()}
    opt = attnopt.optimize(model, "exact", args, kwargs)
    rep = attnopt.report(opt)
    assert all(s.decision == "exact" for s in rep.sites), str(rep)
    assert rep.output_deviation < 1e-4


def _cuda_qkv(b=2, h=4, s=300, d=64, dtype=torch.bfloat16):
    g = torch.Generator(device="cuda").manual_seed(0)
    return tuple(torch.randn(b, h, s, d, device="cuda", dtype=dtype, generator=g) for _ in range(3))


@pytest.mark.parametrize("mask", ["none", "bool", "additive"])
def test_cuda_sdpa_dispatch_matches_the_reference_forward_and_backward(mask, tmp_path, monkeypatch):
    """Whichever implementation the dispatch picks, (out, lse) and attnopt's backward match the reference;
    each SDPA backend's lse, normalized, is attnopt's."""
    from attnopt.kernels.exact import dispatch

    monkeypatch.setenv("ATTNOPT_CACHE_DIR", str(tmp_path))
    dispatch.clear_memo()
    q, k, v = (t.requires_grad_() for t in _cuda_qkv())
    attn_mask = None
    if mask != "none":
        keep = torch.rand(2, 1, 300, 300, device="cuda") > 0.2
        attn_mask = keep if mask == "bool" else torch.zeros(keep.shape, device="cuda").masked_fill(~keep, -1e9)
    with dispatch.record() as decisions:
        out, lse = torch.ops.attnopt.attention(q, k, v, attn_mask, 0.0, R.CAUSAL_TOP_LEFT, 0.125, None)
    (decision,) = decisions
    assert decision.backend in ("attnopt", *dispatch.SDPA_BACKENDS) and decision.timings_ms, decision
    ref_out, ref_lse = R.attention_forward(q.double(), k.double(), v.double(), attn_mask, 0.0, R.CAUSAL_TOP_LEFT, 0.125)
    torch.testing.assert_close(out.double(), ref_out, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(lse.double(), ref_lse, atol=1e-2, rtol=1e-2)
    out.float().square().sum().backward()
    grads = [t.grad.clone() for t in (q, k, v)]
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = R.attention_forward(qd, kd, vd, attn_mask, 0.0, R.CAUSAL_TOP_LEFT, 0.125)[0]
    ref.square().sum().backward()
    for got, want in zip(grads, (qd.grad, kd.grad, vd.grad)):
        torch.testing.assert_close(got.double(), want, atol=5e-2, rtol=5e-2)
    for backend in dispatch.Site.of(q, k, v, attn_mask, R.CAUSAL_TOP_LEFT, 0.0, False).sdpa_backends():
        try:
            sdpa_out, sdpa_lse = dispatch.sdpa_forward(backend, q.detach(), k.detach(), v.detach(), attn_mask,
                                                       R.CAUSAL_TOP_LEFT, 0.125)
        except RuntimeError:
            continue  # this backend does not run here (GPU generation, build)
        assert sdpa_lse.shape == (2, 4, 300) and sdpa_lse.dtype == torch.float32
        torch.testing.assert_close(sdpa_lse.double(), ref_lse, atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("kind", ["bool", "additive"])
def test_cuda_key_padding_mask_runs_as_lengths(kind, monkeypatch):
    from attnopt.kernels.exact import dispatch, triton_impl

    seen = []
    real = triton_impl.forward
    monkeypatch.setattr(triton_impl, "forward", lambda *a, **kw: seen.append(kw["kv_lens"]) or real(*a, **kw))
    q, k, v = _cuda_qkv(dtype=torch.float16)
    keep = (torch.arange(300, device="cuda") < torch.tensor([300, 77], device="cuda")[:, None])[:, None, None, :]
    mask = keep if kind == "bool" else torch.zeros(keep.shape, device="cuda").masked_fill(~keep, float("-inf"))
    with dispatch.disabled():
        out, lse = torch.ops.attnopt.attention(q, k, v, mask, 0.0, R.CAUSAL_NONE, 0.125, None)
    assert seen[0].tolist() == [300, 77]
    ref_out, _ = R.attention_forward(q.double(), k.double(), v.double(), mask, 0.0, R.CAUSAL_NONE, 0.125)
    torch.testing.assert_close(out.double(), ref_out, atol=1e-2, rtol=1e-2)
