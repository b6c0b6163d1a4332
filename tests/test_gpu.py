"""CUDA: the op's generated-kernel path against the reference, and a whole model. Skipped without a GPU."""

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
