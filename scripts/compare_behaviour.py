"""Records what attnopt does to the zoo, and compares two records: a refactor must leave both identical.

    # one record per tree (run from each checkout, or with PYTHONPATH pointing at it)
    PYTHONPATH=/path/to/before python scripts/compare_behaviour.py record before.json
    PYTHONPATH=/path/to/after  python scripts/compare_behaviour.py record after.json
    python scripts/compare_behaviour.py compare before.json after.json

A record holds, per zoo model (named and extra), attention implementation and policy: the report of
``attnopt.optimize`` (every site's name, decision, reason, shape facts, measured deviation; misses; notes;
the output deviation) and a digest of every output tensor of the optimized model on the example inputs.
Fields that measure time or the machine (``runs``: which SDPA kernel won the timing; the seconds auto's
calibration took, in its note) are left out, so two runs of one tree compare equal (``predicted_speedup`` stays:
it is a pure function of the report).
``compare`` prints every difference and exits 1 when there is one.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
import warnings

import torch

POLICIES = ("exact", "keep", "sliding_window:4", "sparse:auto", "linear", "sigmoid", "auto:1e-2")
VOLATILE = ("runs",)  # measured on the machine: which SDPA kernel the dispatch timed fastest


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().contiguous().cpu().numpy().tobytes()).hexdigest()[:16]


def _outputs(out) -> list[str]:
    leaves = torch.utils._pytree.tree_leaves(out if not hasattr(out, "to_tuple") else out.to_tuple())
    return [_digest(t) for t in leaves if isinstance(t, torch.Tensor)]


def _report(report) -> dict:
    d = report.to_dict()
    for site in d["sites"]:
        for key in VOLATILE:
            site.pop(key, None)
    d["notes"] = [re.sub(r"runs in [0-9.]+ s", "runs in <seconds> s", n) for n in d["notes"]]  # wall time
    return d


def _one(name: str, impl: str, policy: str) -> dict:
    import attnopt
    from attnopt import zoo

    z = zoo.build(name, attn_implementation=impl)
    try:
        fast = attnopt.optimize(z.model, policy, z.args, z.kwargs)
        with torch.no_grad():
            out = fast(*z.args, **z.kwargs)
    except Exception as exc:  # noqa: BLE001 - a refusal is behaviour too: recorded, compared
        return {"error": f"{type(exc).__name__}: {exc}"}
    return {"report": _report(attnopt.report(fast)), "outputs": _outputs(out)}


def record(path: str) -> None:
    from attnopt import zoo

    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)  # the same reduction order in both runs, whatever the machine's load
    entries = {}
    for name in zoo.NAMES + zoo.EXTRA_NAMES:
        for impl in zoo.implementations(name):
            for policy in POLICIES:
                torch._dynamo.reset()
                entries[f"{name}/{impl}/{policy}"] = _one(name, impl, policy)
                print(f"{name}/{impl}/{policy}", file=sys.stderr)
    with open(path, "w") as f:
        json.dump(entries, f, indent=1, sort_keys=True)


def _diff(a, b, where: str):
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            yield from _diff(a.get(key, "<absent>"), b.get(key, "<absent>"), f"{where}.{key}")
    elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            yield from _diff(x, y, f"{where}[{i}]")
    elif a != b:
        yield f"{where}: {a!r} != {b!r}"


def compare(before: str, after: str) -> int:
    with open(before) as f, open(after) as g:
        a, b = json.load(f), json.load(g)
    diffs = list(_diff(a, b, ""))
    for line in diffs:
        print(line)
    print(f"{len(a)} runs before, {len(b)} after; {len(diffs)} difference(s)")
    return 1 if diffs else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("record").add_argument("out")
    cmp = sub.add_parser("compare")
    cmp.add_argument("before")
    cmp.add_argument("after")
    args = parser.parse_args()
    if args.command == "record":
        record(args.out)
        return 0
    return compare(args.before, args.after)


if __name__ == "__main__":
    sys.exit(main())
