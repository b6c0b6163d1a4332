"""Generation through a dynamic site's decode selection: each site keeps a paged KV cache and attends, per decode
step, to the pages Quest's bound ranks highest.

A site rewritten by ``attnopt.Sparse(Dynamic(..., decode_top_k=K))`` calls :func:`site_attention`. Outside a
session it is one ``torch.ops.attnopt.dynamic_attention`` call (the prefill path). Inside a
:class:`PageSession` every site keeps its keys and values in a :class:`~attnopt.kernels.dynamic.decode.PageCache`
keyed by the site's name (its module path):

    prompt (first call):  out = dynamic_attention(q, k, v, site mask)          # the prefill path, as without a session
                          cache = PageCache(...); cache.append(k, v, real)      # real: the site mask's key padding
    one new token:        cache.append(k, v)                                   # O(T) writes, no concatenation
                          pages = select_pages(q, cache, K, sink, recent)      # [B, Hkv, n] from the page summaries
                          out = page_attention(q, cache, pages)                # exact on those pages' tokens
    several new tokens:   cache.append(k, v); dynamic_attention(q, cache, causal bottom-right)

So a decoder generates by feeding the prompt once and then each new token alone, with no KV cache of the
model's own; with every page kept (K at least the cache's pages) a step is exact attention over the cache.
:func:`attnopt.generation.generate` runs transformers' ``generate`` through such a session. A left-padded
batch works: the prompt's padded keys (the site mask's key padding) stay out of the pages' summaries and of
every later step.
"""

from __future__ import annotations

import torch

from attnopt.codegen.spec import CAUSAL_BOTTOM_RIGHT
from attnopt.kernels.dynamic.decode import PageCache, page_attention, select_pages
from attnopt.kernels.dynamic.ops import dynamic_attention, site_mask
from attnopt.kernels.session import DecodeSession, current
from attnopt.masks import Dynamic, lookup


class PageSession(DecodeSession):
    """The paged KV caches of the dynamic sites of one batch of sequences, the tokens they hold, how often each site
    ran, and per site the pages its last decode step attended to (``selected[site] = (attended, total)``, pages per
    key/value head). (:class:`attnopt.generation.PagedCache` is one that transformers' ``generate`` takes.)"""

    sites_are = "dynamic sites"
    carrier = "the paged KV cache"
    fix = ("at this input shape they were kept exact or rolled back (see attnopt.report(model)); rewrite them with "
           "attnopt.Sparse(attnopt.masks.Dynamic(..., decode_top_k=K))")  # fmt: skip

    def __init__(self) -> None:
        super().__init__()
        self.caches: dict[str, PageCache] = {}
        self.selected: dict[str, tuple[int, int]] = {}


def _spec(mask: str) -> Dynamic:
    spec = lookup(mask)
    if not isinstance(spec, Dynamic) or spec.decode_top_k is None:
        raise ValueError(f"a decoding dynamic site takes a Dynamic mask with decode_top_k; got {spec}")
    return spec


def site_attention(q, k, v, attn_mask, causal: int, scale: float, mask: str, key: str) -> torch.Tensor:
    """The output [B, Hq, Sq, Dv] of one dynamic site (``mask``: its Dynamic's key, ``key``: the site's name); paged
    inside a :class:`PageSession` (see the module docstring)."""
    session = current(PageSession)
    if session is None:
        return dynamic_attention(q, k, v, attn_mask, causal, scale, mask)[0]
    spec = _spec(mask)
    cache = session.caches.get(key)
    if cache is None:  # the prompt: the prefill path, then its keys and values are the cache
        out = dynamic_attention(q, k, v, attn_mask, causal, scale, mask)[0]
        b, hkv, t, d = k.shape
        cache = session.caches[key] = PageCache(b, hkv, d, v.shape[-1], t, spec.page, k.dtype, k.device)
        cache.append(k, v, site_mask(attn_mask, causal, q, k)[1])  # padded keys (a left-padded batch) stay out
    else:
        cache.reserve(cache.length + k.shape[2])
        cache.append(k, v)
        if q.shape[2] == 1:
            top_k, sink, recent = spec.decode_pages()
            pages = select_pages(q, cache, top_k, sink, recent)  # [B, Hkv, n]
            session.selected[key] = (pages.shape[-1], cache.pages)
            out = page_attention(q, cache, pages, scale)
        else:  # several new tokens: the prefill path over the whole cache, each query seeing the keys up to its own
            keys, values = (t[:, :, :cache.length].contiguous() for t in (cache.k, cache.v))
            padding = None if cache.valid is None else cache.valid[:, None, None, :cache.length]  # [B, 1, 1, L]
            out = dynamic_attention(q, keys, values, padding, CAUSAL_BOTTOM_RIGHT, scale, mask)[0]
    session.calls[key] += 1
    return out
