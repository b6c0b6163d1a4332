"""The generated exact-attention backward kernels (bwd_pre, bwd_dkdv, bwd_dq) against the reference.

Kernels run in Triton's CPU interpreter; ``ATTNOPT_TEST_GPU=1`` runs them compiled on a CUDA GPU (see
``_exact_helpers``). Each check runs the kernel forward, then the kernel backward on the kernel's
``out`` and ``lse``, and compares every gradient with ``reference.attention_backward``.
"""

import pytest
import torch
from _exact_helpers import (
    DEVICE,
    alibi_bias,
    float16_case,
    gpu_only,
    ignore_exp2_overflow,
    kernel_cache,  # noqa: F401  (autouse fixture)
    masked_rows,
    padding_keep,
    qkv,
    rand,
    randn,
)

from attnopt.kernels.exact import ops
from attnopt.kernels.exact import reference, triton_impl
from attnopt.kernels.exact.reference import CAUSAL_BOTTOM_RIGHT, CAUSAL_NONE, CAUSAL_TOP_LEFT

FP32_TOL = dict(atol=2e-5, rtol=2e-5)
FP16_TOL = dict(atol=1e-2, rtol=1e-2)
pytestmark = ignore_exp2_overflow


def check(q, k, v, attn_mask=None, causal=CAUSAL_NONE, scale=None, tol=FP32_TOL, ref_mask=None, softcap=0.0,
          dropout_p=0.0, mask_grad=False, **features):
    """Kernel forward + backward vs the reference backward; returns the kernel's :class:`Grads`.

    ``ref_mask`` is the reference's equivalent of the features (default ``attn_mask``). With dropout the
    reference replays the kernel's keep-mask (materialized by ``dropout_mask``).
    """
    seed = features.pop("seed", None)
    grad_requests = {name: features.pop(name) for name in ("bias_grad", "rel_grad") if name in features}
    out, lse = triton_impl.forward(q, k, v, attn_mask, causal, scale, softcap=softcap, dropout_p=dropout_p,
                                   seed=seed, **features)
    dout = randn(*out.shape, seed=5).to(q.dtype)
    grads = triton_impl.backward(dout, q, k, v, out, lse, attn_mask, causal, scale, softcap=softcap,
                                 dropout_p=dropout_p, seed=seed, mask_grad=mask_grad, **features, **grad_requests)
    ref_mask = attn_mask if ref_mask is None else ref_mask
    if dropout_p > 0.0:
        keep = triton_impl.dropout_mask(q.shape[:3] + k.shape[2:3], dropout_p, seed, device=DEVICE)
        replay = pytest.MonkeyPatch()
        replay.setattr(reference, "dropout_keep", lambda shape, p, s, device: keep)
    else:
        replay = None
    try:
        ref = reference.attention_backward(dout, q, k, v, out, lse, ref_mask, dropout_p, causal, scale,
                                           torch.tensor(0), mask_grad, softcap)
    finally:
        if replay is not None:
            replay.undo()
    for name, got, want in zip(("dq", "dk", "dv"), grads[:3], ref[:3]):
        assert got.dtype == want.dtype and got.shape == want.shape, name
        assert not got.isnan().any(), name
        torch.testing.assert_close(got, want, **tol, msg=lambda m: f"{name}: {m}")
    if mask_grad:
        torch.testing.assert_close(grads.dmask, ref[3], **tol)
    return grads


def full_ds(q, k, v, ref_mask, causal):
    """The reference's score gradient dS [B, Hq, Sq, Sk] for an additive ``ref_mask`` (via its dmask)."""
    b, hq, sq, _ = q.shape
    full = ref_mask.expand(b, hq, sq, k.shape[2]).contiguous()
    out, lse = reference.attention_forward(q, k, v, full, causal=causal)
    dout = randn(*out.shape, seed=5).to(q.dtype)
    return reference.attention_backward(dout, q, k, v, out, lse, full, causal=causal, mask_grad=True)[3]


@pytest.mark.parametrize("sq, sk", [(1, 1), (7, 33), (33, 7), (45, 37)])
@pytest.mark.parametrize("causal", [CAUSAL_NONE, CAUSAL_TOP_LEFT, CAUSAL_BOTTOM_RIGHT])
def test_sequence_lengths(sq, sk, causal):
    check(*qkv(sq=sq, sk=sk), causal=causal)


@pytest.mark.parametrize("sq, sk", [(130, 70), (70, 130)])
@pytest.mark.parametrize("causal", [CAUSAL_NONE, CAUSAL_TOP_LEFT, CAUSAL_BOTTOM_RIGHT])
def test_several_tiles(sq, sk, causal):
    """Several query and key tiles: diagonal, full, partial and skipped tiles in both kernels."""
    check(*qkv(b=1, hq=1, sq=sq, sk=sk), causal=causal)


@pytest.mark.parametrize("offset", [-65, -64, -33, -32, -31, -1, 1, 31, 32, 33, 63, 64])
def test_causal_diagonal_near_tile_edges(offset):
    """Bottom-right diagonals beside the 32-query and 64-key tile edges of bwd_dkdv (and 64x64 of bwd_dq)."""
    check(*qkv(b=1, hq=1, sq=66, sk=66 + offset), causal=CAUSAL_BOTTOM_RIGHT)


@pytest.mark.parametrize("d, dv", [(16, 16), (3, 5), (24, 72), (72, 40), (128, 128), (200, 256)])
def test_head_dims(d, dv):
    check(*qkv(b=1, sq=9, sk=33, d=d, dv=dv), causal=CAUSAL_BOTTOM_RIGHT)


@pytest.mark.parametrize("kind", ["bool", "additive"])
@pytest.mark.parametrize("shape", [(2, 1, 7, 33), (1, 2, 7, 33), (7, 33), (33,)])
@pytest.mark.parametrize("causal", [CAUSAL_NONE, CAUSAL_BOTTOM_RIGHT])
def test_masks(kind, shape, causal):
    """Broadcast masks; additive ones with their gradient reduced over the broadcast dims."""
    keep = rand(*shape) > 0.3
    mask = keep if kind == "bool" else randn(*shape).masked_fill(~keep, float("-inf"))
    grads = check(*qkv(sq=7, sk=33), mask, causal=causal, mask_grad=kind == "additive")
    if kind == "additive":
        assert grads.dmask.shape == mask.shape and grads.dmask.dtype == mask.dtype


@pytest.mark.parametrize("hq, hkv", [(4, 2), (4, 1), (6, 3)])
@pytest.mark.parametrize("causal", [CAUSAL_NONE, CAUSAL_BOTTOM_RIGHT])
def test_gqa(hq, hkv, causal):
    """dK and dV sum over the query heads of each group inside one bwd_dkdv program."""
    mask = rand(1, hq, 9, 70, seed=2) > 0.2
    check(*qkv(hq=hq, hkv=hkv, sq=9, sk=70, d=40, dv=24), mask, causal=causal)


def test_non_contiguous_inputs():
    """[B, S, H, D] storage seen as [B, H, S, D]; gradients keep the inputs' layout."""
    q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in qkv(hq=4, hkv=2, sq=9, sk=20, d=24))
    mask = randn(2, 4, 20, 9).transpose(-1, -2)
    grads = check(q, k, v, mask, causal=CAUSAL_TOP_LEFT, mask_grad=True)
    assert grads.dq.stride() == q.stride() and grads.dk.stride() == k.stride()


@pytest.mark.parametrize("kind", ["bool", "additive"])
def test_fully_masked_rows(kind):
    mask, _ = masked_rows(kind)
    grads = check(*qkv(sq=9, sk=17), mask, mask_grad=kind == "additive")
    assert (grads.dq[0, 1, 3] == 0).all() and (grads.dq[1, :, 8] == 0).all()


@pytest.mark.parametrize("fill, tol", [
    (torch.finfo(torch.float32).min, FP32_TOL),  # Hugging Face's fill: saturates at -FLT_MAX in base 2
    (-1e9, FP32_TOL),
    (-1e4, dict(atol=1e-3, rtol=1e-3)),  # scores near -1e4 carry an fp32 rounding of 1e-3 in the reference too
])
@pytest.mark.filterwarnings("ignore:overflow encountered in multiply:RuntimeWarning")  # fill * log2(e), saturated
def test_rows_fully_masked_with_a_finite_fill_average_v(fill, tol):
    """A finite fill over a whole row averages V (the reference), forward and backward, next to -inf rows."""
    q, k, v = qkv(sq=9, sk=17)
    mask, keep = masked_rows("additive", fill)
    mask[1, 0, 2] = float("-inf")  # a row fully masked with -inf: zeros, lse = -inf
    keep[1, 0, 2] = False
    out, lse = triton_impl.forward(q, k, v, mask)
    ref_out, ref_lse = reference.attention_forward(q, k, v, mask)
    torch.testing.assert_close(out, ref_out, **tol)
    assert (out[1, 0, 2] == 0).all() and lse[1, 0, 2] == float("-inf")
    live = keep.any(-1)  # [B, H, Sq] rows with a visible key
    torch.testing.assert_close(lse[live], ref_lse[live], **tol)
    if fill < -1e8:  # every score of the row saturated: the mean of V, lse = -FLT_MAX (fp32 cannot hold max + log Σ)
        torch.testing.assert_close(out[0, 1, 3], v[0, 1].mean(0), **tol)
        assert lse[0, 1, 3] == torch.finfo(torch.float32).min
    check(q, k, v, mask, tol=tol, mask_grad=True)


def test_causal_rows_without_keys():
    """Bottom-right with Sq > Sk: the first Sq - Sk queries see no key and get zero gradients."""
    grads = check(*qkv(sq=33, sk=7), causal=CAUSAL_BOTTOM_RIGHT)
    assert (grads.dq[:, :, :26] == 0).all()


def test_keys_nobody_sees():
    """Top-left with Sk > Sq: keys after the last query get zero dK and dV (whole key tiles are skipped)."""
    grads = check(*qkv(b=1, sq=7, sk=140), causal=CAUSAL_TOP_LEFT)
    assert (grads.dk[:, :, 7:] == 0).all() and (grads.dv[:, :, 7:] == 0).all()


def test_empty():
    q, k, v = qkv(sq=5, sk=0)
    out, lse = triton_impl.forward(q, k, v)
    grads = triton_impl.backward(torch.randn_like(out), q, k, v, out, lse)
    assert (grads.dq == 0).all() and grads.dk.shape == k.shape
    q, k, v = qkv(sq=0, sk=5)
    out, lse = triton_impl.forward(q, k, v)
    grads = triton_impl.backward(torch.randn_like(out), q, k, v, out, lse)
    assert (grads.dk == 0).all() and (grads.dv == 0).all() and grads.dq.shape == q.shape


@pytest.mark.parametrize("causal, mask_kind", [(CAUSAL_NONE, None), (CAUSAL_TOP_LEFT, "bool"),
                                               (CAUSAL_BOTTOM_RIGHT, "additive")])
def test_float16(causal, mask_kind):
    q, k, v, mask = float16_case(mask_kind)
    check(q, k, v, mask, causal=causal, tol=FP16_TOL, mask_grad=mask_kind == "additive")


@gpu_only
@pytest.mark.gpu
@pytest.mark.parametrize("causal", [CAUSAL_NONE, CAUSAL_BOTTOM_RIGHT])
def test_bfloat16(causal):
    check(*qkv(hq=4, hkv=2, sq=130, sk=77, d=64, dtype=torch.bfloat16), causal=causal, tol=dict(atol=5e-2, rtol=5e-2))


# ---------------------------------------------------------------------------------------------------------------
# Score features


@pytest.mark.parametrize("causal", [CAUSAL_NONE, CAUSAL_TOP_LEFT, CAUSAL_BOTTOM_RIGHT])
@pytest.mark.parametrize("cap", [0.5, 30.0])
def test_softcap(causal, cap):
    check(*qkv(hq=4, hkv=2, sq=19, sk=70, d=24), causal=causal, scale=2.0, softcap=cap)


def test_softcap_with_mask_grad_fp16():
    """dmask is the gradient before the softcap's tanh: the mask is added after it."""
    mask = randn(1, 2, 19, 40).half()
    check(*qkv(sq=19, sk=40, d=24, dtype=torch.float16), mask, CAUSAL_BOTTOM_RIGHT, softcap=5.0, tol=FP16_TOL,
          mask_grad=True)


@pytest.mark.parametrize("causal", [CAUSAL_NONE, CAUSAL_BOTTOM_RIGHT])
def test_alibi(causal):
    slopes = rand(4)
    check(*qkv(hq=4, hkv=2, sq=19, sk=70), causal=causal, alibi_slopes=slopes, ref_mask=alibi_bias(slopes, 19, 70))


@pytest.mark.parametrize("shape", [(1, 4, 19, 40), (2, 1, 1, 40), (19, 40)])
def test_bias_tensor_and_its_gradient(shape):
    q, k, v = qkv(hq=4, hkv=2, sq=19, sk=40)
    bias, keep = randn(*shape), rand(2, 1, 19, 40) > 0.2
    ref_mask = bias.masked_fill(~keep, float("-inf"))
    grads = check(q, k, v, keep, CAUSAL_TOP_LEFT, bias=bias, bias_grad=True, ref_mask=ref_mask)
    ds = full_ds(q, k, v, ref_mask, CAUSAL_TOP_LEFT)
    assert grads.dbias.shape == bias.shape
    torch.testing.assert_close(grads.dbias, triton_impl._sum_to(ds, shape), **FP32_TOL)


def test_relative_position_bias_and_table_gradient():
    sq, sk, buckets_n = 19, 40, 8
    q, k, v = qkv(hq=4, sq=sq, sk=sk)
    table = randn(buckets_n, 4)
    buckets = triton_impl.relative_buckets(sq, sk, lambda rel: rel.clamp(-3, 4) + 3, device=DEVICE)
    rel = torch.arange(sk, device=DEVICE)[None, :] - torch.arange(sq, device=DEVICE)[:, None] + sq - 1
    leaf = table.clone().requires_grad_()
    bias = leaf[buckets.long()[rel]].permute(2, 0, 1)[None]  # [1, Hq, Sq, Sk]
    grads = check(q, k, v, None, CAUSAL_BOTTOM_RIGHT, rel_table=table, rel_buckets=buckets, rel_grad=True,
                  ref_mask=bias.detach())
    bias.backward(full_ds(q, k, v, bias.detach(), CAUSAL_BOTTOM_RIGHT).sum(0, keepdim=True))
    torch.testing.assert_close(grads.drel_table, leaf.grad, **FP32_TOL)


@pytest.mark.parametrize("causal", [CAUSAL_NONE, CAUSAL_BOTTOM_RIGHT])
def test_key_padding_lengths(causal):
    """Padded keys get zero dK and dV; a row with every key padded gets zero dQ."""
    q, k, v = qkv(b=4, hq=2, sq=19, sk=140)
    kv_lens = torch.tensor([140, 70, 1, 0], device=DEVICE)
    grads = check(q, k, v, None, causal, kv_lens=kv_lens, ref_mask=padding_keep(kv_lens, 140))
    assert (grads.dk[1, :, 70:] == 0).all() and (grads.dv[2, :, 1:] == 0).all() and (grads.dq[3] == 0).all()


@pytest.mark.parametrize("causal", [CAUSAL_NONE, CAUSAL_BOTTOM_RIGHT])
def test_dropout(causal):
    """Forward and backward draw the same Philox keep-mask: the reference replaying it agrees."""
    check(*qkv(hq=4, hkv=2, sq=19, sk=70, d=24), rand(19, 70) > 0.2, causal, dropout_p=0.3, seed=1234)


def test_dropout_with_softcap_and_additive_mask_grad():
    mask = randn(2, 1, 19, 40)
    check(*qkv(sq=19, sk=40, d=24), mask, CAUSAL_TOP_LEFT, dropout_p=0.4, seed=2**40 + 1, softcap=4.0, mask_grad=True)


def test_all_features_together():
    """GQA, bottom-right causal, bool mask, ALiBi, key padding, softcap and dropout; odd sizes and dims."""
    q, k, v = qkv(b=2, hq=4, hkv=2, sq=21, sk=75, d=20, dv=12)
    keep_mask = rand(2, 1, 21, 75) > 0.1
    slopes, kv_lens = rand(4), torch.tensor([75, 30], device=DEVICE)
    ref_mask = alibi_bias(slopes, 21, 75).masked_fill(~(keep_mask & padding_keep(kv_lens, 75)), float("-inf"))
    check(q, k, v, keep_mask, CAUSAL_BOTTOM_RIGHT, softcap=3.0, dropout_p=0.2, seed=5, alibi_slopes=slopes,
          kv_lens=kv_lens, ref_mask=ref_mask)


# ---------------------------------------------------------------------------------------------------------------
# The op's CUDA registrations, run on CPU tensors in the interpreter


def test_op_cuda_path_routes_to_the_kernels():
    """``attnopt::attention`` and ``attnopt::attention_backward``'s CUDA implementations are the kernels."""
    cuda_fwd = ops.attention_fwd._backend_fns["cuda"]  # torch.library's table of registered device kernels
    cuda_bwd = ops.attention_bwd._backend_fns["cuda"]
    q, k, v = qkv(hq=4, hkv=2, sq=9, sk=20, d=24)
    mask = randn(1, 4, 9, 20)
    out, lse = cuda_fwd(q, k, v, mask, 0.0, CAUSAL_BOTTOM_RIGHT, 0.3, None, 2.0)
    want_out, want_lse = triton_impl.forward(q, k, v, mask, CAUSAL_BOTTOM_RIGHT, 0.3, softcap=2.0)
    torch.testing.assert_close(out, want_out, rtol=0, atol=0)
    dout = randn(*out.shape, seed=4)
    dq, dk, dv, dmask = cuda_bwd(dout, q, k, v, out, lse, mask, 0.0, CAUSAL_BOTTOM_RIGHT, 0.3, None, True, 2.0)
    ref = reference.attention_backward(dout, q, k, v, out, lse, mask, 0.0, CAUSAL_BOTTOM_RIGHT, 0.3, None, True, 2.0)
    for got, want in zip((dq, dk, dv, dmask), ref):
        torch.testing.assert_close(got, want, **FP32_TOL)
    _, _, _, none = cuda_bwd(dout, q, k, v, out, lse, None, 0.0, CAUSAL_NONE, 0.3, None, False, 0.0)
    assert none.numel() == 0


def test_op_cuda_path_dropout_is_self_consistent():
    cuda_fwd, cuda_bwd = ops.attention_fwd._backend_fns["cuda"], ops.attention_bwd._backend_fns["cuda"]
    q, k, v = qkv(sq=9, sk=20)
    seed = torch.tensor(77)
    out, lse = cuda_fwd(q, k, v, None, 0.25, CAUSAL_NONE, 0.25, seed, 0.0)
    torch.testing.assert_close(cuda_fwd(q, k, v, None, 0.25, CAUSAL_NONE, 0.25, seed, 0.0)[0], out, rtol=0, atol=0)
    dout = randn(*out.shape, seed=4)
    got = cuda_bwd(dout, q, k, v, out, lse, None, 0.25, CAUSAL_NONE, 0.25, seed, False, 0.0)
    want = triton_impl.backward(dout, q, k, v, out, lse, None, CAUSAL_NONE, 0.25, dropout_p=0.25, seed=77)
    for a, b in zip(got[:3], want[:3]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(mask_grad=True), "mask_grad needs an additive"),
        (dict(bias_grad=True), "bias_grad needs a bias tensor"),
        (dict(rel_grad=True), "rel_grad needs rel_table"),
    ],
)
def test_rejects_bad_gradient_requests(kwargs, match):
    q, k, v = qkv()
    out, lse = triton_impl.forward(q, k, v)
    with pytest.raises(ValueError, match=match):
        triton_impl.backward(out, q, k, v, out, lse, None, **kwargs)


def test_rejects_bad_shapes():
    q, k, v = qkv()
    out, lse = triton_impl.forward(q, k, v)
    with pytest.raises(ValueError, match="dout .* and out .* must be"):
        triton_impl.backward(out[:, :1], q, k, v, out, lse)
    with pytest.raises(ValueError, match="lse must be"):
        triton_impl.backward(out, q, k, v, out, lse[..., :3])
