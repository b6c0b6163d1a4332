"""The paged decode session of dynamic sites (attnopt.kernels.dynamic.session): the prompt through the prefill op,
each one-token step through the selected pages, growth of the caches, and the stateless run outside a session."""

import pytest
import torch

from attnopt import masks as M
from attnopt.codegen.spec import CAUSAL_BOTTOM_RIGHT
from attnopt.kernels import session as kernel_session
from attnopt.kernels.dynamic import decode
from attnopt.kernels.dynamic.session import PageSession, site_attention
from attnopt.kernels.exact import reference as exact

SCALE = 0.25


def _qkv(t, hq=6, hkv=2, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, hq, t, d, generator=g), torch.randn(2, hkv, t, d, generator=g), \
        torch.randn(2, hkv, t, d, generator=g)


def _exact(q, k, v):
    """Each query of ``q`` sees the keys up to its own position, the last query the last key (bottom-right)."""
    g = q.shape[1] // k.shape[1]
    return exact.attention_forward(q, k.repeat_interleave(g, 1), v.repeat_interleave(g, 1), None,
                                   causal=CAUSAL_BOTTOM_RIGHT, scale=SCALE)[0]  # fmt: skip


def _decode(mask, prompt, steps, q, k, v, session=None):
    """The outputs of one site fed ``prompt`` tokens at once, then ``steps`` tokens one by one, in ``session``."""
    session = session if session is not None else PageSession()
    key = mask.key()
    with kernel_session.active(session):
        outs = [site_attention(q[:, :, :prompt], k[:, :, :prompt], v[:, :, :prompt], None, 1, SCALE, key, "s")]
        for t in range(prompt, prompt + steps):
            outs.append(site_attention(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], None, 1, SCALE, key, "s"))
    return torch.cat(outs, 2), session


def test_every_page_kept_is_exact_attention_over_the_grown_cache_gqa_odd_sizes():
    q, k, v = _qkv(45)
    mask = M.Dynamic(block=8, top_k=64, decode_top_k=64, page=5)  # every block and page kept
    out, session = _decode(mask, 13, 32, q, k, v)
    torch.testing.assert_close(out, _exact(q, k, v), atol=1e-5, rtol=1e-5)
    cache = session.caches["s"]
    assert cache.length == 45 and cache.capacity >= 45 and session.calls["s"] == 33  # grew from the prompt's 13
    assert session.selected["s"] == (9, 9)
    torch.testing.assert_close(cache.k[:, :, :45], k)


def test_a_decode_step_attends_to_the_selected_pages_only():
    q, k, v = _qkv(70, seed=1)
    mask = M.Dynamic(block=8, top_k=64, decode_top_k=2, page=4, sink=1, local=1)  # sink/local: 2 pages each
    out, session = _decode(mask, 69, 1, q, k, v)
    cache = session.caches["s"]
    assert mask.decode_pages() == (2, 2, 2) and session.selected["s"] == (6, 18)
    pages = decode.select_pages(q[:, :, 69:], cache, 2, 2, 2)
    torch.testing.assert_close(out[:, :, 69:], decode.page_attention(q[:, :, 69:], cache, pages, SCALE))
    assert (out[:, :, 69:] - _exact(q, k, v)[:, :, 69:]).abs().max() > 1e-3  # a real selection: not the exact step


def test_several_new_tokens_continue_over_the_whole_cache_and_no_session_is_the_prefill_op():
    q, k, v = _qkv(40, seed=2)
    mask = M.Dynamic(block=8, top_k=64, decode_top_k=64, page=8)
    session = PageSession()
    with kernel_session.active(session):
        first = site_attention(q[:, :, :25], k[:, :, :25], v[:, :, :25], None, 1, SCALE, mask.key(), "s")
        rest = site_attention(q[:, :, 25:], k[:, :, 25:], v[:, :, 25:], None, 1, SCALE, mask.key(), "s")
        with kernel_session.suspended():  # how attnopt's compiler runs the site: the session is untouched
            alone = site_attention(q, k, v, None, 1, SCALE, mask.key(), "s")
    torch.testing.assert_close(torch.cat([first, rest], 2), _exact(q, k, v), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(alone, torch.ops.attnopt.dynamic_attention(q, k, v, None, 1, SCALE, mask.key())[0])
    assert session.caches["s"].length == 40 and session.calls["s"] == 2


def test_a_mask_without_decode_selection_is_refused_in_a_session():
    q, k, v = _qkv(8)
    refused = pytest.raises(ValueError, match="takes a Dynamic mask with decode_top_k")
    with kernel_session.active(PageSession()), refused:
        site_attention(q, k, v, None, 1, SCALE, M.Dynamic(block=8).key(), "s")


def test_reserve_grows_by_whole_pages_and_keeps_the_contents():
    k, v = _qkv(30, hq=2)[1:]
    cache = decode.PageCache(2, 2, 16, 16, 10, page=4)
    cache.append(k[:, :, :10], v[:, :, :10])
    cache.reserve(12)
    assert cache.capacity == 12  # 10 tokens round up to 3 pages of 4: room enough
    cache.reserve(13)
    assert cache.capacity == 24 and cache.k_min.shape[2] == 6  # doubled: 12 -> 24 tokens, 6 pages
    cache.reserve(30)
    cache.append(k[:, :, 10:], v[:, :, 10:])
    torch.testing.assert_close(cache.k[:, :, :30], k)
    torch.testing.assert_close(cache.k_max[:, :, 7], k[:, :, 28:30].amax(2))


def test_padded_keys_stay_out_of_the_summaries_the_selection_and_the_attention():
    q, k, v = _qkv(40, seed=3)
    valid = torch.ones(2, 40, dtype=torch.bool)
    valid[1, :19] = False  # row 1 left-padded: pages 0-3 of 4 tokens are padding only, page 4 holds 1 real key
    cache = decode.PageCache(2, 2, 16, 16, 40, page=4)
    cache.append(k[:, :, :30], v[:, :, :30], valid[:, :30])
    cache.append(k[:, :, 30:], v[:, :, 30:])  # later tokens: all real
    assert torch.equal(cache.valid[:, :40], valid)
    torch.testing.assert_close(cache.k_min[1, :, 4], k[1, :, 19])  # page 4's summary: its one real key
    assert bool((cache.k_max[1, :, :4] == float("-inf")).all())
    pages = decode.select_pages(q[:, :, 39:], cache, top_k=5, sink=0, recent=1)
    assert torch.equal(pages[1], torch.arange(4, 10).expand(2, 6))  # 6 of 10 pages: never one of padding only
    got = decode.page_attention(q[:, :, 39:], cache, decode.select_pages(q[:, :, 39:], cache, 10, 1, 1), SCALE)
    g = q.shape[1] // k.shape[1]
    want = exact.attention_forward(q[:, :, 39:], k.repeat_interleave(g, 1), v.repeat_interleave(g, 1),
                                   valid[:, None, None], scale=SCALE)[0]  # fmt: skip
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)  # every page kept: the padded keys hidden
    torch.testing.assert_close(decode.exact_attention(q[:, :, 39:], cache, SCALE), want, atol=1e-5, rtol=1e-5)
