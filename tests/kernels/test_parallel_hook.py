"""attnopt.kernels.parallel: the hook through which context parallelism runs the attention ops."""

import pytest
import torch

from attnopt.codegen.spec import CAUSAL_NONE
from attnopt.kernels import parallel


def _qkv():
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(1, 2, 4, 8, generator=gen) for _ in range(3)]


def test_an_installed_handler_runs_the_op_and_may_call_it_locally():
    q, k, v = _qkv()
    want = torch.ops.attnopt.attention(q, k, v, None, 0.0, CAUSAL_NONE, 0.5, None)
    seen = []

    def handler(op, args):
        seen.append(op)
        assert parallel.active() is None  # suspended while it runs: the ops it calls run locally
        out, lse = torch.ops.attnopt.attention.default(*args)
        return 2 * out, lse

    with parallel.installed(handler):
        got = torch.ops.attnopt.attention(q, k, v, None, 0.0, CAUSAL_NONE, 0.5, None)
        assert parallel.active() is handler
    assert seen == ["attention"]
    assert torch.equal(got[0], 2 * want[0])
    assert parallel.active() is None
    assert torch.equal(torch.ops.attnopt.attention(q, k, v, None, 0.0, CAUSAL_NONE, 0.5, None)[0], want[0])


def test_handlers_do_not_nest():
    with parallel.installed(lambda op, args: None):
        with pytest.raises(RuntimeError, match="do not nest"):
            with parallel.installed(lambda op, args: None):
                pass


def test_a_backward_of_a_routed_forward_outside_the_block_raises():
    q, k, v = (t.requires_grad_() for t in _qkv())

    def handler(op, args):
        return getattr(torch.ops.attnopt, op).default(*args)

    with parallel.installed(handler):
        out, _ = torch.ops.attnopt.attention(q, k, v, None, 0.0, CAUSAL_NONE, 0.5, None)
    with pytest.raises(RuntimeError, match="outside that block"):
        out.sum().backward()


def test_a_backward_inside_the_block_and_a_local_one_run():
    q, k, v = (t.requires_grad_() for t in _qkv())
    seen = []

    def handler(op, args):
        seen.append(op)
        return getattr(torch.ops.attnopt, op).default(*args)

    with parallel.installed(handler):
        out, _ = torch.ops.attnopt.attention(q, k, v, None, 0.0, CAUSAL_NONE, 0.5, None)
        out.sum().backward()
    assert seen == ["attention", "attention_backward"]
    local, _ = torch.ops.attnopt.attention(q.detach().clone().requires_grad_(), k, v, None, 0.0, CAUSAL_NONE, 0.5, None)
    local.sum().backward()  # never routed: runs locally
