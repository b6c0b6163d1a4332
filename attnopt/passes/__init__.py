"""The pipeline: one ordered list of named passes, each ``(GraphModule, Context) -> PassResult``.

    dead-code -> detect -> decide -> rewrite -> validate -> check-graph

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

from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable

import torch
from torch.fx import GraphModule, Interpreter, Node

from attnopt.errors import GraphDeviationError
from attnopt.kernels.exact import dispatch
from attnopt.patterns import Detection, detect
from attnopt.passes.purity import is_impure
from attnopt.patterns.match import AttentionMatch, copy_graph, emit, emit_mask, replacement_graph
from attnopt.policy import Exact, Keep, Policy
from attnopt.report import Miss, Site
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
class Context:
    policy: Policy
    graph_index: int = 0
    example_inputs: list | None = None
    detections: list[Detection] = field(default_factory=list)
    sites: list[Site] = field(default_factory=list)
    misses: list[Miss] = field(default_factory=list)
    chosen: dict[str, AttentionMatch] = field(default_factory=dict)  # site name -> match to rewrite
    variants: dict[str, Any] = field(default_factory=dict)  # site name -> variant, for non-exact variants
    original: GraphModule | None = None
    name_of: Callable[[Node], str] | None = None  # a node's site name (default: its frame-relative module path)
    log: list[tuple[str, bool, str]] = field(default_factory=list)


def dead_code(gm: GraphModule, ctx: Context) -> PassResult:
    """Drops unused nodes, so an attention map computed and then discarded does not count as used."""
    changed = gm.graph.eliminate_dead_code(is_impure_node=is_impure)
    if changed:
        gm.recompile()
    ctx.original = gm
    return PassResult(gm, changed)


def detect_sites(gm: GraphModule, ctx: Context) -> PassResult:
    ctx.detections = detect(gm) if ctx.name_of is None else detect(gm, ctx.name_of)
    for d in ctx.detections:
        if d.match is None:
            ctx.misses.append(Miss(d.name, ctx.graph_index, d.anchor.name, d.reason or "not attention"))
        else:
            ctx.sites.append(Site.from_detection(d, ctx.graph_index))
    return PassResult(gm, False, f"{len(ctx.sites)} site(s), {len(ctx.misses)} miss(es)")


def decide(gm: GraphModule, ctx: Context) -> PassResult:
    matched = [d for d in ctx.detections if d.match is not None]
    masks = _site_masks(ctx, matched)
    for d, site in zip(matched, ctx.sites):
        if d.match.escape:
            site.decision, site.reason = "keep", d.match.escape
            continue
        variant = ctx.policy.for_site(site.name)
        if isinstance(variant, Keep):
            site.decision, site.reason = "keep", "policy: keep"
        elif isinstance(variant, Exact):
            site.decision, site.reason = "exact", "fused attnopt kernel, same function"
            ctx.chosen[site.name] = d.match
        else:
            if id(d.match) in masks:  # the variant reads the site's mask (bind)
                variant = variant.bind(d.match, masks[id(d.match)])
            handler = handler_for(variant)
            unsupported = handler.unsupported(variant, d.match)
            if unsupported:
                site.decision, site.reason = "keep", f"{variant.name} not applicable: {unsupported}"
                continue
            site.decision, site.reason = variant.name, handler.describe(variant, d.match)
            ctx.chosen[site.name] = d.match
            ctx.variants[site.name] = variant
    return PassResult(gm, False, f"{len(ctx.chosen)} site(s) chosen")


def _site_masks(ctx: Context, matched: list) -> dict[int, torch.Tensor]:
    """The mask tensor of each site whose variant reads it (``needs_site_mask(match)``: linear attention's
    causal=None), computed on the example inputs in one run of the graph; keyed by ``id(match)``."""
    wanted = [d.match for d, site in zip(matched, ctx.sites)
              if getattr(ctx.policy.for_site(site.name), "needs_site_mask", lambda m: False)(d.match)]  # fmt: skip
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


def _emitter(ctx: Context, name: str) -> Callable:
    """How site ``name`` is written: its variant's emitter, or the exact op call."""
    variant = ctx.variants.get(name)
    return partial(handler_for(variant).emit, variant) if variant is not None else emit


def rewrite(gm: GraphModule, ctx: Context) -> PassResult:
    """A new GraphModule in which every chosen site is one ``torch.ops.attnopt`` call."""
    if not ctx.chosen:
        return PassResult(ctx.original, False)
    graph, env = copy_graph(ctx.original.graph)
    lookup: Callable[[Any], Any] = lambda x: env[x] if isinstance(x, Node) else x  # noqa: E731
    for name, m in ctx.chosen.items():
        old = env[m.output]
        with graph.inserting_before(old):
            new = _emitter(ctx, name)(graph, m, lookup)
        old.replace_all_uses_with(new)
        env[m.output] = new  # a later site may read this one's output as an operand
    graph.eliminate_dead_code(is_impure_node=is_impure)
    graph.lint()
    out = GraphModule(ctx.original, graph, class_name=type(ctx.original).__name__)
    return PassResult(out, True, f"{len(ctx.chosen)} site(s) rewritten")


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
    skip = validation_skip(ctx.example_inputs)
    if not ctx.chosen or skip:
        if skip and ctx.chosen:
            for site in _chosen_sites(ctx):
                site.reason += f" (not validated: {skip})"
        return PassResult(gm, False, skip or "")
    wanted = set()
    for m in ctx.chosen.values():
        wanted.update(m.operands())
        wanted.add(m.output)
    recorder = Recorder(ctx.original, wanted)
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        recorder.run(*_copies(ctx.example_inputs))
        rolled_back = []
        for site in ctx.sites:
            m = ctx.chosen.get(site.name)
            if m is None:
                continue
            if m.dropout_p > 0.0:
                site.reason += " (not validated: dropout is random)"
                continue
            want = _first_tensor(recorder.values[m.output])
            variant = ctx.variants.get(site.name)
            approximate = variant is not None and not handler_for(variant).exact(variant)
            tol = ctx.policy.max_error if approximate else TOLERANCE.get(want.dtype, 1e-4)
            sub, operands = replacement_graph(m, _emitter(ctx, site.name))
            try:
                with dispatch.record() as decisions:  # which implementation the exact op ran (SDPA dispatch)
                    got = _first_tensor(sub(*[recorder.values[o] for o in operands]))
                site.runs = "; ".join(dict.fromkeys(d.describe() for d in decisions))
            except Exception as exc:  # a replacement that cannot run is a rollback, never a crash
                failure = f"rolled back: the replacement raised {type(exc).__name__}: {exc}"
            else:
                site.deviation = deviation(got, want)
                failure = None
                if approximate and tol is None:
                    site.reason += f" (approximate: measured deviation {site.deviation:.2e})"
                elif approximate and site.deviation > tol:
                    failure = f"rolled back: deviation {site.deviation:.2e} exceeds the policy's max_error {tol:.0e}"
                elif site.deviation > tol:
                    failure = f"rolled back: deviation {site.deviation:.2e} exceeds the {want.dtype} tolerance {tol:.0e}"
            if failure:
                site.decision, site.reason = "keep", failure
                rolled_back.append(site.name)
                ctx.variants.pop(site.name, None)
    if not rolled_back:
        return PassResult(gm, False, "all sites within tolerance")
    for name in rolled_back:
        del ctx.chosen[name]
    return PassResult(rewrite(gm, ctx).gm, True, f"rolled back {rolled_back}")


def _chosen_sites(ctx: Context) -> list[Site]:
    """The report entries of the sites chosen for rewriting."""
    return [site for site in ctx.sites if site.name in ctx.chosen]


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
    if skip is None and any(m.dropout_p > 0.0 for m in ctx.chosen.values()):
        skip = "a site uses dropout, which is random"
    return skip


def check_graph(gm: GraphModule, ctx: Context) -> PassResult:
    """The whole-graph guarantee: the rewritten graph computes what the original computes, on the example inputs.

    Per-site validation compares each replacement with the site it replaces; this compares the graphs' outputs
    (and the inputs they write to), so any other change the passes made is held to the same bound. Exact
    rewrites are held to the dtype's tolerance, approximate ones to the policy's ``max_error``.
    """
    if not ctx.chosen:
        return PassResult(gm, False, "nothing rewritten")
    skip = _check_skip(ctx)
    if skip is not None:
        for site in _chosen_sites(ctx):
            site.reason += f" (whole-graph check skipped: {skip})"
        return PassResult(gm, False, f"skipped: {skip}")
    approximate = any(not handler_for(v).exact(v) for v in ctx.variants.values())
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
            f"whole-graph check of graph {ctx.graph_index}: {why} (sites {sorted(ctx.chosen)}); "
            "use Policy(on_deviation='fallback') to keep the graph as written instead"
        )
    for site in _chosen_sites(ctx):
        site.decision, site.reason = "keep", f"whole-graph check: {why}; graph kept as written"
    ctx.chosen.clear()
    ctx.variants.clear()
    return PassResult(ctx.original, True, f"fell back to the original graph: {why}")


PASSES: list[tuple[str, Callable[[GraphModule, Context], PassResult]]] = [
    ("dead-code", dead_code),
    ("detect", detect_sites),
    ("decide", decide),
    ("rewrite", rewrite),
    ("validate", validate),
    ("check-graph", check_graph),
]


def run_pipeline(gm: GraphModule, ctx: Context, passes=None) -> GraphModule:
    """Runs ``passes`` (default: all of :data:`PASSES`) in order; returns the final GraphModule."""
    for name, fn in passes if passes is not None else PASSES:
        result = fn(gm, ctx)
        ctx.log.append((name, result.changed, result.detail))
        gm = result.gm
    return gm
