"""Checking an artifact against the model it was converted from: validation (the converted forms' deviation from
the original, within a budget, on sample inputs and on inputs grown along each export's dynamic dims) and bench
(their speed on the local device)."""

from __future__ import annotations

import json
import math
import os
import statistics
from pathlib import Path
from typing import Any, Callable

import torch

from attnopt import artifact as A
from attnopt import export as E
from attnopt import inputs as I
from attnopt.convert_source import ConvertError, Source
from attnopt.convert_write import Steps
from attnopt.passes import TOLERANCE, deviation
from attnopt.policy import Policy
from attnopt.timing import interleaved_times


def _budget(policy: Policy, max_error: float | None, outputs: tuple) -> float:
    if max_error is not None:
        return float(max_error)
    if policy.max_error is not None:
        return float(policy.max_error)
    dtypes = [t.dtype for t in outputs if t.is_floating_point()]
    return max((TOLERANCE.get(d, 1e-4) for d in dtypes), default=1e-4)


def _max_dev(got: tuple, want: tuple) -> float:
    if len(got) != len(want):
        return float("inf")
    pairs = [(g, w) for g, w in zip(got, want) if w.is_floating_point()]
    return max((deviation(g.to(w.device), w) for g, w in pairs), default=0.0)


def validate_dir(path: Path, source: Source, samples: int, budget: float, steps: Steps | None = None) -> dict:
    """Runs the original model and every converted form in ``path`` on ``samples`` inputs; the deviations.

    Exports with dynamic dims also run on inputs grown along them (:func:`_reshaped_draws`)."""
    art = A.open_artifact(path)
    args, kwargs = art.sample_inputs()
    draws = [(args, kwargs, None)] + [(*I.resample(args, kwargs, seed=i, config=source.config), None)
                                      for i in range(1, samples)]  # fmt: skip
    reshaped = _reshaped_draws(art.manifest, args, kwargs, source.config)
    draws += reshaped
    converted = A.load(path)
    targets: dict[str, Callable] = {"module": lambda a, k: E.flatten_output(converted(*a, **k))}
    pt2 = art.file("pt2")
    if pt2 is not None:
        program = torch.export.load(str(pt2)).module()
        targets["pt2"] = lambda a, k: tuple(program(*a, **{n: v for n, v in k.items() if isinstance(v, torch.Tensor)}))
    onnx_file = art.file("onnx")
    if onnx_file is not None:
        session = E.onnx_session(onnx_file)
        targets["onnx"] = lambda a, k: E.run_onnx(session, a, k)
    advance = steps.subtask("validate: samples", len(draws)) if steps else (lambda: None)
    dev = {name: 0.0 for name in targets}
    abs_diff = {name: 0.0 for name in targets}
    consistency = {name: 0.0 for name in targets if name != "module"}
    tolerance = 0.0
    with torch.no_grad():
        for a, k, only in draws:
            want = E.flatten_output(source.model(*a, **k))
            tolerance = max(tolerance, _budget(Policy(), None, want))
            outs = {name: fn(a, k) for name, fn in targets.items() if only is None or name in only}
            for name, got in outs.items():
                dev[name] = max(dev[name], _max_dev(got, want))
                pairs = [(g, w) for g, w in zip(got, want) if w.is_floating_point()]
                abs_diff[name] = max([abs_diff[name]] + [float((g.double() - w.double()).abs().max()) for g, w in pairs])
                if name in consistency:  # an export computes what the converted module computes
                    consistency[name] = max(consistency[name], _max_dev(got, outs["module"]))
            advance()
    failed = {n: d for n, d in dev.items() if not d <= budget}
    failed.update({f"{n} vs module": d for n, d in consistency.items() if not d <= tolerance})
    return {"samples": len(draws) - len(reshaped), "budget": budget, "deviation": dev, "max_abs_diff": abs_diff,
            "consistency": consistency, "consistency_tolerance": tolerance, "passed": not failed,
            "failed": failed, "reshaped": [{"targets": sorted(only), "inputs": [str(s) for s in I.specs_of(a, k)]}
                                           for a, k, only in reshaped]}  # fmt: skip


def _reshaped_draws(manifest: dict, args: tuple, kwargs: dict, config: Any) -> list[tuple[tuple, dict, set]]:
    """Per distinct set of dynamic dims among the exports: inputs with each of those dims grown (batch + 1,
    sequence + 3; masks pad the last row's end), to be run by the module and the exports that take them."""
    groups: dict[str, set] = {}
    for fmt, entry in (manifest.get("exports") or {}).items():
        if entry.get("dynamic"):
            groups.setdefault(json.dumps(entry["dynamic"], sort_keys=True), {"module"}).add(fmt)
    draws = []
    for seed, (key, only) in enumerate(groups.items(), start=100):
        dims, specs = json.loads(key), []
        for spec in I.specs_of(args, kwargs):
            grow = dims.get(f"args_{spec.name}" if spec.positional else spec.name, {})
            shape = [n + (1 if grow.get(str(d)) == "batch" else 3 if grow.get(str(d)) else 0)
                     for d, n in enumerate(spec.shape)]  # fmt: skip
            specs.append(I.InputSpec(spec.name, tuple(shape), spec.dtype))
        a, k = I.make_inputs(specs, config, seed=seed)
        for name, t in k.items():
            if "mask" in name.lower() and t.dim() == 2 and not t.is_floating_point() and t.shape[1] > 2:
                t[-1, -2:] = 0
        draws.append((a, {**k, **{n: v for n, v in kwargs.items() if not isinstance(v, torch.Tensor)}}, only))
    return draws


def validate_artifact(staging: Path, manifest: dict, source: Source, policy: Policy, max_error: float | None,
                      args: tuple, kwargs: dict, samples: int, steps: Steps) -> None:  # fmt: skip
    """:func:`validate_dir` on the conversion in ``staging`` within the budget of ``policy`` (or ``max_error``),
    recorded in the manifest; ConvertError with the way out when it fails."""
    with torch.no_grad():
        want = E.flatten_output(source.model(*args, **kwargs))
    budget = _budget(policy, max_error, want)
    result = validate_dir(staging, source, samples, budget, steps)
    manifest["validation"] = result
    A.write_manifest(staging, manifest)
    if not result["passed"]:
        raise ConvertError(validation_failure(result, manifest["sites"]))


EXACT_DECISIONS = ("exact", "exact-sparse", "keep")  # the same function as the original


def validation_failure(result: dict, sites: list[dict]) -> str:
    """The error of a failed validation, with the way out: a larger budget (--max-error) when the policy
    changes the function at some site, else a report (exact sites stay within the dtype's tolerance)."""
    worst = ", ".join(f"{n} {d:.2e}" for n, d in result["failed"].items())
    text = (f"validation failed: the converted model deviates from the original beyond the budget "
            f"{result['budget']:.1e} on {result['samples']} sample(s): {worst}.")  # fmt: skip
    approximate = sorted({s["decision"] for s in sites if s["decision"] not in EXACT_DECISIONS})
    finite = [d for d in result["failed"].values() if math.isfinite(d) and d > 0]
    suggest = f" (e.g. --max-error {10 ** math.ceil(math.log10(max(finite))):.0e})" if finite else ""
    if approximate:
        return (f"{text} The policy changes the function ({', '.join(approximate)}): accept a larger deviation with "
                f"--max-error{suggest} (max_error= in Python, or in a policy file), or convert with an exact policy.")
    return (f"{text} The sites are exact, so this exceeds rounding: raise the budget with --max-error{suggest} if "
            "the output dtype is coarser than its default tolerance, else report it (rerun with --debug).")


def bench(path: str | os.PathLike, runs: int = 10, warmup: int = 3, device: str | None = None,
          progress: bool = False) -> dict:  # fmt: skip
    """Times the original model against the converted forms in artifact ``path`` on the local device.

    Each row: median and min milliseconds over ``runs`` calls after ``warmup`` calls (the rows' calls interleaved,
    :func:`attnopt.timing.interleaved_times`, as the report's model times were measured at conversion), speedup
    of the median over the original's, and the largest relative output deviation from the original.
    ``report_timing`` is what the conversion's report measured on the same sample inputs (None when it did not).
    """
    if runs < 1 or warmup < 0:
        raise ConvertError("--runs must be >= 1 and --warmup >= 0")
    art = A.open_artifact(path)
    rows = _bench_rows(art, torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu")))
    steps = Steps(1, progress)
    with steps, torch.no_grad():
        steps.step(f"bench {len(rows)} rows, {runs} interleaved rounds")
        times = interleaved_times({name: (fn, torch.device(where)) for name, where, fn in rows}, runs, warmup)
        outs = {name: tuple(t.cpu() for t in fn()) for name, _, fn in rows}
        steps.done()
    want = outs[rows[0][0]]
    results = [{"name": name, "device": where, "median_ms": statistics.median(times[name]), "min_ms": min(times[name]),
                "deviation": _max_dev(outs[name], want)} for name, where, _ in rows]  # fmt: skip
    base = results[0]["median_ms"]
    for r in results:
        r["speedup"] = base / r["median_ms"] if r["median_ms"] > 0 else float("nan")
    return {"artifact": str(art.path), "model": art.manifest["model"]["class"], "runs": runs, "warmup": warmup,
            "inputs": [str(I.InputSpec(s["name"], tuple(s["shape"]), s["dtype"])) for s in art.manifest["inputs"]["specs"]],
            "rows": results, "report_timing": art.manifest.get("timing")}  # fmt: skip


def _bench_rows(art: A.Artifact, dev: torch.device) -> list[tuple[str, str, Callable]]:
    """``(name, device, fn)`` per form to time: the original model and attnopt's module on ``dev``, the exports
    the artifact holds on the CPU."""
    args, kwargs = art.sample_inputs()
    to = lambda x: x.to(dev) if isinstance(x, torch.Tensor) else x  # noqa: E731
    d_args, d_kwargs = tuple(to(a) for a in args), {k: to(v) for k, v in kwargs.items()}
    original = art.build_model().to(dev)
    converted = A.load(art.path, check=False).to(dev)  # its own copy of the weights, captured at the first call
    rows = [("original (PyTorch)", str(dev), lambda: E.flatten_output(original(*d_args, **d_kwargs))),
            ("attnopt (attnopt.load)", str(dev), lambda: E.flatten_output(converted(*d_args, **d_kwargs)))]  # fmt: skip
    tensor_kwargs = {k: v for k, v in kwargs.items() if isinstance(v, torch.Tensor)}
    if art.file("pt2") is not None:
        program = torch.export.load(str(art.file("pt2"))).module()
        rows.append(("torch.export program (.pt2)", "cpu", lambda: tuple(program(*args, **tensor_kwargs))))
    if art.file("onnx") is not None:
        try:
            session = E.onnx_session(art.file("onnx"))
        except E.ExportError:
            session = None
        if session is not None:
            mode = art.manifest["exports"]["onnx"].get("attention", "standard")
            rows.append((f"onnxruntime ({mode} attention)", "cpu", lambda: E.run_onnx(session, args, kwargs)))
    return rows
