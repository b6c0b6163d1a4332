"""The auto policy: per site, the cheapest variant whose model outputs stay within an error budget.

    fast = attnopt.optimize(model, "auto:1e-2", args, kwargs)
    fast = attnopt.optimize(model, attnopt.Policy.auto(max_error=1e-2, seq_len=32768), args, kwargs)

Calibration captures the model once. Every captured graph keeps its detected sites, and at each call
runs rewritten for the current assignment {site: variant} (each rewrite built once and cached), so
trying a candidate costs one forward pass, never a recompilation:

1. every calibrated site exact: the reference run;
2. per site, the others exact: its candidates from the cheapest predicted by the cost model (at the
   policy's ``seq_len``, else the site's own length) up; the first whose output deviation is within
   budget is chosen; candidates not predicted faster than exact are not tried;
3. the combination is run; while it exceeds the budget, the chosen site with the largest deviation of
   its own goes back to exact.

The budget is on the model's outputs (max relative deviation over its floating-point outputs, as the
report's ``output_deviation``): ``max(max_error, the output dtype's rounding tolerance)``, so a budget of
0 admits variants that compute the same function (exact-sparse) and nothing else.
"""

from __future__ import annotations

import contextlib
import glob
import time
from dataclasses import dataclass, field, is_dataclass, replace
from functools import partial
from typing import Any, Callable

import torch
from torch.fx import GraphModule

from attnopt import masks
from attnopt.capture import (CaptureError, check_model, dynamo_limits, leaves, normalize, output_deviation,
                             run_captured, run_eager)  # fmt: skip
from attnopt.cost import Shape, predict_seconds, predict_speedup
from attnopt.kernels.sparse.structure import recognize
from attnopt.naming import SiteNamer
from attnopt.passes import DETECT, REWRITE, TOLERANCE, Context, Recorder, concrete, run_pipeline, validation_skip
from attnopt.patterns.match import emit_operands, replacement_graph
from attnopt.policy import Auto, Exact, Policy, Sparse, Variant, as_policy
from attnopt.report import Report, Site, Trial
from attnopt.timing import device_label, device_of, median_ms
from attnopt.variants.registry import handler_for, handler_of, variant_classes



def label(variant: Any) -> str:
    """A short name for a variant in the report: "exact-sparse", the variant's ``to_string()`` (``sliding_window:4``),
    its dataclass repr, or its name."""
    if isinstance(variant, Exact):
        return "exact"
    if isinstance(variant, Sparse):
        return variant.name if variant.exact else variant.to_string()
    to_string = getattr(variant, "to_string", None)
    if to_string is not None:
        return to_string()
    return repr(variant) if is_dataclass(variant) else variant.name


def pinned(assignment: dict[str, Variant], default: Variant) -> Policy:
    """A policy giving each named site its variant (names as literal globs), other sites ``default``."""
    pins = tuple((glob.escape(name), v) for name, v in assignment.items() if v != default)
    return Policy(default=default, overrides=pins)


class _Calibrator:
    """A dynamo backend: each graph's sites are detected once; every call runs the graph rewritten for
    ``assignment`` (sites absent from it get ``base(name)``)."""

    def __init__(self, base, model: torch.nn.Module):
        self.base = base
        self.namer = SiteNamer(model)
        self.assignment: dict[str, Variant] = {}
        self.contexts: list[Context] = []
        self.operands: dict[int, dict] = {}  # graph index -> its sites' operand values (see _operand_values)

    def __call__(self, gm: GraphModule, example_inputs: list):
        ctx = Context(Policy(), graph_index=len(self.contexts), example_inputs=list(example_inputs),
                      name_of=self.namer.for_graph(gm, list(example_inputs)))  # fmt: skip
        self.contexts.append(ctx)
        run_pipeline(gm, ctx, DETECT)
        rewrites: dict[tuple, GraphModule] = {}

        def run(*args):
            variants = {r.name: self.assignment.get(r.name) or self.base(r.name) for r in ctx.records}
            key = tuple(variants.values())
            if key not in rewrites:
                pin = Context(pinned(variants, Exact()), graph_index=ctx.graph_index,
                              records=[r.fresh() for r in ctx.records], original=ctx.original)  # fmt: skip
                rewrites[key] = run_pipeline(ctx.original, pin, REWRITE)
            return rewrites[key](*args)

        return run

    def _matched(self):
        for ctx in self.contexts:
            for r in ctx.records:
                yield ctx, r.site, r.match

    def sites(self) -> list[tuple[Site, Any]]:
        """The sites captured, first occurrence of each name, with their matches."""
        seen: dict[str, tuple[Site, Any]] = {}
        for _, site, match in self._matched():
            seen.setdefault(site.name, (site, match))
        return list(seen.values())

    def site_ms(self, name: str, variants: list[Variant]) -> tuple[str, list[float | None]]:
        """The device and each of ``variants``' milliseconds at site ``name`` (its first occurrence), run alone on
        the operands the original graph gave it on the example inputs; None where one cannot run or be timed."""
        found = [(ctx, r) for ctx in self.contexts for r in ctx.records if r.name == name]
        if not found or validation_skip(found[0][0].example_inputs):
            return "", [None] * len(variants)
        ctx, r = found[0]
        values = self._operand_values(ctx)
        args = [values[o] for o in r.match.operands()]
        device = device_of(args)
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            return device_label(device), [_time_variant(v, r.match, args, device) for v in variants]

    def _operand_values(self, ctx: Context) -> dict:
        """The operands of every site of ``ctx``'s graph on the example inputs: one run of the graph, kept for
        the timings of all its sites."""
        if ctx.graph_index not in self.operands:
            recorder = Recorder(ctx.original, {o for r in ctx.records for o in r.match.operands()})
            with torch.no_grad(), torch.random.fork_rng(devices=[]):
                recorder.run(*[concrete(x) for x in ctx.example_inputs])
            self.operands[ctx.graph_index] = recorder.values
        return self.operands[ctx.graph_index]

    def own_masks(self, names: set[str]) -> dict[str, masks.Mask]:
        """The masks of sites ``names`` on the example inputs, where they are structured (what exact-sparse
        runs): one run of each graph, recording the canonical mask operands."""
        found: dict[str, masks.Mask] = {}
        for ctx in self.contexts:
            wanted = [(s, m) for c, s, m in self._matched() if c is ctx and s.name in names and not m.custom_emit]
            if not wanted or validation_skip(ctx.example_inputs):
                continue
            subs = [(site, m, *replacement_graph(m, _canonical_mask)) for site, m in wanted]
            recorder = Recorder(ctx.original, {o for *_, operands in subs for o in operands})
            with torch.no_grad(), torch.random.fork_rng(devices=[]):
                recorder.run(*[concrete(x) for x in ctx.example_inputs])
                for site, m, sub, operands in subs:
                    mask, q, k = sub(*[recorder.values[o] for o in operands])
                    structure = recognize(mask, m.causal, q.shape[0], q.shape[1], q.shape[2], k.shape[2])
                    if structure is not None:
                        found.setdefault(site.name, structure[0])
        return found


def _time_variant(v: Variant, match: Any, args: list, device: torch.device) -> float | None:
    try:
        sub, _ = replacement_graph(match, partial(handler_for(v).emit, v))
        return median_ms(lambda: sub(*args), device)
    except Exception:  # noqa: BLE001 - a candidate that cannot run alone is not timed (and not tried)
        return None


def _canonical_mask(graph, m, lookup):
    c = emit_operands(graph, m, lookup)
    return c.mask, c.q, c.k


@dataclass
class SiteChoice:
    """One site's outcome: the variant kept, why, and the candidates with their verdicts."""

    variant: Variant
    why: str
    tried: list[Trial] = field(default_factory=list)


@dataclass
class Calibration:
    """What calibration chose: ``policy`` pins each site's variant; ``sites`` holds the evidence."""

    policy: Policy
    max_error: float
    budget: float
    deviation: float | None  # the final combination's, on the calibration inputs
    sites: dict[str, SiteChoice]
    runs: int
    seconds: float

    def annotate(self, report: Report) -> None:
        """Writes the evidence into ``report``: per site the candidates tried and why; a note on the budget."""
        for site in report.sites:
            choice = self.sites.get(site.name)
            if choice is not None:
                site.tried = list(choice.tried)
                site.reason = f"auto: {choice.why}; {site.reason}"
        dev = "-" if self.deviation is None else f"{self.deviation:.2e}"
        report.notes.append(
            f"auto: budget {self.budget:.1e} on the model's outputs (max_error {self.max_error:.1e}, at least the "
            f"output dtype's rounding tolerance); {self.runs} calibration runs in {self.seconds:.1f} s; "
            f"the chosen combination deviates {dev} on the calibration inputs"
        )


def _tolerance(outputs: Any) -> float:
    return max((TOLERANCE.get(t.dtype, 1e-4) for t in leaves(outputs) if t.is_floating_point()), default=0.0)


def _candidates(auto: Auto, site: Site, match: Any) -> list[Variant]:
    """The explicit candidates, else those the variant classes generate for the site (when they can)."""
    if auto.candidates:
        return [c for c in auto.candidates if not isinstance(c, Exact)]
    found: list[Variant] = []
    for cls in variant_classes():  # in registration order (attnopt.variants)
        handler = handler_of(cls)
        option = handler.auto_option(cls)
        if option is None or getattr(auto, option):
            found += handler.candidates(cls, site, match)
    return found


def _shape(site: Site, seq_len: int | None, own_mask: masks.Mask | None) -> Shape | None:
    shape = Shape.from_site(site, seq_len)
    return None if shape is None else replace(shape, own_mask=own_mask)


def _rank(candidates: list[Variant], match: Any, shape: Shape | None) -> tuple[list[tuple[Variant, Any]], list[Trial]]:
    """The candidates worth running, cheapest predicted first, and a verdict for each of the others. A
    candidate computing the same function (exact-sparse) runs at exact's predicted time too: it never
    is slower, and it is faster at lengths where its tiles are skipped."""
    skipped, ranked = [], []
    exact = predict_seconds(Exact(), shape) if shape is not None else None
    for v in candidates:
        reason = handler_for(v).unsupported(v, match)
        t = predict_seconds(v, shape) if shape is not None and not reason else None
        speedup = predict_speedup(shape, v) if t is not None else None
        if reason:
            skipped.append(Trial(label(v), None, None, f"not applicable: {reason}"))
        elif shape is None:
            skipped.append(Trial(label(v), None, None, "skipped: the site's sizes are unknown (set Policy.seq_len)"))
        elif t is None:
            skipped.append(Trial(label(v), None, None, "skipped: no cost model (give the variant cost(shape))"))
        elif t > exact * (1 + 1e-9) or (t >= exact * (1 - 1e-9) and not handler_for(v).exact(v)):
            skipped.append(Trial(label(v), None, speedup, "skipped: not predicted faster than exact"))
        else:
            ranked.append((t, len(ranked), v, speedup))
    return [(v, speedup) for _, _, v, speedup in sorted(ranked, key=lambda r: r[:2])], skipped


def calibrate(model: torch.nn.Module, policy: Any, args: Any = (), kwargs: dict | None = None,
              progress: bool = True) -> Calibration:  # fmt: skip
    """Chooses a variant for every site ``policy`` leaves to auto, on the example inputs, in eval mode (see
    the module)."""
    policy = as_policy(policy)
    if not policy.is_auto:
        raise ValueError(f"calibrate takes an auto policy (Policy.auto(max_error=...) or 'auto:1e-2'), got {policy}")
    check_model(model)
    args, kwargs = normalize(args, kwargs)
    if not args and not kwargs:
        raise ValueError("the auto policy calibrates on example inputs: pass args (and kwargs) with it")
    with _eval_mode(model):
        return _calibrate(model, policy, args, kwargs, progress)


@contextlib.contextmanager
def _eval_mode(model: torch.nn.Module):
    """Outputs are compared, so calibration runs in eval mode (no dropout); each module's mode is restored."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield
    finally:
        for m, training in modes.items():
            m.training = training


def _calibrate(model: torch.nn.Module, policy: Policy, args: tuple, kwargs: dict, progress: bool) -> Calibration:
    from rich.console import Console
    from rich.progress import Progress

    start = time.perf_counter()
    want = run_eager(model, args, kwargs)

    def base(name: str) -> Variant:
        v = policy.for_site(name)
        return Exact() if isinstance(v, Auto) else v

    calibrator = _Calibrator(base, model)
    compiled = torch.compile(model, backend=calibrator)
    runs = 0
    with Progress(console=Console(stderr=True), transient=True, disable=not progress) as bar:
        task = bar.add_task("auto", total=1)

        def measure(what: str) -> float:
            nonlocal runs
            runs += 1
            bar.update(task, description=f"auto: {what}", total=max(bar.tasks[0].total, runs), completed=runs - 1)
            with dynamo_limits():
                got = run_captured(compiled, model, calibrator, args, kwargs)
            dev = output_deviation(want, got)
            if dev is None:
                raise ValueError(f"auto compares outputs, but {type(model).__name__} returns no floating-point tensor")
            return dev

        deviation = measure("reference run (every site exact)")
        sites = calibrator.sites()
        unmatched = policy.unmatched_globs([s.name for s, _ in sites])
        if unmatched:
            raise ValueError(f"policy override glob(s) {unmatched} match no attention site; "
                             f"sites are {[s.name for s, _ in sites]}")  # fmt: skip
        budget = max(policy.max_error, _tolerance(want))
        plans = _plans(policy, sites, calibrator)
        bar.update(task, total=1 + sum(len(ranked) for ranked, _ in plans.values()))
        choices = {name: _search(name, *plan, calibrator, measure, budget) for name, plan in plans.items()}
        deviation = _combine(choices, calibrator, measure, budget, deviation)
    default = Exact() if isinstance(policy.default, Auto) else policy.default
    final = {s.name: calibrator.assignment.get(s.name) or base(s.name) for s, _ in sites}
    return Calibration(
        policy=replace(pinned(final, default), seq_len=policy.seq_len, on_deviation=policy.on_deviation),
        max_error=policy.max_error, budget=budget, deviation=deviation, sites=choices, runs=runs,
        seconds=time.perf_counter() - start,
    )  # fmt: skip


def _plans(policy: Policy, sites: list, calibrator: _Calibrator) -> dict[str, tuple[list, list[Trial]]]:
    """Per site left to auto (and not escaped): its candidates ranked by predicted time (then, with
    ``rank_by="measured"``, by measured time, those not faster than exact dropped), and those skipped."""
    auto = [(s, m) for s, m in sites if m.escape is None and isinstance(policy.for_site(s.name), Auto)]
    candidates = {s.name: _candidates(policy.for_site(s.name), s, m) for s, m in auto}
    exact_sparse = {n for n, cs in candidates.items() if any(isinstance(c, Sparse) and c.exact for c in cs)}
    own_masks = calibrator.own_masks(exact_sparse)
    shapes = {s.name: _shape(s, policy.seq_len, own_masks.get(s.name)) for s, _ in auto}
    plans = {s.name: _rank(candidates[s.name], m, shapes[s.name]) for s, m in auto}
    for name, (ranked, skipped) in plans.items():
        if policy.for_site(name).rank_by == "measured" and ranked:
            plans[name] = (by_measured_time(name, ranked, skipped, calibrator), skipped)
    return plans


def by_measured_time(name: str, ranked: list, skipped: list[Trial], calibrator: _Calibrator) -> list:
    """``ranked`` timed on this device at site ``name``: those measured faster than exact, fastest first; a
    verdict in ``skipped`` for the others."""
    device, times = calibrator.site_ms(name, [Exact()] + [v for v, _ in ranked])
    exact_ms, kept = times[0], []
    if exact_ms is None:  # exact itself could not be timed alone: nothing to hold the candidates to
        return ranked
    for (v, speedup), ms in zip(ranked, times[1:]):
        if ms is None:
            skipped.append(Trial(label(v), None, speedup, f"skipped: could not be timed alone on {device}"))
        elif ms >= exact_ms:
            skipped.append(Trial(label(v), None, speedup,
                                 f"skipped: measured {ms:.3g} ms, not faster than exact ({exact_ms:.3g} ms) on {device}"))
        else:
            kept.append((ms, len(kept), v, speedup))
    return [(v, speedup) for _, _, v, speedup in sorted(kept, key=lambda k: k[:2])]


def _combine(choices: dict[str, SiteChoice], calibrator: _Calibrator, measure: Callable[[str], float],
             budget: float, deviation: float) -> float:  # fmt: skip
    """Runs the sites' choices together; while they exceed the budget, the chosen site with the largest deviation
    of its own goes back to exact. The combination's deviation (``deviation``, the reference's, if every site
    stayed exact)."""
    calibrator.assignment.update({name: c.variant for name, c in choices.items()})
    approximate = {name: c.tried[-1].deviation for name, c in choices.items() if not isinstance(c.variant, Exact)}
    if approximate:
        deviation = measure("the combination")
    while deviation > budget and approximate:  # back off the worst site, then measure again
        worst = max(approximate, key=approximate.get)
        del approximate[worst]
        choice = choices[worst]
        trial = choice.tried[-1]
        trial.verdict = f"backed off: the combination deviated {deviation:.1e}"
        choice.variant, choice.why = Exact(), f"{trial.variant} backed off: the combination exceeded the budget"
        calibrator.assignment[worst] = Exact()
        deviation = measure(f"the combination without {worst}")
    return deviation


def _search(name: str, ranked: list, skipped: list[Trial], calibrator: _Calibrator, measure: Callable[[str], float],
            budget: float) -> SiteChoice:  # fmt: skip
    """Site ``name``'s cheapest candidate within budget, the other sites as they are (exact)."""
    why = f"no candidate within budget {budget:.1e}" if ranked else "no approximate candidate to try"
    choice = SiteChoice(Exact(), why, list(skipped))
    for v, speedup in ranked:
        calibrator.assignment[name] = v
        try:
            dev = measure(f"{name} <- {label(v)}")
        except CaptureError as exc:
            choice.tried.append(Trial(label(v), None, speedup, f"failed: {exc}"))
            continue
        if dev <= budget:
            choice.tried.append(Trial(label(v), dev, speedup, "chosen"))
            choice.variant, choice.why = v, f"{label(v)} is the cheapest candidate within budget"
            break
        choice.tried.append(Trial(label(v), dev, speedup, "over budget"))
    calibrator.assignment[name] = Exact()
    return choice
