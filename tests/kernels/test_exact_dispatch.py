"""SDPA dispatch wired into the op, and key-padding masks run as lengths: CPU tests with fake timers.

The op's CUDA implementation is called through torch.library's table on CPU tensors, its Triton kernels in
the interpreter; the SDPA side runs through ``aten._scaled_dot_product_flash_attention_for_cpu``, which
follows the CUDA backends' log-sum-exp convention.
"""

import pytest
import torch
import torch.nn.functional as F

import attnopt
from attnopt.kernels.exact import ops
from attnopt.kernels.exact import dispatch, reference, triton_impl
from attnopt.kernels.exact.padding import key_padding_lengths

ENV = dispatch.Environment(gpu="NVIDIA H100 80GB HBM3", torch="2.13.0", triton="3.9.0")
CUDA_FWD = ops.attention_fwd._backend_fns["cuda"]  # torch.library's table of registered device kernels
CUDA_BWD = ops.attention_bwd._backend_fns["cuda"]


@pytest.fixture(autouse=True)
def _caches(tmp_path, monkeypatch):
    """Kernels and dispatch decisions go to a temporary cache; no decision leaks between tests."""
    monkeypatch.setenv("ATTNOPT_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    dispatch.clear_memo()
    yield
    dispatch.clear_memo()


def qkv(b=2, h=2, sq=9, sk=13, d=16):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(b, h, sq, d, generator=g), torch.randn(b, h, sk, d, generator=g),
            torch.randn(b, h, sk, d, generator=g))


def cpu_sdpa(backend, q, k, v, attn_mask, causal, scale):
    """Stands in for the CUDA aten ops: CPU flash attention, its lse normalized like theirs."""
    assert attn_mask is None
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal != 0, scale=scale)
    return dispatch.zero_dead_rows(out, dispatch.normalize_lse(lse, q.shape[:3]))


class FakeTimer:
    """Runs the step once (so a refusing backend raises) and returns the next scripted time."""

    def __init__(self, *times):
        self.times, self.calls = list(times), 0

    def __call__(self, step):
        step()
        self.calls += 1
        return self.times.pop(0)


# ---------------------------------------------------------------------------------------------------------------
# lse conventions


def test_cpu_flash_lse_is_attnopts_convention():
    """The aten flash op's logsumexp is [B, H, Sq] fp32 natural log, the reference's lse."""
    q, k, v = qkv()
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, True, scale=0.3)
    ref_out, ref_lse = reference.attention_forward(q, k, v, None, 0.0, reference.CAUSAL_TOP_LEFT, 0.3)
    torch.testing.assert_close(dispatch.normalize_lse(lse, q.shape[:3]), ref_lse)
    torch.testing.assert_close(out, ref_out)


def test_normalize_lse_drops_padding_and_trailing_dim():
    lse = torch.randn(2, 3, 9)
    padded = torch.cat([lse, torch.full((2, 3, 23), float("inf"))], dim=2)  # efficient: Sq padded to 32
    torch.testing.assert_close(dispatch.normalize_lse(padded, (2, 3, 9)), lse, rtol=0, atol=0)
    got = dispatch.normalize_lse(lse[..., None].double(), (2, 3, 9))  # cuDNN: [B, H, Sq, 1]
    assert got.dtype == torch.float32 and got.is_contiguous() and torch.equal(got, lse)
    with pytest.raises(ValueError, match=r"does not cover \[B, Hq, Sq\]"):
        dispatch.normalize_lse(lse[..., :4], (2, 3, 9))


def test_dead_rows_become_zeros_and_minus_inf():
    out, lse = torch.ones(1, 1, 3, 4), torch.tensor([[[0.5, float("nan"), float("-inf")]]])
    out, lse = dispatch.zero_dead_rows(out, lse)
    assert (out[0, 0, 0] == 1).all() and (out[0, 0, 1:] == 0).all()
    assert lse[0, 0, 0] == 0.5 and (lse[0, 0, 1:] == float("-inf")).all()


# ---------------------------------------------------------------------------------------------------------------
# Decisions


def test_choose_measures_once_per_bucket_and_caches_on_disk(tmp_path, monkeypatch):
    monkeypatch.setattr(dispatch, "sdpa_forward", cpu_sdpa)
    q, k, v = qkv(sq=13, sk=13)  # causal SDPA dispatch is square only
    timer = FakeTimer(2.0, 1.0, 4.0, 3.0)  # attnopt, sdpa-flash, sdpa-cudnn, sdpa-efficient
    decision = dispatch.choose(q, k, v, None, reference.CAUSAL_TOP_LEFT, 0.25, timer=timer, env=ENV)
    assert decision.backend == "sdpa-flash" and timer.calls == 4
    assert decision.describe() == "sdpa-flash, 2.00x faster than the attnopt kernel"
    q2, k2, v2 = qkv(sq=15, sk=15)  # same buckets: no new measurement
    assert dispatch.choose(q2, k2, v2, None, reference.CAUSAL_TOP_LEFT, 0.25, timer=timer, env=ENV) == decision
    dispatch.clear_memo()
    assert dispatch.choose(q, k, v, None, reference.CAUSAL_TOP_LEFT, 0.25, timer=timer, env=ENV) == decision
    assert timer.calls == 4 and len(list((tmp_path / "dispatch").iterdir())) == 1


def test_refusing_backends_leave_the_attnopt_kernel():
    """On CPU tensors the CUDA aten ops refuse: only attnopt is measured."""
    q, k, v = qkv()
    timer = FakeTimer(1.0)
    decision = dispatch.choose(q, k, v, None, 0, None, timer=timer, env=ENV)
    assert decision == dispatch.Decision("attnopt", timings_ms={"attnopt": 1.0})
    assert decision.describe() == "attnopt kernel"


@pytest.mark.parametrize("change, why", [
    (dict(softcap=5.0), "softcap"),
    (dict(dropout_p=0.1), "dropout"),
    (dict(causal=reference.CAUSAL_BOTTOM_RIGHT), "Sq != Sk"),
    (dict(causal=reference.CAUSAL_TOP_LEFT), "Sq != Sk"),  # flash's aten is_causal would be bottom-right
])
def test_sites_sdpa_cannot_run_are_not_measured(change, why):
    q, k, v = qkv()
    args = dict(causal=0, dropout_p=0.0, softcap=0.0) | change
    decision = dispatch.choose(q, k, v, None, args["causal"], None, args["dropout_p"], args["softcap"],
                               timer=FakeTimer(), env=ENV)
    assert decision.backend == "attnopt" and why in decision.note and decision.timings_ms == {}
    assert decision.describe().startswith("attnopt kernel (no SDPA backend: ")


def test_gqa_is_not_dispatched():
    q = torch.zeros(1, 4, 8, 16)
    kv = torch.zeros(1, 2, 8, 16)
    assert "GQA" in dispatch.choose(q, kv, kv, timer=FakeTimer(), env=ENV).note


def test_env_var_and_context_turn_dispatch_off(monkeypatch):
    q, k, v = qkv()
    timer = FakeTimer()
    with dispatch.disabled():
        assert dispatch.choose(q, k, v, timer=timer, env=ENV).describe() == "attnopt kernel (SDPA dispatch off)"
    monkeypatch.setenv(dispatch.ENV_VAR, "0")
    decision = dispatch.choose(q, k, v, timer=timer, env=ENV)
    assert decision.describe() == f"attnopt kernel ({dispatch.ENV_VAR}=0)" and timer.calls == 0


def test_describe_attnopt_winner():
    d = dispatch.Decision("attnopt", 1.31, "sdpa-flash", {"attnopt": 1.0, "sdpa-flash": 1.31})
    assert d.describe() == "attnopt kernel, 1.31x vs sdpa-flash"
    assert dispatch.Decision("reference").describe() == "reference (CPU)"


# ---------------------------------------------------------------------------------------------------------------
# The op's CUDA implementation


def test_op_runs_the_sdpa_winner_and_attnopt_backward_stays_exact(monkeypatch):
    monkeypatch.setattr(dispatch, "choose", lambda *a, **kw: dispatch.Decision("sdpa-flash"))
    monkeypatch.setattr(dispatch, "sdpa_forward", cpu_sdpa)
    q, k, v = qkv()
    out, lse = CUDA_FWD(q, k, v, None, 0.0, reference.CAUSAL_TOP_LEFT, 0.3, None, 0.0)
    want_out, want_lse = cpu_sdpa("sdpa-flash", q, k, v, None, reference.CAUSAL_TOP_LEFT, 0.3)
    assert torch.equal(out, want_out) and torch.equal(lse, want_lse)
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(3))
    got = CUDA_BWD(dout, q, k, v, out, lse, None, 0.0, reference.CAUSAL_TOP_LEFT, 0.3, None, False, 0.0)
    ref = reference.attention_backward(dout, q, k, v, out, lse, None, 0.0, reference.CAUSAL_TOP_LEFT, 0.3)
    for a, b in zip(got[:3], ref[:3]):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=2e-5)


def test_op_falls_back_to_the_kernel_when_the_backend_refuses(monkeypatch):
    def refuse(*args):
        raise RuntimeError("no kernel for this shape")

    monkeypatch.setattr(dispatch, "choose", lambda *a, **kw: dispatch.Decision("sdpa-cudnn"))
    monkeypatch.setattr(dispatch, "sdpa_forward", refuse)
    q, k, v = qkv()
    out, _ = CUDA_FWD(q, k, v, None, 0.0, 0, 0.3, None, 0.0)
    torch.testing.assert_close(out, triton_impl.forward(q, k, v, None, 0, 0.3)[0], rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------------------
# Key padding as lengths


def lengths_mask(lens, sk, kind="bool", fill=float("-inf")):
    keep = torch.arange(sk)[None, :] < torch.tensor(lens)[:, None]  # [B, Sk]
    mask = keep if kind == "bool" else torch.zeros(keep.shape).masked_fill(~keep, fill)
    return mask[:, None, None, :]  # [B, 1, 1, Sk]


@pytest.mark.parametrize("kind, fill", [("bool", None), ("additive", float("-inf")),
                                        ("additive", torch.finfo(torch.float32).min)])
def test_right_padding_is_recognized(kind, fill):
    mask = lengths_mask([13, 5, 1], 13, kind, fill)
    assert key_padding_lengths(mask, (3, 4, 9, 13)).tolist() == [13, 5, 1]
    expanded = mask.expand(3, 4, 9, 13)  # stride 0 on heads and queries
    assert key_padding_lengths(expanded, (3, 4, 9, 13)).tolist() == [13, 5, 1]
    assert key_padding_lengths(lengths_mask([4], 13, kind, fill)[0, 0], (3, 4, 9, 13)).tolist() == [4, 4, 4]


def test_a_fully_padded_row_needs_an_infinite_fill():
    """kv_lens = 0 gives zeros; a finite fill over a whole row averages V instead."""
    assert key_padding_lengths(lengths_mask([13, 0], 13), (2, 1, 9, 13)).tolist() == [13, 0]
    assert key_padding_lengths(lengths_mask([13, 0], 13, "additive"), (2, 1, 9, 13)).tolist() == [13, 0]
    assert key_padding_lengths(lengths_mask([13, 0], 13, "additive", -1e38), (2, 1, 9, 13)) is None


def test_other_masks_are_not_padding():
    shape = (2, 2, 9, 13)
    left = lengths_mask([13, 5], 13).flip(-1)
    holes = lengths_mask([13, 9], 13).clone()
    holes[1, ..., 3] = False
    per_head = lengths_mask([13, 5], 13).expand(2, 2, 1, 13).clone()
    per_head[0, 1, ..., 12] = False
    per_query = lengths_mask([13, 5], 13).expand(2, 1, 9, 13).clone()
    per_query[1, 0, 8, 4] = False
    small_fill = lengths_mask([13, 5], 13, "additive", -5.0)
    bias = lengths_mask([13, 5], 13, "additive") + 0.5
    for mask in (left, holes, per_head, per_query, small_fill, bias):
        assert key_padding_lengths(mask, shape) is None
    assert key_padding_lengths(torch.ones(2, 13, dtype=torch.int64), shape) is None


@pytest.mark.parametrize("kind", ["bool", "additive"])
def test_op_runs_padding_masks_as_lengths(kind, monkeypatch):
    calls = []
    real_fwd, real_bwd = triton_impl.forward, triton_impl.backward
    monkeypatch.setattr(triton_impl, "forward", lambda *a, **kw: calls.append((a[3], kw["kv_lens"])) or
                        real_fwd(*a, **kw))
    monkeypatch.setattr(triton_impl, "backward", lambda *a, **kw: calls.append((a[6], kw["kv_lens"])) or
                        real_bwd(*a, **kw))
    q, k, v = qkv(b=3, sq=9, sk=40)
    mask = lengths_mask([40, 17, 0], 40, kind)
    out, lse = CUDA_FWD(q, k, v, mask, 0.0, reference.CAUSAL_BOTTOM_RIGHT, 0.3, None, 0.0)
    ref_out, ref_lse = reference.attention_forward(q, k, v, mask, 0.0, reference.CAUSAL_BOTTOM_RIGHT, 0.3)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, ref_lse, atol=1e-5, rtol=1e-5)
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(3))
    got = CUDA_BWD(dout, q, k, v, out, lse, mask, 0.0, reference.CAUSAL_BOTTOM_RIGHT, 0.3, None, False, 0.0)
    ref = reference.attention_backward(dout, q, k, v, out, lse, mask, 0.0, reference.CAUSAL_BOTTOM_RIGHT, 0.3)
    for a, b in zip(got[:3], ref[:3]):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=2e-5)
    assert [(m, lens.tolist()) for m, lens in calls] == [(None, [40, 17, 0])] * 2


def test_op_keeps_a_mask_that_needs_its_gradient():
    q, k, v = qkv(b=2, sk=13)
    mask = lengths_mask([13, 5], 13, "additive").requires_grad_()
    assert ops._key_padding(q, k, mask) == (mask, None)


# ---------------------------------------------------------------------------------------------------------------
# The report


class Attention(torch.nn.Module):
    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def test_report_says_what_runs_on_cpu():
    opt = attnopt.optimize(Attention().eval(), "exact", qkv(sq=9, sk=9))
    rep = attnopt.report(opt)
    (site,) = rep.sites
    assert site.decision == "exact" and site.runs == "sdpa-flash (CPU)"
    assert "sdpa-flash (CPU)" in rep.render(width=200) and '"runs": "sdpa-flash (CPU)' in rep.to_json()
