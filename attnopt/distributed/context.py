"""``context_parallel``: an optimized model run with its sequence sharded over a process group.

Inside the block, the given buffers (``input_ids``, ``position_ids``, labels, ...) hold this rank's shard
(head-tail load balanced by default; restored on exit, as PyTorch's own ``context_parallel`` does), and
every attnopt attention op of the rewritten graphs computes over the whole sequence: the ops consult
:mod:`attnopt.kernels.parallel`, where this module installs :class:`Router`. Backward passes must run
inside the block too (they exchange key gradients).

A site's mask is read on the local shard, as the model builds it: no mask (bidirectional), causal, or a
causal sliding window (recognized from the dense mask, as exact-sparse does); the same structure then holds
for the whole sequence. Anything else (padding, document masks, dropout) is refused by name.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Sequence

import torch
from torch import Tensor

from attnopt.codegen.spec import CAUSAL_NONE
from attnopt.distributed import linear, softmax
from attnopt.distributed.comm import TRAFFIC, Comm, acc, as_group
from attnopt.distributed.layout import Layout
from attnopt.distributed.softmax import Shards
from attnopt.kernels import parallel
from attnopt.kernels.sparse.structure import recognize
from attnopt.masks import SlidingWindow, lookup

_REFUSED_MASK = ("context parallelism runs attention sites whose mask is none, causal or a causal sliding window "
                 "(the same on every row of the batch, no key padding); this site's mask is {what}. Pad-free "
                 "sequences (no attention_mask) and one model-wide mask structure are what context_parallel shards")  # fmt: skip


def site_mask(attn_mask: Tensor | None, causal: int, q: Tensor, k: Tensor,
              causal_masks: int | str | None = None) -> SlidingWindow | None:  # fmt: skip
    """The site's mask on the whole sequence: None (every key), causal, or ``SlidingWindow(left, 0)``.

    A dense mask that reads as plain causal on the shard is ambiguous (a sliding window as wide as the shard
    looks the same): ``causal_masks`` says what it is (``"causal"``, or the window in keys); None refuses it.
    """
    if q.shape[2] != k.shape[2]:
        raise ValueError(f"context parallelism shards self-attention (as many queries as keys); this site has "
                         f"{q.shape[2]} queries and {k.shape[2]} keys")  # fmt: skip
    if attn_mask is None:
        return None if causal == CAUSAL_NONE else SlidingWindow(None, 0)
    found = recognize(attn_mask, causal, q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    if found is None:
        raise NotImplementedError(_REFUSED_MASK.format(what="not a recognized structure"))
    mask, kv_valid = found
    if kv_valid is not None:
        raise NotImplementedError(_REFUSED_MASK.format(what="key padding"))
    if mask.right == 0 and (mask.left is None or mask.left >= q.shape[2] - 1):
        return _causal_on_shard(causal_masks, q.shape[2])
    return _structured(mask)


def _causal_on_shard(causal_masks: int | str | None, local: int) -> SlidingWindow:
    if causal_masks == "causal":
        return SlidingWindow(None, 0)
    if isinstance(causal_masks, int) and not isinstance(causal_masks, bool) and causal_masks >= local:
        return SlidingWindow(causal_masks - 1, 0)
    raise NotImplementedError(
        f"a site's dense mask is causal on this rank's {local} positions: it may be causal or a sliding window "
        f"of {local} keys or more, which the shard cannot tell apart (got causal_masks={causal_masks!r}). Pass "
        "context_parallel(..., causal_masks='causal') or causal_masks=<window in keys> (Mistral's "
        f"config.sliding_window; a window must be at least {local}), or shard longer sequences")


def _structured(mask) -> SlidingWindow | None:
    if isinstance(mask, SlidingWindow) and mask.dilation == 1 and mask.left is None and mask.right is None:
        return None
    if isinstance(mask, SlidingWindow) and mask.dilation == 1 and mask.right == 0:
        return mask
    raise NotImplementedError(_REFUSED_MASK.format(what=repr(mask)))


def _no_dropout(dropout_p: float) -> None:
    if dropout_p > 0.0:
        raise NotImplementedError("context parallelism runs attention without dropout: call model.eval() or set "
                                  "the attention dropout to 0 (the dropout mask would differ from one process)")  # fmt: skip


class Router:
    """The handler :mod:`attnopt.kernels.parallel` calls: each op's sharded implementation."""

    def __init__(self, shards: Shards, causal_masks: int | str | None = None):
        self.shards = shards
        self.causal_masks = causal_masks

    def _mask(self, attn_mask, causal, q, k) -> SlidingWindow | None:
        return site_mask(attn_mask, causal, q, k, self.causal_masks)

    def __call__(self, op: str, args: tuple):
        before = TRAFFIC.sent_bytes
        result = getattr(self, op)(*args)
        TRAFFIC.calls.append((op, TRAFFIC.sent_bytes - before))
        return result

    def attention(self, q, k, v, attn_mask, dropout_p, causal, scale, seed, softcap):
        _no_dropout(dropout_p)
        return softmax.forward(self.shards, q, k, v, self._mask(attn_mask, causal, q, k), scale, softcap)

    def attention_backward(self, dout, q, k, v, out, lse, attn_mask, dropout_p, causal, scale, seed, mask_grad,
                           softcap):  # fmt: skip
        if mask_grad:
            raise NotImplementedError("context parallelism does not train an attention mask (its gradient)")
        mask = self._mask(attn_mask, causal, q, k)
        return (*softmax.backward(self.shards, dout, q, k, v, out, lse, mask, scale, softcap), q.new_empty(0))

    def sparse_attention_auto(self, q, k, v, attn_mask, causal, scale, softcap):
        out, lse = softmax.forward(self.shards, q, k, v, self._mask(attn_mask, causal, q, k), scale, softcap)
        return out, lse.to(acc(q))

    def sparse_attention_auto_backward(self, dout, q, k, v, out, lse, attn_mask, causal, scale, softcap):
        return softmax.backward(self.shards, dout, q, k, v, out, lse, self._mask(attn_mask, causal, q, k), scale,
                                softcap)  # fmt: skip

    def sparse_attention(self, q, k, v, attn_mask, kv_valid, mask, scale, softcap):
        return softmax.forward(self.shards, q, k, v, self._sparse_mask(attn_mask, kv_valid, mask), scale, softcap)

    def sparse_attention_backward(self, dout, q, k, v, out, lse, attn_mask, kv_valid, mask, scale, softcap):
        mask = self._sparse_mask(attn_mask, kv_valid, mask)
        return softmax.backward(self.shards, dout, q, k, v, out, lse, mask, scale, softcap)

    @staticmethod
    def _sparse_mask(attn_mask, kv_valid, mask: str) -> SlidingWindow | None:
        if attn_mask is not None or kv_valid is not None:
            raise NotImplementedError(_REFUSED_MASK.format(what="a dense mask or key padding beside its descriptor"))
        return _structured(lookup(mask))

    def linear_attention(self, *args):
        return linear.forward(self.shards, *args)

    def linear_attention_backward(self, *args):
        return linear.backward(self.shards, *args)


@contextmanager
def context_parallel(mesh=None, *, buffers: Sequence[Tensor] = (), buffer_seq_dims: Sequence[int] = (),
                     no_restore_buffers: Sequence[Tensor] = (), load_balance: bool = True,
                     causal_masks: int | str | None = None) -> Iterator[Layout]:  # fmt: skip
    """Runs attnopt's attention ops over a sequence sharded across ``mesh`` (a 1-D DeviceMesh, a process group,
    or None for the default group), like ``torch.distributed.tensor.experimental.context_parallel``.

    ``buffers`` (each with its sequence dimension in ``buffer_seq_dims``) are sharded in place on entry and
    restored on exit (except those in ``no_restore_buffers``). Pass the *global* ``position_ids`` among them
    (``torch.arange(S)`` expanded to the batch): rotary embeddings then see each token's true position. With
    ``load_balance`` (the default) rank r holds chunks r and 2W-1-r of 2W; the sequence length must divide by
    the chunk count. ``causal_masks``: what a dense mask that is causal on the shard means (``"causal"``, or a
    sliding window of that many keys); a window narrower than the shard reads itself. Yields the :class:`~attnopt.distributed.layout.Layout` (for :func:`unshard`).
    """
    if len(buffers) != len(buffer_seq_dims):
        raise ValueError(f"context_parallel: {len(buffers)} buffers but {len(buffer_seq_dims)} buffer_seq_dims; "
                         "give one sequence dimension per buffer")  # fmt: skip
    comm = Comm(as_group(mesh))
    layout = Layout(comm.world, load_balance)
    originals = [b.clone() for b in buffers]
    for b, dim in zip(buffers, buffer_seq_dims):
        local = layout.shard(b, dim, comm.rank).clone()
        b.resize_(local.shape)
        b.copy_(local)
    try:
        with parallel.installed(Router(Shards(comm, layout), causal_masks)):
            yield layout
    finally:
        keep = {id(b) for b in no_restore_buffers}
        for b, original in zip(buffers, originals):
            if id(b) not in keep:
                b.resize_(original.shape)
                b.copy_(original)


def shard(t: Tensor, dim: int, mesh=None, load_balance: bool = True) -> Tensor:
    """This rank's shard of the full tensor ``t`` along ``dim`` (a copy; the layout context_parallel uses)."""
    comm = Comm(as_group(mesh))
    return Layout(comm.world, load_balance).shard(t, dim, comm.rank).clone()


def unshard(t: Tensor, dim: int, mesh=None, load_balance: bool = True) -> Tensor:
    """The full tensor from every rank's shard ``t`` along ``dim`` (an all-gather; no gradient)."""
    comm = Comm(as_group(mesh))
    with torch.no_grad():
        return Layout(comm.world, load_balance).to_global(comm.all_gather(t.detach()), dim)
