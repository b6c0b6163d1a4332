"""The native CPU block-list kernel (fp32) against the dense reference of its own selection, forward and backward:
odd sizes, GQA, a selection shared by every head, causal codes, key padding; which inputs it refuses; the custom
ops reaching it."""

import pytest
import torch

import attnopt  # noqa: F401  (registers the ops)
from attnopt.codegen.spec import CAUSAL_BOTTOM_RIGHT, CAUSAL_NONE, CAUSAL_TOP_LEFT
from attnopt.kernels.dynamic import blocks, cpu, native, reference, select

pytestmark = pytest.mark.skipif(native.unavailable() is not None, reason=f"native kernel: {native.unavailable()}")

F32 = dict(atol=2e-5, rtol=2e-5)

CASES = [  # b, hq, hkv, sq, sk, d, dv, bm, bn, causal, heads of the selection, padding
    (2, 4, 2, 77, 93, 32, 48, 16, 32, CAUSAL_BOTTOM_RIGHT, 4, True),
    (1, 3, 1, 130, 200, 64, 64, 64, 64, CAUSAL_TOP_LEFT, 1, False),
    (1, 2, 1, 300, 257, 128, 64, 128, 32, CAUSAL_BOTTOM_RIGHT, 2, True),
    (2, 2, 2, 50, 33, 16, 16, 32, 16, CAUSAL_NONE, 2, False),
]


def _inputs(b, hq, hkv, sq, sk, d, dv, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, hq, sq, d, generator=g), torch.randn(b, hkv, sk, d, generator=g),
            torch.randn(b, hkv, sk, dv, generator=g))  # fmt: skip


def _selection(b, h, sq, sk, bm, bn, seed=0):
    g = torch.Generator().manual_seed(seed)
    chosen = torch.rand(b, h, blocks.num_blocks(sq, bm), blocks.num_blocks(sk, bn), generator=g) < 0.4
    chosen[0, 0, 0] = False  # a query block that sees nothing: zeros and lse -inf
    return blocks.from_dense(chosen)


@pytest.mark.parametrize("b,hq,hkv,sq,sk,d,dv,bm,bn,causal,hs,pad", CASES)
def test_native_matches_dense_reference_forward_and_backward(b, hq, hkv, sq, sk, d, dv, bm, bn, causal, hs, pad):
    q, k, v = _inputs(b, hq, hkv, sq, sk, d, dv)
    num, idx = _selection(b, hs, sq, sk, bm, bn)
    kv_valid = None
    if pad:
        kv_valid = torch.ones(b, sk, dtype=torch.bool)
        kv_valid[-1, sk - 7:] = False
    assert native.refusal(q, k, v, bm, bn) is None
    out, lse = native.forward(q, k, v, num, idx, bm, bn, causal, kv_valid, 0.2)
    r_out, r_lse = reference.attention_forward(q.double(), k.double(), v.double(), num, idx, bm, bn, causal, kv_valid,
                                               0.2)  # fmt: skip
    torch.testing.assert_close(out, r_out.float(), **F32)
    assert torch.equal(lse.isinf(), r_lse.isinf())
    torch.testing.assert_close(lse.nan_to_num(neginf=0), r_lse.float().nan_to_num(neginf=0), **F32)
    dout = torch.randn_like(out)
    got = native.backward(dout, q, k, v, out, lse, num, idx, bm, bn, causal, kv_valid, 0.2)
    want = reference.attention_backward(dout.double(), q.double(), k.double(), v.double(), r_out, r_lse, num, idx, bm,
                                        bn, causal, kv_valid, 0.2)  # fmt: skip
    for name, a, w in zip(("dq", "dk", "dv"), got, want):
        assert a.shape == w.shape, name
        torch.testing.assert_close(a, w.float(), **F32, msg=name)


def test_cpu_path_takes_the_native_kernel_for_fp32(monkeypatch):
    q, k, v = _inputs(1, 2, 1, 64, 64, 16, 16)
    num, idx = _selection(1, 2, 64, 64, 16, 16)
    calls = []
    monkeypatch.setattr(native, "forward", lambda *a: calls.append(a) or (q, q[..., 0]))
    cpu.forward(q, k, v, num, idx, 16, 16, CAUSAL_NONE, None, None)
    cpu.forward(q.double(), k.double(), v.double(), num, idx, 16, 16, CAUSAL_NONE, None, None)
    assert len(calls) == 1  # fp64 takes the gathering path


@pytest.mark.parametrize("change,words", [
    (dict(dtype=torch.float64), "fp32"),
    (dict(block=24), "blocks"),
    (dict(d=72), "multiples of 16"),
    (dict(d=144), "up to 128"),
])  # fmt: skip
def test_refusals_name_the_reason(change, words):
    d, block = change.get("d", 32), change.get("block", 32)
    q, k, v = (t.to(change.get("dtype", torch.float32)) for t in _inputs(1, 1, 1, 40, 40, d, d))
    assert words in native.refusal(q, k, v, block, block)


def test_out_of_range_block_index_is_an_error_not_a_wild_read():
    q, k, v = _inputs(1, 1, 1, 64, 64, 16, 16)
    num = torch.full((1, 1, 4), 2, dtype=torch.int32)
    idx = torch.tensor([[[[0, 1], [0, 1], [0, 4], [0, 1]]]], dtype=torch.int32)
    with pytest.raises(ValueError, match="outside 0..3"):
        native.forward(q, k, v, num, idx, 16, 16, CAUSAL_NONE, None, None)


def test_turned_off_by_environment(monkeypatch):
    monkeypatch.setenv("ATTNOPT_NATIVE", "0")
    assert "ATTNOPT_NATIVE=0" in native.unavailable()
    q, k, v = _inputs(1, 1, 1, 40, 40, 16, 16)
    assert "ATTNOPT_NATIVE=0" in native.refusal(q, k, v, 16, 16)
    monkeypatch.delenv("ATTNOPT_NATIVE")
    assert native.unavailable() is None


def test_custom_op_forward_and_backward_through_native():
    q, k, v = (t.requires_grad_() for t in _inputs(1, 4, 2, 70, 70, 32, 32))
    num, idx = _selection(1, 4, 70, 70, 16, 16, seed=3)
    out, _ = torch.ops.attnopt.block_sparse_attention(q, k, v, num, idx, None, 16, 16, CAUSAL_BOTTOM_RIGHT, 0.25)
    out.square().sum().backward()
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref, _ = reference.attention_forward(qd, kd, vd, num, idx, 16, 16, CAUSAL_BOTTOM_RIGHT, None, 0.25)
    ref.square().sum().backward()
    torch.testing.assert_close(out, ref.float(), **F32)
    for a, w in ((q, qd), (k, kd), (v, vd)):
        torch.testing.assert_close(a.grad, w.grad.float(), **F32)


@pytest.mark.parametrize("sq,sk,bm,bn,offset,top_k,threshold,sink,local", [
    (300, 300, 16, 32, 0, None, 0.9, 1, 1),
    (300, 450, 32, 16, 150, 3, None, 2, 2),
    (130, 130, 16, 16, None, None, 0.5, 0, 0),
    (200, 200, 64, 64, 0, None, 0.99, 1, 3),
    (100, 60, 16, 16, -40, 2, None, 1, 1),
])  # fmt: skip
def test_native_selection_is_the_rule_of_select(sq, sk, bm, bn, offset, top_k, threshold, sink, local):
    nq, nk = blocks.num_blocks(sq, bm), blocks.num_blocks(sk, bn)
    g = torch.Generator().manual_seed(sq + sk)
    probs = torch.softmax(torch.randn(2, 3, nq, nk, generator=g) * 3, -1)
    rule = dict(top_k=top_k, threshold=threshold, sink=sink, local=local)
    want = select.select(probs, sq, sk, bm, bn, offset, **rule)
    got = native.select(probs, sq, sk, bm, bn, offset, **rule)
    assert torch.equal(got[0], want[0])
    assert torch.equal(blocks.dense_blocks(*got, nk), blocks.dense_blocks(*want, nk))
