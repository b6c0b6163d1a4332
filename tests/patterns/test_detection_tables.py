"""Detection as tables: a new spelling of an op is one row and one small function; matches are built once;
every matcher returns a match or raises one Miss type."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

import attnopt
from attnopt import patterns
from attnopt.patterns.canonical import (DROPOUT, MATMUL, SPELLINGS, Op, Spelling, register_spelling,
                                        unregister_spelling)  # fmt: skip
from attnopt.patterns.match import Miss
from attnopt.patterns.scores import PRODUCTS, SCORE_STEPS, ScoreStep

from conftest import rel_err

pytestmark = pytest.mark.usefixtures("one_thread")


class LinalgScores(nn.Module):
    """Scores spelt ``torch.linalg.matmul``, a spelling the built-in table does not have."""

    def forward(self, q, k, v):
        return torch.softmax(torch.linalg.matmul(q, k.transpose(-1, -2)) * 0.25, dim=-1) @ v


def _qkv():
    g = torch.Generator().manual_seed(0)
    return tuple(torch.randn(2, 4, 8, 16, generator=g) for _ in range(3))


def _linalg_matmul(node, method, fn) -> Op:
    """The one small function of the new row: ``torch.linalg.matmul(a, b)`` is a MATMUL of (a, b)."""
    return Op(MATMUL, (node.args[0], node.args[1]))


LINALG_MATMUL = Spelling(_linalg_matmul, fns=frozenset({torch.linalg.matmul}))


@pytest.fixture
def linalg_spelling():
    register_spelling(LINALG_MATMUL)
    yield LINALG_MATMUL
    unregister_spelling(LINALG_MATMUL)


def test_a_new_spelling_is_one_row_and_one_function(linalg_spelling):
    q, k, v = _qkv()
    rep = attnopt.inspect(LinalgScores(), (q, k, v))
    assert not rep.misses
    (site,) = rep.sites
    assert site.kind == "manual" and site.scale == pytest.approx(0.25) and site.heads == (4, 4)
    opt = attnopt.optimize(LinalgScores(), "exact", (q, k, v))
    assert attnopt.report(opt).sites[0].decision == "exact"
    assert rel_err(opt(q, k, v), LinalgScores()(q, k, v)) < 1e-5


def test_without_the_row_the_spelling_is_a_miss():
    """Runs after the test above: its fixture's removal restores the built-in table's behaviour."""
    assert LINALG_MATMUL not in SPELLINGS
    q, k, v = _qkv()
    rep = attnopt.inspect(LinalgScores(), (q, k, v))
    assert not rep.sites
    (miss,) = rep.misses
    assert "scores come from linalg_matmul" in miss.reason


def test_a_registered_row_does_not_take_a_built_in_name():
    """Built-in rows come first: a row spelling ``matmul`` again does not change how matmul reads."""
    taken = Spelling(lambda node, method, fn: None, methods=frozenset({"matmul"}), fns=frozenset({torch.matmul}))
    register_spelling(taken)
    try:
        q, k, v = _qkv()
        rep = attnopt.inspect(LinalgScores(), (q, k, v))  # the @ V is a matmul: still read as one
        assert "linalg_matmul" in rep.misses[0].reason
    finally:
        unregister_spelling(taken)


class DroppedScores(nn.Module):
    """Dropout on the scores (before the softmax): the identity in eval mode."""

    def forward(self, q, k, v):
        s = nn.functional.dropout(q @ k.transpose(-1, -2) * 0.25, p=0.1, training=self.training)
        return torch.softmax(s, dim=-1) @ v


def _eval_dropout(op, x, xs, st):
    """The one small step of the new row: dropout that is off is the identity on the scores."""
    if op.attrs["p"]:
        raise Miss("dropout on the scores is on")
    return op.inputs[0]


@pytest.fixture
def dropout_step(monkeypatch):
    monkeypatch.setitem(SCORE_STEPS, DROPOUT, ScoreStep(_eval_dropout, slice(0, 1)))


def test_a_new_score_step_is_one_row_and_one_function(dropout_step):
    q, k, v = _qkv()
    rep = attnopt.inspect(DroppedScores().eval(), (q, k, v))
    assert not rep.misses
    (site,) = rep.sites
    assert site.kind == "manual" and site.scale == pytest.approx(0.25)


def test_without_the_step_the_scores_pass_through_an_unknown_op():
    assert DROPOUT not in SCORE_STEPS
    q, k, v = _qkv()
    rep = attnopt.inspect(DroppedScores().eval(), (q, k, v))
    (miss,) = rep.misses
    assert "scores pass through" in miss.reason and "dropout" in miss.reason


def test_the_score_walk_is_a_table_over_the_vocabulary():
    assert set(PRODUCTS) == {"matmul", "einsum", "baddbmm"}
    assert {"mul", "div", "add", "sub", "masked_fill", "where", "tanh", "cast", "reshape"} <= set(SCORE_STEPS)
    assert not set(PRODUCTS) & set(SCORE_STEPS)


def test_every_matcher_returns_a_match_or_raises_miss():
    """Each anchor kind has one matcher; a miss is a Miss with the reason, a match is built once (frozen)."""
    assert set(patterns.MATCHERS) == {"sdpa", "mha", "encoder_layer", "native_mha", "softmax"}

    class Both(nn.Module):
        def forward(self, q, k, v):
            a = torch.softmax(q @ k.transpose(-1, -2), dim=-2) @ v  # over the queries: a miss
            return a + nn.functional.scaled_dot_product_attention(q, k, v)

    found = []

    def backend(gm, example_inputs):
        found.extend(patterns.detect(gm))
        return gm.forward

    torch._dynamo.reset()
    torch.compile(Both(), backend=backend)(*_qkv())
    miss, sdpa = sorted(found, key=lambda d: d.match is not None)
    assert miss.match is None and "not over the keys" in miss.reason
    assert sdpa.match.kind == "sdpa" and sdpa.reason is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        sdpa.match.scale = 1.0
