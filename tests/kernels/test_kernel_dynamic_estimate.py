"""The dynamic-sparse estimators on CUDA's path: the generated Triton estimators (``pooled``, ``antidiagonal``)
against the torch ones in Triton's CPU interpreter; the whole Triton path (Triton estimator, selection, Triton
block-list kernels forward and backward) against the dense reference of its own selection; every estimator and
the selection keeping their tensors on the inputs' device (``meta``); the estimator kernels' AOT scenarios.

What test_kernel_dynamic.py covers is not repeated: the torch estimators, the selection rules, the block-list
kernels on random selections."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import attnopt  # noqa: F401  (registers the ops)
from attnopt import masks
from attnopt.codegen.spec import CAUSAL_BOTTOM_RIGHT, CAUSAL_NONE, CAUSAL_TOP_LEFT
from attnopt.kernels.dynamic import blocks, estimate, estimate_render, estimate_triton, ops, reference, select
from attnopt.kernels.dynamic import render as dynamic_render
from attnopt.kernels.dynamic import triton_impl

pytestmark = pytest.mark.usefixtures("temp_kernel_cache")


def qkv(b, hq, hkv, sq, sk, d, dtype=torch.float32, seed=0, grad=False):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(b, h, s, d, generator=g).to(dtype).requires_grad_(grad)
                 for h, s in ((hq, sq), (hkv, sk), (hkv, sk)))  # fmt: skip


CASES = [  # b, hq, hkv, sq, sk, d, block_m, block_n, causal, stride, dtype
    (2, 4, 2, 77, 72, 24, 16, 32, CAUSAL_BOTTOM_RIGHT, 8, torch.float32),  # GQA; Sk = 9 strides, not whole blocks
    (1, 3, 1, 50, 50, 16, 32, 16, CAUSAL_NONE, 4, torch.float32),
    (1, 2, 2, 70, 45, 40, 16, 16, CAUSAL_TOP_LEFT, 16, torch.float16),  # Sq > Sk: early query blocks see no key
    (1, 2, 1, 65, 65, 16, 16, 16, CAUSAL_BOTTOM_RIGHT, 4, torch.float32),  # the last query sees key block 4's first key
]


class _Loads:
    """Spies on a module's ``load``: the kinds (estimators) or directions (block-list kernels) it loaded."""

    def __init__(self, monkeypatch, module, real):
        self.seen = []
        monkeypatch.setattr(module, "load", lambda spec: self.seen.append(getattr(spec, spec.ROLE)) or real(spec))


@pytest.mark.parametrize("name", estimate_triton.ESTIMATORS)
@pytest.mark.parametrize("b,hq,hkv,sq,sk,d,bm,bn,causal,stride,dtype", CASES)
def test_triton_estimator_matches_torch(monkeypatch, name, b, hq, hkv, sq, sk, d, bm, bn, causal, stride, dtype):
    q, k, _ = qkv(b, hq, hkv, sq, sk, d, dtype)
    offset = blocks.causal_offset(causal, sq, sk)
    params = {"stride": stride} if name == "antidiagonal" else {}
    loads = _Loads(monkeypatch, estimate_triton, estimate_render.load)
    got = estimate_triton.estimate(name, q, k, bm, bn, offset, 0.3, **params)
    want = estimate.estimate(name, q, k, bm, bn, offset, 0.3, **params)
    assert loads.seen == [name]  # the Triton kernel ran, not the torch fallback
    assert got.dtype == torch.float32 and got.shape == want.shape
    torch.testing.assert_close(got, want, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("causal", [CAUSAL_NONE, CAUSAL_BOTTOM_RIGHT])
def test_triton_pooled_takes_its_options(monkeypatch, causal):
    """``rows`` (near blocks' sampled rows) and ``sub`` (query sub-blocks: the kernel pools them, torch averages
    their distributions) on the Triton path equal the torch estimator; GQA, odd sizes."""
    q, k, _ = qkv(1, 4, 2, 75, 70, 24, seed=2)
    offset = blocks.causal_offset(causal, 75, 70)
    loads = _Loads(monkeypatch, estimate_triton, estimate_render.load)
    for params in ({"rows": 2}, {"sub": 16}, {"sub": 32, "rows": 8}):
        got = estimate_triton.estimate("pooled", q, k, 64, 32, offset, 0.3, **params)
        torch.testing.assert_close(got, estimate.estimate("pooled", q, k, 64, 32, offset, 0.3, **params),
                                   atol=2e-6, rtol=1e-5)  # fmt: skip
    assert loads.seen == ["pooled"] * 3


def test_other_estimators_and_inputs_fall_back_to_torch(monkeypatch):
    q, k, _ = qkv(1, 2, 1, 40, 40, 16)
    loads = _Loads(monkeypatch, estimate_triton, estimate_render.load)
    for name, bm, params in (("lowbit", 16, {}), ("pooled", 24, {}), ("pooled", 32, {"sub": 8}),
                             ("antidiagonal", 16, {"stride": 3})):  # fmt: skip
        why = estimate_triton.refusal(name, q, k, bm, bm, params)
        assert why is not None
        if name == "antidiagonal":  # the torch estimator names the problem
            with pytest.raises(ValueError, match="stride 3 must divide"):
                estimate_triton.estimate(name, q, k, bm, bm, 0, **params)
            continue
        torch.testing.assert_close(estimate_triton.estimate(name, q, k, bm, bm, 0, **params),
                                   estimate.estimate(name, q, k, bm, bm, 0, **params))  # fmt: skip
    assert loads.seen == []


@pytest.mark.parametrize("name,options", [("pooled", ()), ("antidiagonal", (("stride", 8),))])
def test_triton_path_matches_dense_reference_of_its_own_selection(monkeypatch, name, options):
    """``dynamic_attention`` on the Triton path (estimator, block lists, forward and backward kernels: the
    interpreter, CPU tensors) equals dense attention on the block mask it chose; GQA, odd sizes, causal."""
    monkeypatch.setattr(ops, "triton_path", lambda q: True)
    estimators = _Loads(monkeypatch, estimate_triton, estimate_render.load)
    kernels = _Loads(monkeypatch, triton_impl, dynamic_render.load)
    q, k, v = qkv(1, 4, 2, 70, 70, 16, grad=True)
    mask = masks.Dynamic(name, block=16, top_k=1, sink=0, local=1, options=options)
    out, _, num, idx = torch.ops.attnopt.dynamic_attention(q, k, v, None, CAUSAL_BOTTOM_RIGHT, 0.25, mask.key())
    assert estimators.seen == [name] and kernels.seen == ["fwd"]
    want_num, want_idx = select.select(estimate.estimate(name, q, k, 16, 16, 0, 0.25, **dict(options)), 70, 70, 16,
                                       16, 0, top_k=1, sink=0, local=1)  # fmt: skip
    assert torch.equal(blocks.dense_blocks(num, idx, 5), blocks.dense_blocks(want_num, want_idx, 5))
    assert 0 < int(num.sum()) < int(blocks.allowed_blocks(70, 70, 16, 16, 0).sum()) * 4  # sparse, not empty
    ref, _ = reference.attention_forward(q, k, v, num, idx, 16, 16, CAUSAL_BOTTOM_RIGHT, None, 0.25)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)
    dout = torch.randn_like(out)
    for a, w in zip(torch.autograd.grad(out, (q, k, v), dout), torch.autograd.grad(ref, (q, k, v), dout)):
        torch.testing.assert_close(a, w, atol=5e-5, rtol=5e-5)
    assert kernels.seen == ["fwd", "bwd"]  # the backward reused the forward's lists on the Triton kernel


@pytest.mark.parametrize("name", estimate.ESTIMATORS)
def test_every_estimator_through_the_triton_kernels_matches_the_dense_reference(monkeypatch, name):
    """Each estimator's own selection (Triton estimator or torch on the device) run by the Triton block-list
    kernels (the interpreter), forward and backward, equals dense attention on that block mask: GQA, odd sizes."""
    monkeypatch.setattr(ops, "triton_path", lambda q: True)
    kernels = _Loads(monkeypatch, triton_impl, dynamic_render.load)
    q, k, v = qkv(1, 4, 2, 83, 83, 16, grad=True, seed=1)
    key = masks.Dynamic(name, block=16, top_k=1, sink=0, local=1).key()
    out, _, num, idx = torch.ops.attnopt.dynamic_attention(q, k, v, None, CAUSAL_BOTTOM_RIGHT, 0.25, key)
    assert 0 < int(num.sum()) < int(blocks.allowed_blocks(83, 83, 16, 16, 0).sum()) * 4
    ref, _ = reference.attention_forward(q, k, v, num, idx, 16, 16, CAUSAL_BOTTOM_RIGHT, None, 0.25)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)
    dout = torch.randn_like(out)
    for a, w in zip(torch.autograd.grad(out, (q, k, v), dout), torch.autograd.grad(ref, (q, k, v), dout)):
        torch.testing.assert_close(a, w, atol=5e-5, rtol=5e-5)
    assert kernels.seen == ["fwd", "bwd"]


class _OneDevice(TorchDispatchMode):
    """Records every op whose tensor arguments lie on more than one device (0-dim CPU scalars aside): on CUDA such
    an op fails or copies from the host. An explicit copy (``.to``) has one argument and passes."""

    def __init__(self):
        super().__init__()
        self.mixed = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        devices = {t.device.type for t in tree_leaves((args, kwargs or {}))
                   if isinstance(t, torch.Tensor) and not (t.device.type == "cpu" and t.dim() == 0)}  # fmt: skip
        if len(devices) > 1:
            self.mixed.append((str(func), sorted(devices)))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("name", estimate.ESTIMATORS)
@pytest.mark.parametrize("causal", [CAUSAL_NONE, CAUSAL_BOTTOM_RIGHT])
def test_estimators_and_selection_keep_tensors_on_the_inputs_device(monkeypatch, name, causal):
    """On ``meta`` inputs (a device with no data, as a GPU's is to the host) every op of the estimator and the
    selection takes tensors of that device only, up to ``from_dense``, whose one host read sizes the lists."""
    handed = []
    monkeypatch.setattr(select, "from_dense", lambda chosen: handed.append(chosen) or (chosen.sum(-1).int(),) * 2)
    q = torch.empty(1, 4, 100, 16, device="meta")
    k = torch.empty(1, 2, 90, 16, device="meta")
    options = (("stride", 8),) if name == "antidiagonal" else ()
    with _OneDevice() as mode:
        probs = estimate.estimate(name, q, k, 32, 16, blocks.causal_offset(causal, 100, 90), **dict(options))
        ops.select_blocks(q, k, masks.Dynamic(name, block=(32, 16), top_k=2, options=options), causal)
        ops.select_blocks(q, k, masks.Dynamic(name, block=(32, 16), threshold=0.8, per_head=False,
                                              options=options), causal)  # fmt: skip
    assert mode.mixed == []
    assert probs.device.type == "meta" and probs.shape == (1, 4, 4, 6)
    assert [t.device.type for t in handed] == ["meta", "meta"]


def test_estimator_specs_refuse_bad_fields_by_name():
    good = dict(dtype="float16", head_dim=64, causal=True, block_m=64, block_n=32, num_warps=4, num_stages=1)
    estimate_render.PooledSpec(**good, tile_q=16, tile_k=16, rows=8)
    with pytest.raises(ValueError, match="PooledSpec.rows must be a power of two dividing block_m 64 and block_n 32"):
        estimate_render.PooledSpec(**good, tile_q=16, tile_k=16, rows=64)
    with pytest.raises(ValueError, match="AntidiagonalSpec.tile_r must be a multiple of block_m / stride = 32"):
        estimate_render.AntidiagonalSpec(**good, stride=2, tile_r=16, tile_c=16)
    with pytest.raises(ValueError, match="AntidiagonalSpec.stride must be a power of two dividing"):
        estimate_render.AntidiagonalSpec(**good, stride=3, tile_r=16, tile_c=16)


def test_rendered_source_names_its_spec():
    spec = estimate_triton.antidiagonal_specs("float32", 40, True, 32, 64, 8)[0]
    source = estimate_render.render(spec)
    assert spec.name == f"attnopt_estimate_antidiagonal_{spec.key}"
    assert f"# spec: {spec.to_json()}" in source and f"def {spec.name}(" in source
    assert "causal_offset" in source and "causal_offset" not in estimate_render.render(
        estimate_triton.antidiagonal_specs("float32", 40, False, 32, 64, 8)[0])  # fmt: skip


def test_aot_scenarios_cover_the_estimator_kernels():
    from attnopt.kernels import aot_scenarios

    launches = aot_scenarios.capture([s for s in aot_scenarios.scenarios() if s.family == "estimate"])
    assert {launch.name for launch in launches} == {f"estimate_d{d}_b64.{kind}" for d in (64, 128)
                                                    for kind in estimate_triton.ESTIMATORS}  # fmt: skip
    for launch in launches:
        assert launch.spec.causal and launch.args["group"] == 2 and launch.args["causal_offset"] == 0
        assert aot_scenarios.arch_spec("estimate", launch.spec, 90) == launch.spec
