"""Speed is measured, on the device the model runs on: each rewritten site against the site as written (on the
operands validation recorded), and the whole forward when ``optimize`` has example inputs."""

import torch
from torch import nn

import attnopt
from _detect_helpers import pipeline_backend
from attnopt.patterns.match import original_graph


class Manual(nn.Module):
    def forward(self, q, k, v):
        scores = q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5
        return torch.softmax(scores, dim=-1) @ v


def _qkv():
    g = torch.Generator().manual_seed(0)
    return tuple(torch.randn(2, 3, 9, 8, generator=g) for _ in range(3))


def test_each_rewritten_site_is_timed_against_the_site_as_written():
    optimized = attnopt.optimize(Manual().eval(), "exact", _qkv())
    report = attnopt.report(optimized)
    (site,) = report.sites
    assert site.device == "cpu" and site.original_ms > 0 and site.rewritten_ms > 0
    assert site.measured_speedup == site.original_ms / site.rewritten_ms
    assert report.timing["device"] == "cpu" and report.timing["original_ms"] > 0 and report.timing["optimized_ms"] > 0


def test_no_model_timing_when_not_asked_for_nor_in_training_mode():
    report = attnopt.report(attnopt.optimize(Manual().eval(), "exact", _qkv(), measure=False))
    assert report.timing is None and report.sites[0].original_ms > 0  # the site is still timed while validated
    assert attnopt.report(attnopt.optimize(Manual().train(), "exact", _qkv())).timing is None  # forwards would
    # update a training model's state (batch-norm statistics): not run again to time it
    kept = attnopt.report(attnopt.optimize(Manual().eval(), "keep", _qkv())).sites[0]
    assert kept.original_ms is None and kept.measured_speedup is None


def test_the_site_as_written_runs_alone_and_computes_the_site():
    """``original_graph`` copies the nodes between the operands and the output: it computes what the model did."""
    contexts = []
    q, k, v = _qkv()
    torch.compile(Manual(), backend=pipeline_backend(contexts))(q, k, v)
    (record,) = contexts[0].records
    written, operands = original_graph(record.match, contexts[0].original)
    assert all(n.op == "placeholder" for n in operands)
    torch.testing.assert_close(written(q, k, v), Manual()(q, k, v))
