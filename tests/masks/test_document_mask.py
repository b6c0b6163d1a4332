"""masks.Document (packed sequences) and masks.TopLeft (top-left causal): their element tests against a dense
form built from the definition, their closed-form tile statuses (never FULL or EMPTY wrongly), their key spans,
and the generated Triton kernels (in Triton's CPU interpreter) running their predicates."""

import pytest
import torch

import attnopt  # noqa: F401  (registers the ops)
from attnopt import masks
from attnopt.kernels.sparse import reference, triton_impl
from attnopt.masks import EMPTY, FULL

DOCUMENTS = {
    "self": masks.Document((5, 0, 7, 3)),
    "self_causal": masks.Document((5, 0, 7, 3), causal=True),
    "cross_causal": masks.Document((4, 6, 1), (7, 2, 5), causal=True),
    "cross": masks.Document((4, 6, 1), (7, 2, 5)),
    "empty_kv_doc": masks.Document((3, 0, 5), (0, 4, 6), causal=True),
}


def _dense(lengths, kv_lengths, causal):
    """Query i of document d sees key j of d; causal: j - kv_end(d) <= i - end(d)."""
    sq, sk = sum(lengths), sum(kv_lengths)
    out = torch.zeros(sq, sk, dtype=torch.bool)
    q0 = k0 = 0
    for n, m in zip(lengths, kv_lengths):
        for i in range(n):
            for j in range(m):
                out[q0 + i, k0 + j] = not causal or j - m <= i - n
        q0, k0 = q0 + n, k0 + m
    return out


@pytest.mark.parametrize("name", sorted(DOCUMENTS))
def test_document_element_test_tiles_and_spans(name):
    mask = DOCUMENTS[name]
    want = _dense(mask.lengths, mask.keys, mask.causal)
    sq, sk = want.shape
    assert torch.equal(mask.dense(sq, sk)[0], want)
    for bm, bn in [(1, 1), (2, 3), (3, 2), (4, 4)]:
        nq, nk = -(-sq // bm), -(-sk // bn)
        qs = torch.arange(nq)[:, None] * bm
        ks = torch.arange(nk)[None, :] * bn
        status = mask.tile_status(qs, torch.clamp(qs + bm, max=sq), ks, torch.clamp(ks + bn, max=sk), sq, sk, 1)
        for a in range(nq):
            for b in range(nk):
                tile = want[a * bm:(a + 1) * bm, b * bn:(b + 1) * bn]
                assert status[a, b] != FULL or tile.all(), (a, b)
                assert status[a, b] != EMPTY or not tile.any(), (a, b)
        if bm == bn == 1:  # single elements: the status is exact
            assert torch.equal(status == FULL, want)
        lo, hi = mask.key_span(qs[:, 0], torch.clamp(qs[:, 0] + bm, max=sq), sq, sk)
        for a in range(nq):
            cols = want[a * bm:(a + 1) * bm].any(0).nonzero()
            assert not len(cols) or (lo[a] <= cols.min() and cols.max() < hi[a])


def test_document_checks_its_sizes_and_reads_cu_seqlens():
    mask = masks.Document.from_cu_seqlens(torch.tensor([0, 3, 10]), [0, 4, 6], causal=True)
    assert (mask.lengths, mask.kv_lengths, mask.causal) == ((3, 7), (4, 2), True)
    assert masks.lookup(mask.key()) == mask
    with pytest.raises(ValueError, match="10 queries and 6 keys.*Sq=12"):
        mask.check(12, 6, 1)
    with pytest.raises(ValueError, match="start at 0"):
        masks.Document.from_cu_seqlens([1, 4])
    with pytest.raises(ValueError, match="one of each per document"):
        masks.Document((1, 2), (3,))


@pytest.mark.parametrize("sq,sk", [(8, 13), (13, 8), (9, 9)])
def test_top_left_causal_is_k_at_most_q(sq, sk):
    mask = masks.causal("top-left")
    want = torch.ones(sq, sk, dtype=torch.bool).tril()
    assert torch.equal(mask.dense(sq, sk)[0], want)
    assert torch.equal(masks.causal().dense(sq, sk)[0], torch.ones(sq, sk, dtype=torch.bool).tril(sk - sq))
    assert masks.lookup(mask.key()) == mask and str(mask) == "causal (top-left)"
    with pytest.raises(ValueError, match="align"):
        masks.causal("top-right")


@pytest.fixture
def _kernel_cache(tmp_path, monkeypatch):
    """Generated kernels go to a temporary cache, not the user's."""
    monkeypatch.setenv("ATTNOPT_CACHE_DIR", str(tmp_path))


TRITON_MASKS = {
    "document_causal": (masks.Document((10, 17, 10), causal=True), 37, 37),
    "document_cross_causal": (masks.Document((10, 17, 10), (5, 20, 12), causal=True), 37, 37),
    "document_cross": (masks.Document((19, 26), (12, 7)), 45, 19),
    "document_empty_documents": (masks.Document((10, 0, 17, 0, 10), (5, 3, 20, 0, 9), causal=True), 37, 37),
    "top_left_window": (masks.TopLeft(masks.SlidingWindow(4, 3)), 19, 45),
}


@pytest.mark.parametrize("name", sorted(TRITON_MASKS))
def test_triton_kernels_run_the_predicates(name, _kernel_cache):
    mask, sq, sk = TRITON_MASKS[name]
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 4 if i == 0 else 2, n, 16, generator=g) for i, n in enumerate((sq, sk, sk)))
    out, lse = triton_impl.forward(q, k, v, mask, None, None, 0.3, 0.0, 16, 16)
    ref_out, ref_lse = reference.attention_forward(q, k, v, mask, None, None, 0.3)
    torch.testing.assert_close(out, ref_out, atol=2e-5, rtol=2e-5)
    dout = torch.randn(out.shape, generator=g)
    grads = triton_impl.backward(dout, q, k, v, out, lse, mask, None, None, 0.3, 0.0, 16, 16)
    for got, want in zip(grads, reference.attention_backward(dout, q, k, v, ref_out, ref_lse, mask, None, None, 0.3)):
        torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)
