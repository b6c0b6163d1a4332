"""Helpers shared by the detection tests: attnopt's passes run one by one, the graph linted after each,
on dynamo's graphs (as a backend) or on a symbolically traced module."""

from __future__ import annotations

import torch
from torch import nn
from torch.fx import GraphModule, Interpreter, symbolic_trace

from attnopt import passes
from attnopt.policy import Policy


def run_passes(gm: GraphModule, ctx: passes.Context) -> GraphModule:
    """``gm`` through every pass of the pipeline in order, linting the graph after each."""
    for _, fn in passes.FULL:
        gm = fn(gm, ctx).gm
        gm.graph.lint()
    return gm


def pipeline_backend(contexts: list):
    """A dynamo backend running :func:`run_passes` on each graph (default policy); it appends each
    graph's context to ``contexts``, with the rewritten module in ``ctx.final``."""

    def backend(gm, example_inputs):
        ctx = passes.Context(Policy(), graph_index=len(contexts), example_inputs=list(example_inputs))
        contexts.append(ctx)
        ctx.final = run_passes(gm, ctx)
        return ctx.final

    return backend


def capture(module, *args, fullgraph=True):
    """Compiles ``module`` with :func:`pipeline_backend` from a fresh dynamo and runs it on ``args``
    without grad; returns (the contexts, one per graph, the output)."""
    contexts = []
    torch._dynamo.reset()
    with torch.no_grad():
        out = torch.compile(module, backend=pipeline_backend(contexts), fullgraph=fullgraph)(*args)
    return contexts, out


def with_meta(gm: GraphModule, args) -> None:
    """Records each node's example value in ``meta["val"]``, as make_fx would."""

    class Meta(Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            n.meta["val"] = out
            return out

    Meta(gm).run(*args)


def run_pipeline(module: nn.Module, args) -> tuple[GraphModule, passes.Context]:
    """``module`` symbolically traced, its nodes given example values, through :func:`run_passes`."""
    gm = symbolic_trace(module)
    with_meta(gm, args)
    ctx = passes.Context(Policy(), example_inputs=list(args))
    return run_passes(gm, ctx), ctx
