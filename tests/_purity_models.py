"""Small modules that write through ``out=``, in-place methods on views, ``setitem`` and a mutating custom op,
with a result nobody reads: a pass that deletes them as dead code changes what the module computes.
``make(write, attention)`` is also the factory ``attnopt convert`` loads (``file.py:make``)."""

from __future__ import annotations

import torch
from torch import nn

B, S, D = 2, 6, 8


@torch.library.custom_op("attnopt_purity_test::double_into", mutates_args=("out",))
def double_into(out: torch.Tensor, x: torch.Tensor) -> None:
    """A custom op whose schema says it writes its first argument: ``(Tensor(a!) out, Tensor x) -> ()``."""
    out.copy_(x * 2)


@double_into.register_fake
def _(out: torch.Tensor, x: torch.Tensor) -> None:
    return None


def _cumsum_out(h):
    buf = h.new_zeros(h.numel() + 1)
    torch.cumsum(h.flatten(), 0, out=buf[1:])  # the graph/packed-sequence index idiom (offsets written into a buffer)
    return buf[:-1].view_as(h)


def _matmul_out(h):
    buf = h.new_empty(h.shape[0], h.shape[1], h.shape[1])
    torch.matmul(h, h.transpose(-2, -1), out=buf)
    return buf.sum(-1, keepdim=True)


def _add_out(h):
    buf = torch.zeros_like(h)
    torch.add(h, 1.0, out=buf)
    return buf


def _copy_view(h):
    buf = h.new_zeros(h.shape[0], h.shape[1] + 1, h.shape[2])
    buf[:, 1:].copy_(h)
    return buf[:, :-1]


def _setitem_mask(h):
    buf = torch.zeros_like(h)
    buf[h > 0] = 1.0
    return buf


def _index_put(h):
    buf = torch.zeros_like(h)
    buf.index_put_((torch.tensor([0, 1]),), h[:1].expand(2, -1, -1))
    return buf


def _custom_op(h):
    buf = torch.zeros_like(h)
    torch.ops.attnopt_purity_test.double_into(buf, h)
    return buf


WRITES = {"cumsum_out": _cumsum_out, "matmul_out": _matmul_out, "add_out": _add_out, "copy_view": _copy_view,
          "setitem_mask": _setitem_mask, "index_put": _index_put, "custom_op": _custom_op}  # fmt: skip


class Net(nn.Module):
    """``h`` (attention over a projection of x, or sin(x)) plus what ``write`` wrote into a fresh buffer."""

    def __init__(self, write: str, attention: bool):
        super().__init__()
        self.write, self.attention = write, attention
        self.proj = nn.Linear(D, 3 * D)

    def forward(self, x):  # x [B, S, D]
        if self.attention:
            q, k, v = self.proj(x).chunk(3, dim=-1)
            h = torch.softmax(q @ k.transpose(-2, -1) * D**-0.5, dim=-1) @ v
        else:
            h = self.proj(x)[..., :D].sin()
        return h + WRITES[self.write](h)


def make(write: str = "cumsum_out", attention: bool = True):
    torch.manual_seed(0)
    return Net(write, attention).eval(), (torch.randn(B, S, D),)
