"""The score expression: canonical text, its derivative, and the kernel specs that record it."""

import itertools

import pytest
import torch
from _score_mods import NAMES, collection

from attnopt.codegen.score_expr import Buffer, Node, ScoreExpr, parse
from attnopt.codegen.spec import KernelSpec, default_tiles
from attnopt.kernels.exact.render import render
from attnopt.kernels.exact.score_trace import evaluate, trace

MODS = collection()


def _inputs(shape=(2, 4, 5, 6), seed=0):
    g = torch.Generator().manual_seed(seed)
    score = (torch.randn(shape, generator=g, dtype=torch.float64) * 2).requires_grad_()
    idx = [torch.arange(n, dtype=torch.int32).view([-1 if i == d else 1 for i in range(4)]) for d, n in enumerate(shape)]
    return dict(score=score, b=idx[0], h=idx[1], q_idx=idx[2], kv_idx=idx[3])


@pytest.mark.parametrize("name", NAMES)
def test_text_round_trips(name):
    expr = trace(MODS[name][0]).expr
    assert parse(expr.text()) == expr
    assert parse(expr.gradient().text()) == expr.gradient()


@pytest.mark.parametrize("name", NAMES)
def test_evaluates_like_the_function(name):
    score_mod, _ = MODS[name]
    traced = trace(score_mod)
    x = _inputs()
    score = x["score"].detach().float()
    got = evaluate(traced.expr, dict(x, score=score), traced.buffers)
    torch.testing.assert_close(got, score_mod(score, x["b"], x["h"], x["q_idx"], x["kv_idx"]).expand(score.shape))


def _ops_expr() -> ScoreExpr:
    """One expression through every differentiable op (float64 evaluation checks the rules, not rounding)."""
    n = [
        Node("t0", "tanh", ("score",), "float32"), Node("t1", "sigmoid", ("t0",), "float32"),
        Node("t2", "mul", ("score", "t1"), "float32"), Node("t3", "exp2", ("t2",), "float32"),
        Node("t4", "div", ("t3", "t1"), "float32"), Node("t5", "log", ("t4",), "float32"),
        Node("t6", "abs", ("t5",), "float32"), Node("t7", "sqrt", ("t6",), "float32"),
        Node("t8", "gelu", ("score",), "float32"), Node("t9", "maximum", ("t7", "t8"), "float32"),
        Node("t10", "clamp", ("t9", -1.0, 2.5), "float32"), Node("t11", "erf", ("score",), "float32"),
        Node("t12", "sin", ("t11",), "float32"), Node("t13", "cos", ("t12",), "float32"),
        Node("t14", "pow", ("t13", 3.0), "float32"), Node("t15", "rsqrt", ("t3",), "float32"),
        Node("t16", "relu", ("score",), "float32"), Node("t17", "log2", ("t3",), "float32"),
        Node("t18", "gt", ("q_idx", "kv_idx"), "bool"), Node("t19", "where", ("t18", "t15", "t17"), "float32"),
        Node("t20", "minimum", ("t10", "t19"), "float32"), Node("t21", "sub", ("t20", "t14"), "float32"),
        Node("t22", "add", ("t21", "t16"), "float32"), Node("t23", "neg", ("t22",), "float32"),
        Node("t24", "exp", ("t23",), "float32"),
    ]  # fmt: skip
    return ScoreExpr((), tuple(n), "t24")


def test_derivative_rules_match_autograd():
    expr = _ops_expr()
    x = _inputs()
    derivative, (value,) = evaluate(expr.gradient(), x, [], extra=(expr.output,))
    (expected,) = torch.autograd.grad(value.sum(), x["score"])
    torch.testing.assert_close(derivative, expected)


def test_gradient_of_a_captured_element():
    """``gradient(wrt=load)``: how the output moves with the table entry a load reads."""
    table = torch.randn(4, 3, dtype=torch.float64)
    expr = ScoreExpr((Buffer("buf0", "float64", 2),), (
        Node("t0", "load", ("buf0", "h", 1), "float64"), Node("t1", "mul", ("score", "t0"), "float64"),
        Node("t2", "tanh", ("t1",), "float64")), "t2")
    x = _inputs()
    got = evaluate(expr.gradient(wrt="t0"), x, [table])
    score = x["score"].detach()
    t = table[:, 1].view(1, 4, 1, 1)
    torch.testing.assert_close(got, score * (1 - torch.tanh(score * t) ** 2))


def test_parse_refuses_foreign_text():
    with pytest.raises(ValueError):
        parse("t0 = add(score, 1.0): float32")  # no return
    with pytest.raises(ValueError):
        parse("t0 = atan(score): float32; return t0")


def _specs(**extra):
    for direction, causal in itertools.product(("fwd", "bwd_dq", "bwd_dkdv"), (0, 2)):
        yield KernelSpec(direction=direction, head_dim=24, head_dim_v=24, dtype="float32", causal=causal,
                         mask="none", **extra, **default_tiles(direction, "float32", 24, 24))


def test_spec_without_score_mod_keeps_its_json_and_source():
    """No score_mod: the spec's JSON (so its key, name and cached file) and its source do not mention it."""
    for spec in _specs():
        assert "score_mod" not in spec.to_json() and "score_mod" not in render(spec)
        assert KernelSpec.from_dict(spec.to_dict()) == spec


def test_score_mod_names_the_kernel():
    text = trace(MODS["alibi"][0]).expr.text()
    other = trace(MODS["softcap"][0]).expr.text()
    for plain, alibi, softcap in zip(_specs(), _specs(score_mod=text), _specs(score_mod=other)):
        assert len({plain.name, alibi.name, softcap.name}) == 3
        assert f"# score_mod: {text}" in render(alibi)
        assert KernelSpec.from_dict(alibi.to_dict()) == alibi


def test_spec_refuses_score_mod_with_softcap():
    text = trace(MODS["alibi"][0]).expr.text()
    with pytest.raises(ValueError, match="softcap"):
        next(_specs(score_mod=text, softcap=True))
