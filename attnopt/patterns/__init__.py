"""Attention detection: every SDPA call, ``nn.MultiheadAttention`` and hand-written softmax attention.

:func:`detect` walks a graph once and returns a :class:`Detection` for every candidate: a match that can
be rewritten, a match that must be kept (an intermediate escapes), or a softmax that is not attention
as far as the matchers can tell (a *miss*, with the reason). The candidates are the nodes whose op
kind has a matcher in :data:`MATCHERS`; every matcher returns an
:class:`~attnopt.patterns.match.AttentionMatch` or raises :class:`~attnopt.patterns.match.Miss`.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from typing import Callable

import networkx as nx
from torch.fx import GraphModule, Node

from attnopt.patterns import manual, mha, sdpa
from attnopt.patterns.canonical import ENCODER_LAYER, MHA, NATIVE_MHA, SDPA, SOFTMAX, classify
from attnopt.patterns.match import AttentionMatch, Miss
from attnopt.patterns.score_terms import with_score_terms


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


# A matcher: (the anchor node, the graph's data flow) -> the match; raises Miss with the reason otherwise.
Matcher = Callable[[Node, nx.DiGraph], AttentionMatch]
# The matchers by the op kind of the node they start from (see attnopt.patterns.canonical).
MATCHERS: dict[str, Matcher] = {
    SDPA: sdpa.match,
    MHA: mha.match,
    ENCODER_LAYER: mha.match_encoder_layer,
    NATIVE_MHA: mha.refuse_native,
    SOFTMAX: manual.match,
}


def _detection(node: Node, matcher: Matcher, dag: nx.DiGraph, name: str) -> Detection:
    try:
        m = with_score_terms(matcher(node, dag))
    except Miss as miss:
        return Detection(name, node, None, str(miss))
    except Exception as exc:  # a matcher bug must not take the model down: the site is reported
        reason = f"attnopt could not analyze this site ({type(exc).__name__}: {exc}); please report it"
        return Detection(name, node, None, reason)
    return Detection(name, node, m, m.escape)


def _numbered(names: list[str]) -> list[str]:
    """Names that repeat get ``#1``, ``#2``, ... in order."""
    counts = Counter(names)
    seen: dict[str, int] = {}
    out = []
    for n in names:
        seen[n] = seen.get(n, 0) + 1
        out.append(f"{n}#{seen[n]}" if counts[n] > 1 else n)
    return out


def detect(gm: GraphModule, name_of: Callable[[Node], str] = module_path) -> list[Detection]:
    """Every candidate of ``gm``, named by ``name_of(anchor)`` ("" is ``<top>``; repeats get ``#1``, ``#2``)."""
    dag = dataflow(gm)
    anchors = []
    for node in gm.graph.nodes:
        op = classify(node)
        if op is not None and op.kind in MATCHERS:
            anchors.append((node, MATCHERS[op.kind]))
    names = _numbered([name_of(node) or "<top>" for node, _ in anchors])
    return [_detection(node, matcher, dag, name) for (node, matcher), name in zip(anchors, names)]


__all__ = ["MATCHERS", "Detection", "Matcher", "Miss", "detect", "module_path", "normalize_source"]
