"""The report fits the terminal: no line wider than asked, numbers never split, reasons readable."""

import re

import pytest

from attnopt.report import MIN_PROSE, Miss, Report, Site, Trial

LONG_AUTO_REASON = ("auto: SlidingWindow(window=128) is the cheapest candidate within budget; "
                    + "sparse attention over a causal sliding window of 128 tokens, measured deviation 1.23e-03; " * 6)


def _report() -> Report:
    r = Report(graphs=1, output_deviation=2.5e-3)
    for i in range(3):
        tried = [Trial(f"SlidingWindow(window={w})", 1e-3 * w, 2.0, "chosen" if w == 128 else "over budget")
                 for w in (64, 128, 256, 512)]
        r.sites.append(Site(name=f"model.layers.{i}.self_attn", kind="manual", graph=0, decision="sparse",
                            heads=(32, 8), head_dims=(128, 128), seq=(4096, 4096), mask="additive", causal="top-left",
                            layout="BSHD", deviation=1.234e-3 * (i + 1), device="cpu", original_ms=13.21,
                            rewritten_ms=1.0, predicted_speedup=5.02, predicted_for="H100",
                            runs="sdpa flash-attention on the example inputs", reason=LONG_AUTO_REASON, tried=tried))
    r.misses.append(Miss("model.layers.0.mlp", 0, "softmax_3", "a softmax over the hidden dim, not over the keys"))
    r.notes.append("auto: budget 1.0e-02 on the model's outputs; 12 calibration runs in 3.1 s")
    return r


def _column_widths(text: str) -> dict[str, int]:
    """Header -> inner width of each column of the sites table (from its header row)."""
    header = next(line for line in text.splitlines() if line.startswith("┃") and " site " in line)
    return {cell.strip(): len(cell) - 2 for cell in header.strip("┃").split("┃")}


@pytest.mark.parametrize("width", [80, 100, 200])
def test_fits_the_width_numbers_intact_reason_readable(width):
    text = _report().render(width=width)
    assert max(len(line) for line in text.splitlines()) <= width
    widths = _column_widths(text)
    assert widths["reason"] >= MIN_PROSE and "site" in widths and "decision" in widths
    assert not re.search(r"\d[.e/-]? *│\s*$|│ *[-.e/]\d", text)  # no number cut at a cell border
    numbers = {"deviation": ["1.2e-03", "2.5e-03", "3.7e-03"], "seq": ["4096/4096"], "speedup": ["13.21x"],
               "heads": ["32/8"], "dims": ["128/128"], "predicted": ["5.02x H100"]}
    for column, values in numbers.items():
        if column in widths:  # a column that does not fit is left out whole, and the caption says so
            assert all(re.search(rf"│ {re.escape(v)} +│", text) for v in values), column
        else:
            assert column in " ".join(text.split())
    assert "site(s)" in text and "2.50e-03" in text


def test_wide_terminal_shows_every_number_column():
    widths = _column_widths(_report().render(width=200))
    assert {"heads", "dims", "seq", "deviation", "speedup", "reason"} <= set(widths)


def test_long_auto_reason_summarized_unless_verbose():
    short, full = _report().render(width=120), _report().render(width=120, verbose=True)
    assert len(short.splitlines()) < len(full.splitlines())
    assert "--verbose" in short and "is the cheapest" in " ".join(short.split())
    assert "512 over budget" not in " ".join(short.split()) and "4 tried" in short
    assert "6.4e-02" in full and "6.4e-02" not in short  # the candidates' deviations, verbose only
    assert _report().to_dict()["sites"][0]["reason"] == LONG_AUTO_REASON  # to_json keeps it whole


def test_str_without_terminal_follows_columns(monkeypatch):
    monkeypatch.setenv("COLUMNS", "90")
    assert max(len(line) for line in str(_report()).splitlines()) <= 90
    monkeypatch.delenv("COLUMNS")
    assert max(len(line) for line in str(_report()).splitlines()) <= 120


def test_brackets_in_reasons_are_text_not_markup():
    r = _report()
    r.sites[0].reason = "mask [bold] [B, 1, Sq, Sk] not taken"
    r.notes.append("see [link]")
    text = r.render(width=200)
    assert "[bold]" in text and "[B, 1, Sq, Sk]" in text and "see [link]" in text


def test_speed_is_measured_and_the_prediction_names_its_hardware():
    """The speedup column is what was measured on this device; the cost model's number says which GPU it models."""
    r = _report()
    r.timing = {"device": "cpu", "original_ms": 3.0, "optimized_ms": 2.0}
    text = " ".join(r.render(width=240).split())
    assert "│ 13.21x │ 5.02x H100 │" in text
    assert "measured on cpu, example inputs: original 3.000 ms, optimized 2.000 ms (1.50x)" in text
    site = r.sites[0]
    assert site.measured_speedup == 13.21 and site.to_dict()["original_ms"] == 13.21
    site.rewritten_ms = None  # unmeasured: no speedup is shown, whatever the prediction
    assert site.measured_speedup is None and r.to_dict()["timing"]["optimized_ms"] == 2.0
