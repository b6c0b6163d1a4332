"""attnopt as a dynamo backend: ``torch.compile(model, backend="attnopt")``.

Every graph dynamo hands over (one per graph break, one per recompilation) runs through the pass
pipeline, then goes on to the next compiler: Inductor for the registered ``"attnopt"`` backend, or
plain eager execution of the rewritten graph (what :func:`attnopt.optimize` uses).
"""

from __future__ import annotations

from typing import Any, Callable

from torch.fx import GraphModule

from attnopt.breaks import BreakWatch
from attnopt.passes import PASSES, Context, run_pipeline
from attnopt.policy import Policy, as_policy
from attnopt.report import Report

_DETECT_ONLY = [p for p in PASSES if p[0] in ("dead-code", "detect", "decide")]


def _inductor(gm: GraphModule, example_inputs: list) -> Callable:
    from torch._inductor.compile_fx import compile_fx

    return compile_fx(gm, example_inputs)


def _eager(gm: GraphModule, example_inputs: list) -> Callable:
    return gm


class Backend:
    """A dynamo backend that runs attnopt's passes on each graph and records what it did in ``report``."""

    def __init__(self, policy: Any = None, then: str = "inductor", rewrite: bool = True, report: Report | None = None,
                 model: Any = None):  # fmt: skip
        if then not in ("inductor", "eager"):
            raise ValueError(f"then must be 'inductor' or 'eager', got {then!r}")
        self.policy: Policy = as_policy(policy)
        self.report = report if report is not None else Report()
        self.then = _inductor if then == "inductor" else _eager
        self.passes = PASSES if rewrite else _DETECT_ONLY
        self.contexts: list[Context] = []
        self.breaks = BreakWatch(model)  # ``model`` (optional) names the attention a graph break ran eagerly

    def note_breaks(self) -> None:
        """Records in the report the attention that graph breaks ran outside the captured graphs so far."""
        self.report.add_not_captured(self.breaks.new_entries())

    def __call__(self, gm: GraphModule, example_inputs: list) -> Callable:
        self.note_breaks()  # the break that ended this graph, and any before it
        ctx = Context(self.policy, graph_index=len(self.contexts), example_inputs=list(example_inputs))
        self.contexts.append(ctx)
        out = run_pipeline(gm, ctx, self.passes)
        self.report.merge_graph(ctx.sites, ctx.misses)
        return self.then(out, example_inputs)


def make_backend(policy: Any = "exact", then: str = "inductor") -> Backend:
    """A backend with a policy of your choice: ``torch.compile(m, backend=attnopt.make_backend(policy))``."""
    return Backend(policy, then=then)


def attnopt_backend(gm: GraphModule, example_inputs: list, **_options: Any) -> Callable:
    """The ``"attnopt"`` backend registered through the ``torch_dynamo_backends`` entry point (exact policy)."""
    return Backend("exact", then="inductor")(gm, example_inputs)


__all__ = ["Backend", "attnopt_backend", "make_backend"]
