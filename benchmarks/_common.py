"""Helpers shared by the benchmark scripts (run as ``python benchmarks/<name>.py``, this directory on sys.path)."""

from __future__ import annotations

import json
import math


def write_json(result: dict, path: str | None) -> str:
    """Prints ``result`` as indented JSON and also writes it to ``path`` when given; returns the text.

    Non-finite floats are written as strings ("inf", "nan"): JSON has no such numbers.
    """
    text = json.dumps(_finite(result), indent=2)
    print(text)
    if path:
        with open(path, "w") as f:
            f.write(text + "\n")
    return text


def _finite(x):
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x
