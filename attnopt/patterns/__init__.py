"""Attention detection: every SDPA call, ``nn.MultiheadAttention`` and hand-written softmax attention.

:func:`detect` walks a graph once and returns a :class:`Detection` for every candidate: a match that can
be rewritten, a match that must be kept (an intermediate escapes), or a softmax that is not attention
as far as the matchers can tell (a *miss*, with the reason).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

import networkx as nx
from torch.fx import GraphModule, Node

from attnopt.patterns import canonical as C
from attnopt.patterns import manual, mha, sdpa
from attnopt.patterns.match import AttentionMatch


@dataclass
class Detection:
    name: str
    anchor: Node
    match: AttentionMatch | None
    reason: str | None  # why it is a miss (match is None) or must be kept (match.escape)


# What a frame calls its inputs: L['self'], L['args'][0], L['kwargs']['model'], L__self__, self, fn.
_FRAME_INPUT = re.compile(r"^(L(\[[^\]]+\])+|L__\w+?__|self|fn)(?=\.|$)")


def normalize_source(source: str) -> str:
    """A dynamo source as a dotted path: ``._modules['a'][0]`` and ``.__dict__['_modules']['a']`` -> ``.a.0``."""
    path = re.sub(r"\[(\d+)\]", r".\1", source)
    path = re.sub(r"\[['\"]([^'\"]+)['\"]\]", r".\1", path)
    path = re.sub(r"\.(?:__dict__\.)?_(?:modules|parameters|buffers)(?=\.)", "", path)
    return path.strip(".")


def module_path(node: Node) -> str:
    """The dotted path, relative to its frame's input, of the innermost module ``node`` was traced in ("" at
    the frame's top). Detection's default naming; entry points that know the model name by module identity
    (:mod:`attnopt.naming`)."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path = str(list(stack.values())[-1][0])
    return normalize_source(_FRAME_INPUT.sub("", path))


def dataflow(gm: GraphModule) -> nx.DiGraph:
    """The graph's data flow (node -> users); ``dag.graph["order"]`` is each node's position."""
    dag = nx.DiGraph()
    dag.graph["order"] = {}
    for i, n in enumerate(gm.graph.nodes):
        dag.graph["order"][n] = i
        dag.add_node(n)
        for user in n.users:
            dag.add_edge(n, user)
    return dag


def detect(gm: GraphModule, name_of: Callable[[Node], str] = module_path) -> list[Detection]:
    """Every candidate of ``gm``, named by ``name_of(anchor)`` ("" is ``<top>``; repeats get ``#1``, ``#2``)."""
    dag = dataflow(gm)
    found: list[Detection] = []
    for node in gm.graph.nodes:
        op = C.classify(node)
        if op is None or op.kind not in (C.SDPA, C.MHA, C.ENCODER_LAYER, C.NATIVE_MHA, C.SOFTMAX):
            continue
        try:
            if op.kind == C.SOFTMAX:
                m, reason = manual.match(node, dag), None
            elif op.kind == C.NATIVE_MHA:
                m, reason = None, "torch._native_multi_head_attention (a MultiheadAttention fast path) is not rewritten"
            else:
                res = (sdpa if op.kind == C.SDPA else mha).match(node)
                m, reason = (res, None) if isinstance(res, AttentionMatch) else (None, res)
        except manual.Miss as miss:
            m, reason = None, str(miss)
        except Exception as exc:  # a matcher bug must not take the model down: the site is reported
            m, reason = None, f"attnopt could not analyze this site ({type(exc).__name__}: {exc}); please report it"
        if m is not None and m.escape:
            reason = m.escape
        found.append(Detection(name_of(node) or "<top>", node, m, reason))
    counts: dict[str, int] = {}
    for d in found:
        counts[d.name] = counts.get(d.name, 0) + 1
    seen: dict[str, int] = {}
    for d in found:
        if counts[d.name] > 1:
            seen[d.name] = seen.get(d.name, 0) + 1
            d.name = f"{d.name}#{seen[d.name]}"
    return found


__all__ = ["Detection", "detect", "module_path", "normalize_source"]
