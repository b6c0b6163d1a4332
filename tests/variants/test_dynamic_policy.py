"""attnopt.Sparse(attnopt.masks.Dynamic(...)) in the pipeline: the rewrite, its gradients, the refusal of masks it
cannot combine with, auto's candidates and the cost model."""

from types import SimpleNamespace

import torch
import torch.nn.functional as F

import attnopt
from attnopt import cost
from attnopt import masks as M
from attnopt.kernels.dynamic import ops
from attnopt.variants import sparse as sparse_variant


class _Causal(torch.nn.Module):
    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


class _Masked(torch.nn.Module):
    def forward(self, q, k, v, mask):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def _qkv(s=192, heads=2, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, heads, s, d, generator=g) for _ in range(3)]


def test_dynamic_site_runs_the_dynamic_op_forward_and_backward():
    mask = M.Dynamic("pooled", block=32, top_k=1)
    q, k, v = _qkv()
    opt = attnopt.optimize(_Causal(), attnopt.Sparse(mask), (q, k, v))
    site = opt.attnopt_report.sites[0]
    assert site.decision == "sparse" and "dynamic sparse attention" in site.reason
    facts = site.run_facts  # measured when validation ran the replacement on the example operands
    assert 0.0 < facts["density_min"] <= facts["density_mean"] <= facts["density_max"] <= 1.0
    assert 0.0 <= facts["estimate_share"] <= 1.0 and "of the allowed blocks" in site.reason
    assert site.deviation is not None
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = opt(*leaves)
    direct = [t.clone().requires_grad_() for t in (q, k, v)]
    want = torch.ops.attnopt.dynamic_attention(*direct, None, 1, 0.25, mask.key())[0]  # is_causal: top-left
    torch.testing.assert_close(out, want)
    dout = torch.randn_like(out)
    for a, w in zip(torch.autograd.grad(out, leaves, dout), torch.autograd.grad(want, direct, dout)):
        torch.testing.assert_close(a, w)
    assert 0.0 < ops.last_stats(mask.key())["density_mean"] < 1.0  # top-1 of 6 key blocks and the kept ones


def test_a_mask_that_is_not_causal_or_padding_rolls_back_naming_why():
    q, k, v = _qkv(64)
    g = torch.Generator().manual_seed(1)
    mask = torch.rand(1, 1, 64, 64, generator=g) < 0.7
    mask[..., 0] = True
    opt = attnopt.optimize(_Masked(), attnopt.Sparse(M.Dynamic(block=16)), (q, k, v, mask))
    site = opt.attnopt_report.sites[0]
    assert site.decision != "sparse" and "causal mask and key padding only" in site.reason


def test_key_padding_combines_with_the_selection():
    q, k, v = _qkv(96)
    pad = torch.ones(1, 1, 1, 96, dtype=torch.bool)
    pad[..., 90:] = False
    out, _, num, idx = torch.ops.attnopt.dynamic_attention(q, k, v, pad, 0, 0.25, M.Dynamic(block=32).key())
    from attnopt.kernels.dynamic import reference

    want, _ = reference.attention_forward(q, k, v, num, idx, 32, 32, 0, pad[:, 0, 0].expand(1, 96), 0.25)
    torch.testing.assert_close(out, want)


def test_auto_tries_dynamic_selections_on_long_sites_only():
    match = SimpleNamespace(custom_emit=None, dropout_p=0.0, bool_masks=(), additive=None, causal=True,
                            info={}, k=None)  # fmt: skip
    long_site = SimpleNamespace(seq=(4096, 4096), causal="bottom_right")
    short_site = SimpleNamespace(seq=(512, 512), causal="bottom_right")
    dyn = lambda c: [x.mask for x in c if isinstance(x.mask, M.Dynamic)]  # noqa: E731
    assert [m.estimator for m in dyn(sparse_variant.candidates(attnopt.Sparse, long_site, match))] == \
        list(sparse_variant.DYNAMIC_CANDIDATES)
    assert dyn(sparse_variant.candidates(attnopt.Sparse, short_site, match)) == []


def test_cost_of_a_dynamic_selection_grows_with_top_k():
    shape = cost.Shape(batch=1, heads=8, kv_heads=8, sq=8192, sk=8192, d=64, dv=64, causal=True)
    handler = sparse_variant.SparseHandler()
    small = handler.cost(attnopt.Sparse(M.Dynamic(top_k=4)), shape)
    large = handler.cost(attnopt.Sparse(M.Dynamic(top_k=32)), shape)
    exact = cost.exact(True, False)
    assert cost.seconds(small, shape) < cost.seconds(large, shape) < cost.seconds(exact, shape)
