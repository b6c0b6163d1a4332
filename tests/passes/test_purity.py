"""Writes through ``out=``, in-place methods on views, ``setitem`` and mutating custom ops survive the
passes (purity is read from the op's schema), through optimize, the compile backend and convert."""

import operator

import pytest
import torch
import torch.nn.functional as F
from torch.fx import Graph

import attnopt
from _purity_models import WRITES, make
from attnopt.backend import Backend
from attnopt.convert import convert
from attnopt.passes import TOLERANCE
from attnopt.passes.purity import is_impure
from conftest import rel_err


def _node(target, args=(), kwargs=None, op="call_function"):
    g = Graph()
    x = g.placeholder("x")
    args = tuple(x if a is None else a for a in args) or (x,)
    return g.create_node(op, target, args, kwargs or {})


@pytest.mark.parametrize("target, args, kwargs, op, impure", [
    (torch.cumsum, (None, 0), {}, "call_function", False),
    (torch.cumsum, (None, 0), {"out": None}, "call_function", True),  # aten::cumsum.out writes `out`
    (torch.add, (None, 1.0), {}, "call_function", False),
    (torch.matmul, (None, None), {"out": None}, "call_function", True),
    (torch.ops.aten.add_.Tensor, (None, None), {}, "call_function", True),  # Tensor(a!) self
    (torch.ops.aten.index_put_, (None, (None,), None), {}, "call_function", True),  # a packet: resolved overloads
    (torch.ops.aten.index_put, (None, (None,), None), {}, "call_function", False),
    (F.relu, (None,), {"inplace": True}, "call_function", True),
    (F.relu, (None, True), {}, "call_function", True),  # the inplace flag given by position
    (F.softmax, (None, -1), {}, "call_function", False),
    (operator.setitem, (None, 0, 1.0), {}, "call_function", True),
    (operator.iadd, (None, 1.0), {}, "call_function", True),
    (operator.getitem, (None, 0), {}, "call_function", False),
    (print, (None,), {}, "call_function", True),  # no schema to read: unknown, so impure
    ("copy_", (None, None), {}, "call_method", True),
    ("__setitem__", (None, 0, 1.0), {}, "call_method", True),
    ("__iadd__", (None, 1.0), {}, "call_method", True),
    ("__invert__", (None,), {}, "call_method", False),
    ("transpose", (None, 0, 1), {}, "call_method", False),
    ("tolist", (None,), {}, "call_method", True),
])  # fmt: skip
def test_is_impure_reads_the_schema(target, args, kwargs, op, impure):
    assert is_impure(_node(target, args, kwargs, op)) is impure


def test_mutating_custom_op_is_impure():
    assert is_impure(_node(torch.ops.attnopt_purity_test.double_into, (None, None)))
    assert is_impure(_node(torch.ops.attnopt_purity_test.double_into.default, (None, None)))


def _same(got, want, rewritten: bool):
    """Bit for bit where nothing was rewritten; within the float32 tolerance where a site was."""
    if rewritten:
        assert rel_err(got, want) <= TOLERANCE[torch.float32]
    else:
        assert torch.equal(got, want)


CASES = [(w, a) for w in WRITES for a in (False, True)]


@pytest.mark.parametrize("write, attention", CASES)
def test_writes_survive_optimize_and_backend(write, attention):
    model, args = make(write, attention)
    with torch.no_grad():
        want = model(*args)
        optimized = attnopt.optimize(model, "exact", args)
        _same(optimized(*args), want, attention)
        assert [s.decision for s in optimized.attnopt_report.sites] == (["exact"] if attention else [])
        torch._dynamo.reset()
        compiled = torch.compile(model, backend=Backend("exact", then="eager"))
        _same(compiled(*args), want, attention)


def test_writes_survive_the_registered_backend():
    model, args = make("cumsum_out", True)
    with torch.no_grad():
        want = model(*args)
        _same(torch.compile(model, backend="attnopt")(*args), want, True)


@pytest.mark.parametrize("write, attention", [("cumsum_out", True), ("custom_op", False), ("setitem_mask", True)])
def test_writes_survive_convert(tmp_path, write, attention):
    factory = tmp_path / "factory.py"
    body = f"import _purity_models\n\ndef make():\n    return _purity_models.make({write!r}, {attention})\n"
    factory.write_text(body)
    manifest = convert(f"{factory}:make", "exact", tmp_path / "out")
    assert [s["decision"] for s in manifest["sites"]] == (["exact"] if attention else [])
    loaded = attnopt.load(tmp_path / "out")
    model, args = make(write, attention)
    with torch.no_grad():
        _same(loaded(*args), model(*args), attention)


class ScalesItsInput(torch.nn.Module):
    def forward(self, x, mask):
        x.mul_(2.0)  # writes into the caller's tensor: once per call, whatever validation runs
        return F.scaled_dot_product_attention(x, x, x, attn_mask=mask)


# bare linear also reads each masked site's mask in a run of the graph before rewriting
@pytest.mark.parametrize("policy", ["exact", "linear"])
def test_validation_runs_do_not_write_into_the_callers_inputs(policy):
    x = torch.randn(2, 5, 8)
    mask = torch.ones(5, 5, dtype=torch.bool).tril()
    want = x * 2.0
    with torch.no_grad():
        torch.compile(ScalesItsInput(), backend=Backend(policy, then="eager"))(x, mask)
    assert torch.equal(x, want)
