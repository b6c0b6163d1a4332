"""The exact op's CPU implementation against the reference: SDPA's CPU flash kernel (adapted to attnopt's
conventions) and the blockwise kernel, forward and backward, every feature, and which of them runs."""

import itertools

import pytest
import torch

import attnopt  # noqa: F401  (registers torch.ops.attnopt)
from attnopt.kernels.exact import cpu, cpu_blockwise, dispatch, reference as R

NONE, TL, BR = R.CAUSAL_NONE, R.CAUSAL_TOP_LEFT, R.CAUSAL_BOTTOM_RIGHT
SHAPES = [  # (B, Hq, Hkv, Sq, Sk)
    (2, 4, 2, 9, 13),  # GQA, Sq < Sk
    (1, 3, 1, 13, 9),  # MQA, Sq > Sk
    (2, 2, 2, 11, 11),
]


@pytest.fixture(autouse=True)
def _small_blocks(monkeypatch):
    """Tiles of 4 x 4, so that every test shape spans several tiles (and causal skips some)."""
    monkeypatch.setattr(cpu_blockwise, "TILE_BUDGET", 1)
    monkeypatch.setattr(cpu_blockwise, "MIN_TILE", 4)
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)


def make_mask(kind, b, hq, sq, sk, dtype, gen):
    if kind == "bool":  # per batch, shared by heads; row 1 fully masked
        m = torch.rand(b, 1, sq, sk, generator=gen) > 0.4
        m[0, 0, 1] = False
        return m
    if kind == "additive":  # per head, row 2 of head 0 fully -inf
        m = torch.randn(1, hq, sq, sk, generator=gen, dtype=dtype)
        m[0, 0, 2] = float("-inf")
        return m
    if kind == "padding":  # HF key padding [B, 1, 1, Sk]
        m = torch.ones(b, 1, 1, sk, dtype=torch.bool)
        m[-1, ..., sk // 2:] = False
        return m
    return None


def inputs(shape, d=8, dv=8, dtype=torch.float64, seed=0):
    b, hq, hkv, sq, sk = shape
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(b, hq, sq, d, generator=gen, dtype=dtype),
            torch.randn(b, hkv, sk, d, generator=gen, dtype=dtype),
            torch.randn(b, hkv, sk, dv, generator=gen, dtype=dtype), gen)


def check_against_reference(got_fwd, got_bwd, q, k, v, mask, causal, softcap=0.0, dropout_p=0.0, seed=None,
                            mask_grad=False, dout=None, tol=1e-10):
    out, lse = got_fwd
    if dropout_p and tol < 1e-6:
        tol = 1e-6  # the reference's backward scales its dropout keep-mask in fp32 (bool / float)
    ref_out, ref_lse = R.attention_forward(q, k, v, mask, dropout_p, causal, 0.3, seed, softcap)
    assert torch.equal(lse == float("-inf"), ref_lse == float("-inf"))
    torch.testing.assert_close(out, ref_out, atol=tol, rtol=tol)
    torch.testing.assert_close(lse, ref_lse, atol=tol, rtol=tol)
    ref = R.attention_backward(dout, q, k, v, ref_out, ref_lse, mask, dropout_p, causal, 0.3, seed, mask_grad, softcap)
    for name, a, b in zip("dq dk dv dmask".split(), got_bwd, ref):
        if b is not None:
            torch.testing.assert_close(a, b, atol=tol, rtol=tol, msg=name)


@pytest.mark.parametrize("shape, mask, causal, softcap, dropout_p", [
    (shape, mask, causal, softcap, dropout_p)
    for shape, mask, causal, softcap, dropout_p in itertools.product(
        SHAPES, [None, "bool", "additive", "padding"], [NONE, TL, BR], [0.0, 5.0], [0.0, 0.25])
    if not (softcap and dropout_p)  # the product of both adds nothing but test time
])
def test_blockwise_matches_the_reference(shape, mask, causal, softcap, dropout_p):
    q, k, v, gen = inputs(shape, dv=5)
    m = make_mask(mask, shape[0], shape[1], shape[3], shape[4], q.dtype, gen)
    seed = torch.tensor(7) if dropout_p else None
    mask_grad = mask == "additive"
    fwd = cpu_blockwise.forward(q, k, v, m, causal, 0.3, softcap, dropout_p, seed)
    dout = torch.randn(fwd[0].shape, generator=gen, dtype=q.dtype)
    bwd = cpu_blockwise.backward(dout, q, k, v, *fwd, m, causal, 0.3, softcap, dropout_p, seed, mask_grad)
    check_against_reference(fwd, bwd, q, k, v, m, causal, softcap, dropout_p, seed, mask_grad, dout)


@pytest.mark.parametrize("shape, mask, causal", list(itertools.product(
    SHAPES, [None, "bool", "additive", "padding"], [NONE, TL, BR])))
def test_sdpa_path_matches_the_reference(shape, mask, causal):
    """Bool masks, dead rows, GQA and both causal alignments with Sq != Sk through SDPA's CPU kernel."""
    q, k, v, gen = inputs(shape)
    m = make_mask(mask, shape[0], shape[1], shape[3], shape[4], q.dtype, gen)
    assert dispatch.cpu_refusal(q, k, v, m, 0.0, 0.0) == ""
    fwd = cpu.sdpa_forward(q, k, v, m, causal, 0.3)
    dout = torch.randn(fwd[0].shape, generator=gen, dtype=q.dtype)
    bwd = cpu.sdpa_backward(dout, q, k, v, *fwd, m, causal, 0.3)
    check_against_reference(fwd, bwd, q, k, v, m, causal, dout=dout)


def run_op(q, k, v, mask=None, causal=NONE, softcap=0.0, dropout_p=0.0):
    """The op with autograd: ``((out, lse), (dq, dk, dv, dmask), dout, decisions)``."""
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    if mask is not None and mask.is_floating_point():
        mask = mask.detach().requires_grad_()
    seed = torch.tensor(3) if dropout_p else None
    with dispatch.record() as decisions:
        out, lse = torch.ops.attnopt.attention(q, k, v, mask, dropout_p, causal, 0.3, seed, softcap)
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)
    wrt = (q, k, v) + ((mask,) if mask is not None and mask.requires_grad else ())
    grads = torch.autograd.grad(out, wrt, dout)
    return (out.detach(), lse), grads + (None,) * (4 - len(grads)), dout, decisions


@pytest.mark.parametrize("change, runs", [
    (dict(), "sdpa-flash (CPU)"),
    (dict(causal=TL), "sdpa-flash (CPU)"),
    (dict(causal=BR), "sdpa-flash (CPU)"),  # Sq != Sk: split into two SDPA calls
    (dict(mask="bool"), "sdpa-flash (CPU)"),
    (dict(mask="padding", causal=BR), "sdpa-flash (CPU)"),
    (dict(mask="additive"), "sdpa-flash (CPU)"),  # the forward; its gradient runs blockwise
    (dict(softcap=5.0), "blockwise (CPU: softcap: SDPA has none)"),
    (dict(dropout_p=0.3), "blockwise (CPU: dropout: SDPA cannot replay attnopt's seeded mask)"),
    (dict(dv=5), "blockwise (CPU: value head dim differs from the query's: SDPA's CPU kernel needs them equal)"),
])
def test_op_runs_the_right_kernel_and_matches_the_reference(change, runs):
    opts = dict(mask=None, causal=NONE, softcap=0.0, dropout_p=0.0, dv=8) | change
    q, k, v, gen = inputs(SHAPES[0], dv=opts["dv"])
    m = make_mask(opts["mask"], 2, 4, 9, 13, q.dtype, gen)
    fwd, bwd, dout, decisions = run_op(q, k, v, m, opts["causal"], opts["softcap"], opts["dropout_p"])
    assert [d.describe() for d in decisions] == [runs]
    seed = torch.tensor(3) if opts["dropout_p"] else None
    check_against_reference(fwd, bwd, q, k, v, m, opts["causal"], opts["softcap"], opts["dropout_p"], seed,
                            mask_grad=opts["mask"] == "additive", dout=dout)


def test_dispatch_off_runs_blockwise(monkeypatch):
    q, k, v, _ = inputs(SHAPES[2])
    with dispatch.disabled(), dispatch.record() as decisions:
        torch.ops.attnopt.attention(q, k, v, None, 0.0, TL, 0.3, None)
    assert decisions[0].describe() == "blockwise (CPU: SDPA dispatch off)"
    monkeypatch.setenv(dispatch.ENV_VAR, "0")
    assert dispatch.choose(q, k, v).backend == dispatch.BLOCKWISE


def test_cpu_refusals():
    q, k, v, _ = inputs(SHAPES[0], dtype=torch.float32)
    assert dispatch.cpu_refusal(q, k, v, None, 0.0, 0.0) == ""
    assert "empty" in dispatch.cpu_refusal(q, k[:, :, :0], v[:, :, :0], None, 0.0, 0.0)  # SDPA's kernel crashes there
    assert "additive mask" in dispatch.cpu_refusal(q, k, v, torch.zeros(9, 13, dtype=torch.float64), 0.0, 0.0)
    assert dispatch.cpu_refusal(q, k, v, torch.zeros(9, 13, dtype=torch.bool), 0.0, 0.0) == ""


@pytest.mark.parametrize("kind", ["bool", "additive"])
def test_fully_masked_rows_give_zeros_and_minus_inf(kind):
    """Every row of batch 1 hidden: SDPA returns lse = 0 there; the adapter finds the rows from the mask."""
    q, k, v, _ = inputs((2, 2, 2, 6, 7))
    keep = torch.ones(2, 1, 1, 7, dtype=torch.bool)
    keep[1] = False
    mask = keep if kind == "bool" else torch.zeros(keep.shape, dtype=q.dtype).masked_fill(~keep, float("-inf"))
    fwd, bwd, dout, decisions = run_op(q, k, v, mask, TL)
    assert decisions[0].backend == dispatch.SDPA_CPU
    assert (fwd[1][1] == float("-inf")).all() and (fwd[0][1] == 0).all() and torch.isfinite(fwd[1][0]).all()
    assert (bwd[0][1] == 0).all() and torch.isfinite(bwd[1]).all()
    check_against_reference(fwd, bwd, q, k, v, mask, TL, mask_grad=kind == "additive", dout=dout)


def test_rows_masked_by_a_finite_fill_average_v():
    """A row hidden by finfo.min (HF's fill) averages V, forward and backward (the backward runs blockwise)."""
    q, k, v, _ = inputs((1, 2, 2, 5, 6), dtype=torch.float32)
    mask = torch.zeros(1, 1, 5, 6)
    mask[0, 0, 3] = torch.finfo(torch.float32).min
    fwd, bwd, dout, _ = run_op(q, k, v, mask.clone(), NONE)
    torch.testing.assert_close(fwd[0][0, :, 3], v[0].mean(dim=1))
    check_against_reference(fwd, bwd, q, k, v, mask, NONE, mask_grad=True, dout=dout, tol=1e-5)
    assert cpu.backward(dout, q, k, v, *fwd, mask, 0.0, NONE, 0.3, None, False, 0.0)[3] is None


def test_empty_sequences():
    q, k, v, _ = inputs((1, 2, 2, 4, 0))
    out, lse = torch.ops.attnopt.attention(q, k, v, None, 0.0, NONE, 0.3, None)
    assert (out == 0).all() and (lse == float("-inf")).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_low_precision_inputs(dtype):
    q, k, v, gen = inputs((1, 4, 2, 33, 40), d=16, dv=16, dtype=dtype)
    for softcap in (0.0, 10.0):  # SDPA, then blockwise
        fwd, bwd, dout, _ = run_op(q, k, v, None, BR, softcap)
        assert fwd[0].dtype == dtype and fwd[1].dtype == torch.float32 and bwd[1].dtype == dtype
        ref_out, ref_lse = R.attention_forward(q.double(), k.double(), v.double(), None, 0.0, BR, 0.3, None, softcap)
        tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
        torch.testing.assert_close(fwd[0].double(), ref_out, atol=tol, rtol=tol)
        torch.testing.assert_close(fwd[1].double(), ref_lse, atol=tol, rtol=tol)


def test_gradcheck_blockwise_softcap_gqa():
    q, k, v, gen = inputs((1, 2, 1, 5, 7), d=4, dv=3)
    mask = torch.randn(1, 1, 5, 7, generator=gen, dtype=torch.float64, requires_grad=True)
    q, k, v = (t.requires_grad_() for t in (q, k, v))

    def f(q, k, v, mask):
        return torch.ops.attnopt.attention(q, k, v, mask, 0.0, BR, 0.3, None, 2.0)[0]

    assert torch.autograd.gradcheck(f, (q, k, v, mask))


def test_tiles_skip_what_causal_hides():
    """Top-left causal with Sq < Sk never computes the keys beyond the last query; bottom-right skips the
    keys beyond each query tile's last row."""
    q, k, v, _ = inputs((1, 1, 1, 8, 64))
    pb = cpu_blockwise.prepare(q, k, v, None, TL, 0.3, 0.0, 0.0, None)
    assert [list(pb.key_tiles(r0, r1)) for r0, r1 in pb.query_tiles()] == [[(0, 4)], [(0, 4), (4, 8)]]
    pb = cpu_blockwise.prepare(q, k, v, None, BR, 0.3, 0.0, 0.0, None)
    assert [len(list(pb.key_tiles(r0, r1))) for r0, r1 in pb.query_tiles()] == [15, 16]


def test_tiles_skip_what_the_mask_hides_for_every_batch_and_head():
    q, k, v, _ = inputs((2, 2, 1, 8, 16))
    band = (torch.arange(16)[None, :] - torch.arange(8)[:, None]).abs() <= 2  # [Sq, Sk] a band of width 5
    for mask in (band, torch.zeros(8, 16).masked_fill(~band, torch.finfo(torch.float32).min)):
        pb = cpu_blockwise.prepare(q, k, v, mask, NONE, 0.3, 0.0, 0.0, None)
        tiles = [list(pb.key_tiles(r0, r1)) for r0, r1 in pb.query_tiles()]
        assert tiles == [[(0, 4), (4, 8)], [(0, 4), (4, 8), (8, 12)]]
    padding = torch.ones(2, 1, 1, 16, dtype=torch.bool)
    padding[0, ..., 6:] = False
    pb = cpu_blockwise.prepare(q, k, v, padding, NONE, 0.3, 0.0, 0.0, None)
    assert len(list(pb.key_tiles(0, 4))) == 4  # batch 1 sees every key
    padding[1, ..., 6:] = False
    pb = cpu_blockwise.prepare(q, k, v, padding, NONE, 0.3, 0.0, 0.0, None)
    assert list(pb.key_tiles(0, 4)) == [(0, 4), (4, 8)]


def test_a_row_of_finite_fills_keeps_every_tile():
    """A row that sees only finfo.min fills averages V over them: no tile of it may be skipped."""
    q, k, v, _ = inputs((1, 1, 1, 8, 16))
    mask = torch.zeros(8, 16)
    mask[:, 4:] = torch.finfo(torch.float32).min
    assert list(cpu_blockwise.prepare(q, k, v, mask, NONE, 0.3, 0.0, 0.0, None).key_tiles(0, 4)) == [(0, 4)]
    mask[3, :4] = torch.finfo(torch.float32).min
    pb = cpu_blockwise.prepare(q, k, v, mask, NONE, 0.3, 0.0, 0.0, None)
    assert len(list(pb.key_tiles(0, 4))) == 4
    fwd = cpu_blockwise.forward(q, k, v, mask, NONE, 0.3)
    torch.testing.assert_close(fwd[0][0, 0, 3], v[0, 0].mean(dim=0))


@pytest.mark.parametrize("mode", ["inference", "no_grad"])
def test_worker_threads_share_the_callers_mode(mode, monkeypatch):
    """The tiles run on two worker threads (one intra-op thread each), in the caller's inference mode, and give
    the single-threaded result bit for bit; torch's thread count is restored."""
    q, k, v, _ = inputs((1, 4, 2, 23, 29), dtype=torch.float32)
    monkeypatch.setattr(cpu_blockwise, "workers", lambda: 1)
    want = cpu_blockwise.forward(q, k, v, None, BR, 0.3, 5.0)
    monkeypatch.setattr(cpu_blockwise, "workers", lambda: 2)
    threads = torch.get_num_threads()
    with torch.inference_mode() if mode == "inference" else torch.no_grad():
        got = torch.ops.attnopt.attention(q, k, v, None, 0.0, BR, 0.3, None, 5.0)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]) and torch.get_num_threads() == threads


def test_keys_stored_transposed_are_read_as_keys():
    """A key view with a strided head dim (keys stored [B, H, D, S], transposed) gives the contiguous keys' output
    and gradients: the CPU path once read such a view as if its rows were contiguous."""
    g = torch.Generator().manual_seed(0)
    q, v = torch.randn(2, 3, 9, 8, generator=g), torch.randn(2, 3, 11, 8, generator=g)
    k_stored = torch.randn(2, 3, 8, 11, generator=g)
    views = [k_stored.transpose(-1, -2).detach().requires_grad_(True),
             k_stored.transpose(-1, -2).contiguous().requires_grad_(True)]  # fmt: skip
    outs = []
    for k in views:
        out, _ = torch.ops.attnopt.attention(q, k, v, None, 0.0, 0, 0.35, None)
        out.sum().backward()
        outs.append(out)
    torch.testing.assert_close(outs[0], outs[1])
    torch.testing.assert_close(views[0].grad, views[1].grad)


@pytest.mark.parametrize("dv, runs", [(8, "sdpa-flash (CPU)"), (5, "blockwise")])
def test_out_has_the_layout_of_q_as_the_fake_says(dv, runs):
    """A model's q is a transposed [B, S, H, D] view: ``out`` comes back in that layout (free to transpose back,
    as SDPA's is), the fake promises the same strides, each gradient has its input's layout, and the values and
    gradients are the reference's."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 9, 3, 8, generator=g, dtype=torch.float64).transpose(1, 2)  # [B, H, S, D] view of BSHD
    k, v = torch.randn(2, 3, 11, 8, generator=g, dtype=torch.float64), torch.randn(2, 3, 11, dv, generator=g,
                                                                                   dtype=torch.float64)
    fwd, bwd, dout, decisions = run_op(q, k, v)
    assert decisions[0].describe().startswith(runs)
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        fake = torch.ops.attnopt.attention(*(mode.from_tensor(t) for t in (q, k, v)), None, 0.0, NONE, 0.3, None)
    assert fwd[0].stride() == fake[0].stride() and fwd[1].stride() == fake[1].stride()
    assert fwd[0].transpose(1, 2).is_contiguous() == (dv == 8)
    assert [g.stride() for g in bwd[:3]] == [torch.empty_like(x).stride() for x in (q, k, v)]  # each its input's
    check_against_reference(fwd, bwd, q, k, v, None, NONE, dout=dout)


def test_a_mask_with_one_row_repeated_reaches_sdpa_as_that_row():
    """BERT broadcasts its key-padding mask to [B, 1, Sq, Sk]: SDPA's kernel gets the [B, 1, 1, Sk] row (bool
    converted to 0 / -inf), a mask whose rows differ stays whole; results match the reference either way."""
    q, k, v, gen = inputs(SHAPES[0])
    pad = make_mask("padding", 2, 4, 9, 13, q.dtype, gen)
    repeated = pad.expand(2, 1, 9, 13).contiguous()
    bias = cpu._bias(cpu._mask4(repeated), q.dtype)
    assert bias.shape == (2, 1, 1, 13) and bias.dtype == q.dtype
    assert torch.equal(bias == 0, pad)
    assert cpu._bias(cpu._mask4(pad.expand(2, 1, 9, 13)), q.dtype).shape == (2, 1, 1, 13)  # an expanded view
    nan_rows = torch.zeros(1, 1, 9, 13, dtype=q.dtype).masked_fill(~pad[-1:], float("-inf"))
    nan_rows[..., 0] = float("nan")  # NaN never compares equal: the mask stays whole
    assert cpu._bias(nan_rows, q.dtype).shape == (1, 1, 9, 13)
    rows_differ = make_mask("bool", 2, 4, 9, 13, q.dtype, gen)
    assert cpu._bias(rows_differ, q.dtype).shape == rows_differ.shape
    additive = torch.zeros(1, 1, 9, 13, dtype=q.dtype).masked_fill(~pad[-1:], float("-inf"))  # the padded batch
    assert cpu._bias(additive, q.dtype).shape == (1, 1, 1, 13)
    # a padding mask of unpadded inputs hides nothing: SDPA runs without one (as the model's own call would)
    assert cpu._bias(torch.ones(2, 1, 1, 13, dtype=torch.bool), q.dtype) is None
    assert cpu._bias(torch.zeros(2, 1, 9, 13, dtype=q.dtype), q.dtype) is None
    for m in (repeated, rows_differ, torch.ones(2, 1, 1, 13, dtype=torch.bool)):
        fwd, bwd, dout, _ = run_op(q, k, v, m, TL)
        check_against_reference(fwd, bwd, q, k, v, m, TL, dout=dout)
