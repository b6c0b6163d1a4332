"""The pipeline: named lists of passes, each ``(GraphModule, Context) -> PassResult``.

    FULL:      dead-code -> detect -> decide -> rewrite -> validate -> check-graph
    INSPECT:   dead-code -> detect -> decide                      (what would be done; nothing rewritten)
    DETECT:    dead-code -> detect                                (auto's calibration: sites only)
    REWRITE:   decide -> rewrite                                  (a detected graph under another policy)
    UNCHECKED: dead-code -> detect -> decide -> rewrite           (decisions validated before: an export)

Each attention site is one :class:`SiteRecord` carried through the passes: what detection found, the
report's entry (decision, reason, deviation, what ran) and the variant it is rewritten with.

``detect`` and ``decide`` only annotate the context; ``rewrite`` returns a new GraphModule (the input
graph is never edited, so a rollback is a re-rewrite without the failing site); ``validate`` runs the
original graph once on the example inputs, evaluates each rewritten site on the very operands the
original saw, and rolls back any exact site whose output deviates beyond the dtype's tolerance.
Sites given a variant that changes the function (sparse, linear, ...) are measured and reported as
approximate, and rolled back only when they exceed the policy's ``max_error``. ``check-graph`` then
runs the original and the rewritten graph whole on (copies of) the example inputs: a deviation of the
outputs, or of the inputs the graph writes to, beyond the tolerance falls back to the original graph or
raises :class:`GraphDeviationError`, as ``Policy.on_deviation`` says.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable

import torch
from torch.fx import GraphModule, Interpreter, Node

from attnopt.errors import GraphDeviationError
from attnopt.kernels.exact import dispatch
from attnopt.patterns import Detection, detect
from attnopt.passes.purity import is_impure
from attnopt.patterns.match import AttentionMatch, copy_graph, emit_mask, original_graph, replacement_graph
from attnopt.policy import Keep, Policy
from attnopt.report import Miss, Site
from attnopt.timing import device_label, device_of, median_ms
from attnopt.variants.registry import handler_for

# Largest relative deviation (max |new - old| / max |old|) a rewritten site may show, per dtype.
TOLERANCE = {
    torch.float64: 1e-7,
    torch.float32: 1e-4,
    torch.float16: 1e-2,
    torch.bfloat16: 3e-2,
}


@dataclass
class PassResult:
    gm: GraphModule
    changed: bool
    detail: str = ""


@dataclass
class SiteRecord:
    """One attention site through the pipeline: its detection (and match), its report entry, and the variant
    it is rewritten with (``None``: written as the model wrote it). The report entry's ``variant`` is the
    policy's variant for the site (``Keep()`` when kept); ``variant`` here is the one emitted, which may be
    bound to what the site's example inputs showed (:meth:`attnopt.Linear.bind`)."""

    detection: Detection
    site: Site
    variant: Any = None

    @property
    def name(self) -> str:
        return self.site.name

    @property
    def match(self) -> AttentionMatch:
        return self.detection.match

    def choose(self, policy_variant: Any, variant: Any, reason: str) -> None:
        self.site.decision, self.site.reason, self.site.variant = policy_variant.name, reason, policy_variant
        self.variant = variant

    def keep(self, reason: str) -> None:
        self.site.decision, self.site.reason, self.site.variant = "keep", reason, Keep()
        self.variant = None

    def fresh(self) -> "SiteRecord":
        """The record before any decision (a copy of the report entry): to decide again under another policy."""
        return SiteRecord(self.detection, copy.copy(self.site))


@dataclass
class Context:
    policy: Policy
    graph_index: int = 0
    example_inputs: list | None = None
    records: list[SiteRecord] = field(default_factory=list)  # the graph's attention sites, in graph order
    misses: list[Miss] = field(default_factory=list)
    original: GraphModule | None = None
    name_of: Callable[[Node], str] | None = None  # a node's site name (default: its frame-relative module path)
    log: list[tuple[str, bool, str]] = field(default_factory=list)

    @property
    def sites(self) -> list[Site]:
        """The report entries of the graph's sites."""
        return [r.site for r in self.records]

    @property
    def chosen(self) -> list[SiteRecord]:
        """The sites being rewritten."""
        return [r for r in self.records if r.variant is not None]


def dead_code(gm: GraphModule, ctx: Context) -> PassResult:
    """Drops unused nodes, so an attention map computed and then discarded does not count as used."""
    changed = gm.graph.eliminate_dead_code(is_impure_node=is_impure)
    if changed:
        gm.recompile()
    ctx.original = gm
    return PassResult(gm, changed)


def detect_sites(gm: GraphModule, ctx: Context) -> PassResult:
    for d in detect(gm) if ctx.name_of is None else detect(gm, ctx.name_of):
        if d.match is None:
            ctx.misses.append(Miss(d.name, ctx.graph_index, d.anchor.name, d.reason or "not attention"))
        else:
            ctx.records.append(SiteRecord(d, Site.from_detection(d, ctx.graph_index)))
    return PassResult(gm, False, f"{len(ctx.records)} site(s), {len(ctx.misses)} miss(es)")


def decide(gm: GraphModule, ctx: Context) -> PassResult:
    """Gives each site the policy's variant, where the site can take it (else keeps it, saying why)."""
    masks = _site_masks(ctx)
    for r in ctx.records:
        if r.match.escape:
            r.keep(r.match.escape)
            continue
        chosen = variant = ctx.policy.for_site(r.name)
        if isinstance(variant, Keep):
            r.keep("policy: keep")
            continue
        if id(r.match) in masks:  # the variant reads the site's mask (bind)
            variant = variant.bind(r.match, masks[id(r.match)])
        handler = handler_for(variant)
        unsupported = handler.unsupported(variant, r.match)
        if unsupported:
            r.keep(f"{variant.name} not applicable: {unsupported}")
        else:
            r.choose(chosen, variant, handler.describe(variant, r.match))
    return PassResult(gm, False, f"{len(ctx.chosen)} site(s) chosen")


def _site_masks(ctx: Context) -> dict[int, torch.Tensor]:
    """The mask tensor of each site whose variant reads it (``needs_site_mask(match)``: linear attention's
    causal=None), computed on the example inputs in one run of the graph; keyed by ``id(match)``."""
    wanted = [r.match for r in ctx.records
              if getattr(ctx.policy.for_site(r.name), "needs_site_mask", lambda m: False)(r.match)]  # fmt: skip
    if not wanted or validation_skip(ctx.example_inputs) or ctx.original is None:
        return {}
    recorder = Recorder(ctx.original, {o for m in wanted for o in m.operands()})
    out = {}
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            recorder.run(*_copies(ctx.example_inputs))
            for m in wanted:
                sub, operands = replacement_graph(m, emit_mask)
                out[id(m)] = sub(*[recorder.values[o] for o in operands])
    except Exception:  # noqa: BLE001 - unread masks leave the variant unbound: it refuses the site by name
        return {}
    return out


def _emitter(r: SiteRecord) -> Callable:
    """How site ``r`` is written: its variant's emitter."""
    return partial(handler_for(r.variant).emit, r.variant)


def rewrite(gm: GraphModule, ctx: Context) -> PassResult:
    """A new GraphModule in which every chosen site is one ``torch.ops.attnopt`` call."""
    chosen = ctx.chosen
    if not chosen:
        return PassResult(ctx.original, False)
    graph, env = copy_graph(ctx.original.graph)
    lookup: Callable[[Any], Any] = lambda x: env[x] if isinstance(x, Node) else x  # noqa: E731
    for r in chosen:
        old = env[r.match.output]
        with graph.inserting_before(old):
            new = _emitter(r)(graph, r.match, lookup)
        old.replace_all_uses_with(new)
        env[r.match.output] = new  # a later site may read this one's output as an operand
    # The in-place writes a site read into its bias and masks write only into its own scores: dead with them.
    dead_writes = {env[n] for r in chosen for n in r.match.dead_writes}
    graph.eliminate_dead_code(is_impure_node=lambda n: n not in dead_writes and is_impure(n))
    graph.lint()
    out = GraphModule(ctx.original, graph, class_name=type(ctx.original).__name__)
    return PassResult(out, True, f"{len(chosen)} site(s) rewritten")


class Recorder(Interpreter):
    """Runs a graph and keeps the values of the ``wanted`` nodes (the original sites' outputs and operands)."""

    def __init__(self, gm: GraphModule, wanted: set):
        super().__init__(gm)
        self.wanted, self.values = wanted, {}

    def run_node(self, n: Node) -> Any:
        result = super().run_node(n)
        if n in self.wanted:
            self.values[n] = result
        return result


def deviation(new: torch.Tensor, old: torch.Tensor) -> float:
    """max |new - old| / max |old|, NaN-aware (NaN in one but not the other counts as infinite)."""
    new, old = new.detach().double(), old.detach().double()
    both_nan = new.isnan() & old.isnan()
    diff = (new - old).abs().masked_fill(both_nan, 0.0).nan_to_num(nan=float("inf"))
    scale = old.abs().masked_fill(old.isnan(), 0.0).max().clamp_min(1e-12) if old.numel() else 1.0
    return float(diff.max() / scale) if diff.numel() else 0.0


def _first_tensor(x: Any) -> torch.Tensor:
    return x[0] if isinstance(x, (tuple, list)) else x


def concrete(x: Any) -> Any:
    """A dynamic-shape graph's size inputs arrive as SymInts; validation runs on their hints."""
    if isinstance(x, (torch.SymInt, torch.SymFloat, torch.SymBool)) and x.node.has_hint():
        return x.node.hint
    return x


def validation_skip(example_inputs: list | None) -> str | None:
    """Why a graph's rewrites cannot be checked on its example inputs, or None when they can."""
    if example_inputs is None:
        return "no example inputs"
    if any(isinstance(x, torch._subclasses.FakeTensor) for x in example_inputs):
        return "example inputs are fake tensors"
    if any(isinstance(x, (torch.SymInt, torch.SymFloat, torch.SymBool)) and not x.node.has_hint() for x in example_inputs):
        return "example sizes are symbolic without a hint"
    return None


def validate(gm: GraphModule, ctx: Context) -> PassResult:
    """Checks every rewritten site against the original on the example inputs; rolls back deviants."""
    chosen = ctx.chosen
    skip = validation_skip(ctx.example_inputs)
    if not chosen or skip:
        for r in chosen:
            r.site.reason += f" (not validated: {skip})"
        return PassResult(gm, False, skip or "")
    recorder = Recorder(ctx.original, {n for r in chosen for n in (*r.match.operands(), r.match.output)})
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        recorder.run(*_copies(ctx.example_inputs))
        rolled_back = [r.name for r in chosen if _check_site(r, recorder.values, ctx.policy)]
        for r in ctx.chosen:  # the sites that stay rewritten: how fast each runs here, against the site as written
            _time_site(r, recorder.values, ctx.original)
    if not rolled_back:
        return PassResult(gm, False, "all sites within tolerance")
    return PassResult(rewrite(gm, ctx).gm, True, f"rolled back {rolled_back}")


def _check_site(r: SiteRecord, values: dict, policy: Policy) -> bool:
    """Runs site ``r``'s replacement on the operands the original saw (``values``) and measures its deviation
    from the original's output; rolls it back (returns True) when it cannot run or deviates too far."""
    if r.match.dropout_p > 0.0:
        r.site.reason += " (not validated: dropout is random)"
        return False
    want = _first_tensor(values[r.match.output])
    approximate = not handler_for(r.variant).exact(r.variant)
    tol = policy.max_error if approximate else TOLERANCE.get(want.dtype, 1e-4)
    sub, operands = replacement_graph(r.match, _emitter(r))
    try:
        with dispatch.record() as decisions:  # which implementation the exact op ran (SDPA dispatch)
            got = _first_tensor(sub(*[values[o] for o in operands]))
        r.site.runs = "; ".join(dict.fromkeys(d.describe() for d in decisions))
    except Exception as exc:  # a replacement that cannot run is a rollback, never a crash
        failure = f"rolled back: the replacement raised {type(exc).__name__}: {exc}"
    else:
        r.site.deviation = deviation(got, want)
        failure = None
        _record_facts(r)
        if approximate and tol is None:
            r.site.reason += f" (approximate: measured deviation {r.site.deviation:.2e})"
        elif approximate and r.site.deviation > tol:
            failure = f"rolled back: deviation {r.site.deviation:.2e} exceeds the policy's max_error {tol:.0e}"
        elif r.site.deviation > tol:
            failure = f"rolled back: deviation {r.site.deviation:.2e} exceeds the {want.dtype} tolerance {tol:.0e}"
    if failure:
        r.keep(failure)
    return failure is not None


def _record_facts(r: SiteRecord) -> None:
    """The handler's facts of the run just made (``Site.run_facts``), with a summary in the reason."""
    facts = handler_for(r.variant).run_facts(r.variant)
    if facts:
        r.site.run_facts = facts
        if "summary" in facts:
            r.site.reason += f" ({facts['summary']})"


def _time_site(r: SiteRecord, values: dict, root: GraphModule) -> None:
    """Measures site ``r`` on this device, on the operands the original saw: the site as written
    (``original_ms``) and its replacement (``rewritten_ms``). Left unmeasured when the written site cannot run
    alone, writes in place, or is random (dropout)."""
    original = original_graph(r.match, root)
    if original is None or r.match.dropout_p > 0.0:
        return
    written, operands = original
    if any(is_impure(n) for n in written.graph.nodes if n.op not in ("placeholder", "output", "get_attr")):
        return
    replacement, _ = replacement_graph(r.match, _emitter(r))
    args = [values[o] for o in operands]
    device = device_of(args)
    r.site.device = device_label(device)
    r.site.original_ms = median_ms(lambda: written(*args), device)
    r.site.rewritten_ms = median_ms(lambda: replacement(*args), device)


def _copies(example_inputs: list) -> list:
    """The example inputs for one validation run: tensors cloned (a graph may write into its inputs, and a
    run must neither see the previous run's writes nor change the caller's tensors), sizes concrete.
    Parameters are shared: a forward does not write into its weights, and a model's weights can be large."""
    return [x.clone() if isinstance(x, torch.Tensor) and not isinstance(x, torch.nn.Parameter) else concrete(x)
            for x in example_inputs]  # fmt: skip


def _run_whole(gm: GraphModule, example_inputs: list) -> list[torch.Tensor]:
    """``gm``'s tensor outputs followed by its (copied) tensor inputs after the run, which hold its in-place writes."""
    inputs = _copies(example_inputs)
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # both graphs draw the same random numbers outside the sites
        out = Interpreter(gm).run(*inputs)  # placeholder by placeholder (an exported graph's call takes pytrees)
    leaves = torch.utils._pytree.tree_leaves(out)
    return [t for t in leaves + inputs if isinstance(t, torch.Tensor)]


def _graph_deviation(want: list[torch.Tensor], got: list[torch.Tensor], budget: float | None) -> tuple[float, float]:
    """(deviation, bound) of the tensor furthest beyond its bound: ``budget``, else its dtype's tolerance.
    Integer and boolean tensors (indices, masks) must match exactly: (inf, 0) when they do not."""
    if len(want) != len(got):
        return float("inf"), 0.0
    measured = []
    for w, g in zip(want, got):
        if w.shape != g.shape or (not w.is_floating_point() and not torch.equal(w, g)):
            return float("inf"), 0.0
        if w.is_floating_point():
            measured.append((deviation(g, w), budget if budget is not None else TOLERANCE.get(w.dtype, 1e-4)))
    return max(measured, key=lambda m: m[0] / max(m[1], 1e-300), default=(0.0, 0.0))


def _check_skip(ctx: Context) -> str | None:
    skip = validation_skip(ctx.example_inputs)
    if skip is None and any(r.match.dropout_p > 0.0 for r in ctx.chosen):
        skip = "a site uses dropout, which is random"
    return skip


def check_graph(gm: GraphModule, ctx: Context) -> PassResult:
    """The whole-graph guarantee: the rewritten graph computes what the original computes, on the example inputs.

    Per-site validation compares each replacement with the site it replaces; this compares the graphs' outputs
    (and the inputs they write to), so any other change the passes made is held to the same bound. Exact
    rewrites are held to the dtype's tolerance, approximate ones to the policy's ``max_error``.
    """
    chosen = ctx.chosen
    if not chosen:
        return PassResult(gm, False, "nothing rewritten")
    skip = _check_skip(ctx)
    if skip is not None:
        for r in chosen:
            r.site.reason += f" (whole-graph check skipped: {skip})"
        return PassResult(gm, False, f"skipped: {skip}")
    approximate = any(not handler_for(r.variant).exact(r.variant) for r in chosen)
    if approximate and ctx.policy.max_error is None:
        return PassResult(gm, False, "approximate without max_error: nothing to hold the graph to")
    want = _run_whole(ctx.original, ctx.example_inputs)
    try:
        got = _run_whole(gm, ctx.example_inputs)
    except Exception as exc:  # a rewritten graph that cannot run is a deviation, never a crash
        worst, why = float("inf"), f"the rewritten graph raised {type(exc).__name__}: {exc}"
    else:
        worst, bound = _graph_deviation(want, got, ctx.policy.max_error if approximate else None)
        if worst <= bound:
            return PassResult(gm, False, f"whole graph within tolerance ({worst:.1e} <= {bound:.0e})")
        why = f"rewritten graph deviates {worst:.1e} > {bound:.0e} on the example inputs"
    if ctx.policy.on_deviation == "raise":
        raise GraphDeviationError(
            f"whole-graph check of graph {ctx.graph_index}: {why} (sites {sorted(r.name for r in chosen)}); "
            "use Policy(on_deviation='fallback') to keep the graph as written instead"
        )
    for r in chosen:
        r.keep(f"whole-graph check: {why}; graph kept as written")
    return PassResult(ctx.original, True, f"fell back to the original graph: {why}")


Pass = tuple[str, Callable[[GraphModule, Context], PassResult]]
DEAD_CODE: Pass = ("dead-code", dead_code)
DETECT_SITES: Pass = ("detect", detect_sites)
DECIDE: Pass = ("decide", decide)
REWRITE_SITES: Pass = ("rewrite", rewrite)
VALIDATE: Pass = ("validate", validate)
CHECK_GRAPH: Pass = ("check-graph", check_graph)

FULL: tuple[Pass, ...] = (DEAD_CODE, DETECT_SITES, DECIDE, REWRITE_SITES, VALIDATE, CHECK_GRAPH)
INSPECT: tuple[Pass, ...] = (DEAD_CODE, DETECT_SITES, DECIDE)
DETECT: tuple[Pass, ...] = (DEAD_CODE, DETECT_SITES)
REWRITE: tuple[Pass, ...] = (DECIDE, REWRITE_SITES)
UNCHECKED: tuple[Pass, ...] = (DEAD_CODE, DETECT_SITES, DECIDE, REWRITE_SITES)
PASSES = FULL  # the default pipeline


def run_pipeline(gm: GraphModule, ctx: Context, passes: tuple[Pass, ...] = FULL) -> GraphModule:
    """Runs ``passes`` (default: :data:`FULL`) in order; returns the final GraphModule."""
    for name, fn in passes:
        result = fn(gm, ctx)
        ctx.log.append((name, result.changed, result.detail))
        gm = result.gm
    return gm
