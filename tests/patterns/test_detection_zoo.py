"""The detection bar: every attention site of the named zoo found and rewritten exactly, with a coverage table.

Each model is built from a small config with random weights, with attn_implementation "eager" and
"sdpa" wherever transformers offers both; plus ``nn.MultiheadAttention`` and ``nn.Transformer``.
``attnopt.optimize(policy="exact")`` must rewrite every site (decision "exact", never rolled back),
report no missed softmax, and keep the outputs within 1e-4 relative. The table (model x
implementation: sites found / rewritten / largest site deviation / output deviation) is printed; run
with ``-s`` (or ``-rP``) to see it. A few architectures beyond the list run too.
"""

from __future__ import annotations

import time

import pytest
import torch
from torch import nn

import attnopt
from attnopt import zoo

from conftest import rel_err

pytestmark = pytest.mark.usefixtures("one_thread")


# Sites a model has: one per attention layer (2 layers a stack), self and cross attention in decoders.
EXPECTED_SITES = {"t5": 6, "bart": 6, "whisper": 6}
# Grouped-query models record (query heads, key/value heads) and run native GQA.
GQA_HEADS = {"llama": (4, 2), "mistral": (4, 2), "gemma2": (4, 2), "qwen2": (4, 2), "falcon": (4, 1),
             "gpt_bigcode": (4, 1)}  # fmt: skip
# Causal decoders whose sdpa path passes a boolean causal+padding mask: the causal part becomes the flag.
CAUSAL_SDPA = {"gpt2", "llama", "mistral", "qwen2", "falcon", "gpt_bigcode"}


def _outputs(o):
    if hasattr(o, "last_hidden_state"):
        return o.last_hidden_state
    return o[0] if isinstance(o, tuple) else o


def _row(name: str, impl: str, opt, want, got, seconds: float) -> dict:
    rep = attnopt.report(opt)
    devs = [s.deviation for s in rep.sites if s.deviation is not None]
    return {
        "model": name, "impl": impl, "sites": len(rep.sites),
        "rewritten": sum(s.decision == "exact" for s in rep.sites), "misses": len(rep.misses),
        "max_site_dev": max(devs, default=0.0), "output_dev": rel_err(got, want), "report": rep,
        "seconds": seconds,
    }  # fmt: skip


def _run_zoo(name: str, impl: str) -> dict:
    t0 = time.perf_counter()
    z = zoo.build(name, impl)
    opt = attnopt.optimize(z.model, "exact", z.args, z.kwargs)
    with torch.no_grad():
        want = _outputs(z.model(*z.args, **z.kwargs))
        got = _outputs(opt(*z.args, **z.kwargs))
    return _row(name, impl, opt, want, got, time.perf_counter() - t0)


def _run_module(name: str, model: nn.Module, args: tuple, kwargs: dict) -> dict:
    t0 = time.perf_counter()
    opt = attnopt.optimize(model, "exact", args, kwargs)
    with torch.no_grad():
        want, got = _outputs(model(*args, **kwargs)), _outputs(opt(*args, **kwargs))
    return _row(name, "module", opt, want, got, time.perf_counter() - t0)


def _torch_modules() -> list[tuple[str, nn.Module, tuple, dict]]:
    torch.manual_seed(0)
    x, mem = torch.randn(2, 6, 16), torch.randn(2, 9, 16)
    kpm = torch.zeros(2, 6, dtype=torch.bool)
    kpm[1, -2:] = True

    class MHA(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(16, 4, batch_first=True)

        def forward(self, x, kpm):
            return self.attn(x, x, x, key_padding_mask=kpm, need_weights=False)[0]

    causal = nn.Transformer.generate_square_subsequent_mask(6)
    transformer = nn.Transformer(16, 4, 2, 2, 32, batch_first=True)
    return [
        ("nn.MultiheadAttention", MHA().eval(), (x, kpm), {}),
        ("nn.Transformer", transformer.eval(), (mem, x), {"tgt_mask": causal, "tgt_is_causal": True}),
    ]


def _table(rows: list[dict]) -> str:
    head = (f"{'model':24s} {'impl':7s} {'found':>5s} {'exact':>5s} {'miss':>4s} {'max site dev':>12s} "
            f"{'output dev':>10s}")  # fmt: skip
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['model']:24s} {r['impl']:7s} {r['sites']:5d} {r['rewritten']:5d} {r['misses']:4d} "
                     f"{r['max_site_dev']:12.1e} {r['output_dev']:10.1e}")  # fmt: skip
    return "\n".join(lines)


def _check(r: dict, expected_sites: int | None = None) -> None:
    rep = r["report"]
    where = f"{r['model']} ({r['impl']})\n{rep}"
    assert r["sites"] >= 1, where
    if expected_sites is not None:
        assert r["sites"] == expected_sites, where
    assert r["rewritten"] == r["sites"], where  # rewritten, not kept or rolled back
    assert r["misses"] == 0, where
    assert r["output_dev"] < 1e-4 and r["max_site_dev"] < 1e-4, where
    name = r["model"]
    if name in GQA_HEADS:
        assert all(s.heads == GQA_HEADS[name] for s in rep.sites), where
    if name in CAUSAL_SDPA and r["impl"] == "sdpa":
        assert all(s.causal == "top-left" for s in rep.sites), where


# The table in three parts, so that parallel workers share it; together they cover every model.
PARTS = [zoo.NAMES[0:5], zoo.NAMES[5:9], zoo.NAMES[9:]]


@pytest.mark.parametrize("part", range(len(PARTS)))
def test_zoo_coverage_table(part, capsys):
    """Every named zoo model x implementation, plus nn.MultiheadAttention and nn.Transformer."""
    rows = []
    for name in PARTS[part]:
        for impl in zoo.implementations(name):
            torch._dynamo.reset()
            rows.append(_run_zoo(name, impl))
    if part == len(PARTS) - 1:
        for name, model, args, kwargs in _torch_modules():
            torch._dynamo.reset()
            rows.append(_run_module(name, model, args, kwargs))
    with capsys.disabled():
        print(f"\nattnopt detection coverage (policy exact), part {part + 1}/{len(PARTS)}\n" + _table(rows))
    for r in rows:
        _check(r, EXPECTED_SITES.get(r["model"], 6 if r["model"] == "nn.Transformer" else
                                     1 if r["model"] == "nn.MultiheadAttention" else 2))  # fmt: skip


@pytest.mark.parametrize("name", zoo.EXTRA_NAMES)
def test_architectures_beyond_the_list(name, capsys):
    rows = []
    for impl in zoo.implementations(name):
        torch._dynamo.reset()
        rows.append(_run_zoo(name, impl))
    with capsys.disabled():
        print("\n" + _table(rows))
    for r in rows:
        _check(r, 2)


def test_zoo_knows_its_implementations():
    assert zoo.implementations("bloom") == ("eager",) and zoo.implementations("gpt2") == ("eager", "sdpa")
    with pytest.raises(KeyError, match="unknown zoo model"):
        zoo.build("no-such-model")
