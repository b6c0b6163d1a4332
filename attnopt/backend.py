"""attnopt as a dynamo backend: ``torch.compile(model, backend="attnopt")``.

Every graph dynamo hands over (one per graph break, one per recompilation) runs through the pass
pipeline, then goes on to the next compiler: Inductor for the registered ``"attnopt"`` backend, or
plain eager execution of the rewritten graph (what :func:`attnopt.optimize` uses).

Sites are named by module path relative to the model (:mod:`attnopt.naming`): the ``model`` given, else
the module whose ``torch.compile`` call is compiling (a compiled function that takes the model as an
argument names sites relative to that argument). A graph sees only its own sites, so policy globs are
checked here against the model's module paths, on the first graph: a glob that can match no module of
the model is an error at once. :func:`attnopt.optimize` and :func:`attnopt.inspect` check the globs
against the sites themselves once the first call's graphs are all captured. A graph compiled while a model
generates through a decode session (:mod:`attnopt.kernels.session`) is compiled with the session suspended.
"""

from __future__ import annotations

import fnmatch
from typing import Any, Callable

from torch import nn
from torch.fx import GraphModule

from attnopt.breaks import BreakWatch
from attnopt.kernels.session import suspended
from attnopt.naming import FrameInputs, GraphNamer, SiteNamer, compiled_root
from attnopt.passes import FULL, INSPECT, Context, run_pipeline
from attnopt.policy import Policy, as_policy
from attnopt.report import Report


def _inductor(gm: GraphModule, example_inputs: list) -> Callable:
    from torch._inductor.compile_fx import compile_fx

    return compile_fx(gm, example_inputs)


def _eager(gm: GraphModule, example_inputs: list) -> Callable:
    return gm


class Backend:
    """A dynamo backend that runs attnopt's passes on each graph and records what it did in ``report``."""

    def __init__(self, policy: Any = None, then: str = "inductor", rewrite: bool = True, report: Report | None = None,
                 model: nn.Module | None = None, check_globs: bool = True):  # fmt: skip
        if then not in ("inductor", "eager"):
            raise ValueError(f"then must be 'inductor' or 'eager', got {then!r}")
        self.policy: Policy = as_policy(policy)
        self.report = report if report is not None else Report()
        self.then = _inductor if then == "inductor" else _eager
        self.passes = FULL if rewrite else INSPECT
        self.contexts: list[Context] = []
        self.breaks = BreakWatch(model)  # ``model`` (optional) names the attention a graph break ran eagerly
        self.model = model
        self.check_globs = check_globs  # off where the caller checks globs against all sites (optimize, inspect)
        self.namers: dict[int, SiteNamer] = {}

    # dynamo names a backend in its errors by ``__name__`` or repr: ``backend='attnopt'``, not an object address
    __name__ = "attnopt"

    def __repr__(self) -> str:
        return "attnopt"

    def note_breaks(self) -> None:
        """Records in the report the attention that graph breaks ran outside the captured graphs so far."""
        self.report.add_not_captured(self.breaks.new_entries())

    def _namer(self) -> SiteNamer | None:
        root = self.model if self.model is not None else compiled_root()
        if root is None:
            return None
        if id(root) not in self.namers:
            self.namers[id(root)] = namer = SiteNamer(root)
            if self.check_globs:
                _check_globs_against_modules(self.policy, namer)
        return self.namers[id(root)]

    def __call__(self, gm: GraphModule, example_inputs: list) -> Callable:
        self.note_breaks()  # the break that ended this graph, and any before it
        namer = self._namer()
        if namer is None:
            return self._compile(gm, list(example_inputs), None)
        frames = FrameInputs(namer, gm, list(example_inputs))
        first = frames.bases(example_inputs)
        compiled = {tuple(first.items()): self._compile(gm, list(example_inputs), GraphNamer(namer, first))}
        if not frames.where and not frames.direct:
            return next(iter(compiled.values()))

        def run(*args: Any) -> Any:
            # the same graph serves every module of its structure: each module gets its own named, rewritten copy
            bases = frames.bases(args)
            key = tuple(bases.items())
            if key not in compiled:
                compiled[key] = self._compile(gm, list(args), GraphNamer(namer, bases))
            return compiled[key](*args)

        return run

    def _compile(self, gm: GraphModule, example_inputs: list, name_of: Callable | None) -> Callable:
        ctx = Context(self.policy, graph_index=len(self.contexts), example_inputs=example_inputs, name_of=name_of)
        self.contexts.append(ctx)
        with suspended():  # validation re-runs the sites, a compiler traces them: a decode session must see neither
            out = run_pipeline(gm, ctx, self.passes)
            self.report.merge_graph(ctx.sites, ctx.misses)
            return self.then(out, example_inputs)


def _check_globs_against_modules(policy: Policy, namer: SiteNamer) -> None:
    """A policy glob that matches no module path of the model (nor ``<top>``) can never pick a site."""
    paths = ["<top>", *namer.paths.values()]
    unmatched = [g for g, _ in policy.overrides if not any(fnmatch.fnmatchcase(p, g.split("#")[0]) for p in paths)]
    if unmatched:
        raise ValueError(f"policy override glob(s) {unmatched} match no module of {type(namer.root).__name__}, so no "
                         f"attention site; site names are module paths such as {namer.examples()}")


def make_backend(policy: Any = "exact", then: str = "inductor", model: nn.Module | None = None) -> Backend:
    """A backend with a policy of your choice: ``torch.compile(m, backend=attnopt.make_backend(policy))``.

    ``model``: the module site names are relative to (default: the module passed to ``torch.compile``)."""
    return Backend(policy, then=then, model=model)


def attnopt_backend(gm: GraphModule, example_inputs: list, **_options: Any) -> Callable:
    """The ``"attnopt"`` backend registered through the ``torch_dynamo_backends`` entry point (exact policy)."""
    return Backend("exact", then="inductor")(gm, example_inputs)


__all__ = ["Backend", "attnopt_backend", "make_backend"]
