"""Site names: the module path, relative to the model the user passed, of the module a site was traced in.

Dynamo records, for every node, the stack of module calls it was traced under (``nn_module_stack``). Its
keys are ``str(id(module))`` (``"<id>@<n>"`` for the n-th repeated call in one frame) and its values are
``(source, class)``, where the source depends on how the frame reached the module: ``L['self'].layers.0``,
``L['args'][0].model.layers.0.self_attn`` (a Hugging Face wrapper passing the model to a compiled function),
``L['s'].attn1`` (a block's own frame after a graph break). :class:`SiteNamer` therefore resolves a node
by module and tensor identity against ``root.named_modules()``, so a name never depends on what dynamo
calls the graph's inputs:

1. the innermost stack entry's source, with its frame-input prefix (``L['s']``) replaced by that input's
   path in the root, found from the frame's lifted parameters (the graph's inputs are the real
   parameters; :class:`FrameInputs`), so one graph reused for another layer names that layer;
2. else the entry's module id, looked up among the root's modules (modules that are not lifted);
3. else a unique suffix match of the stripped source among the root's module paths of the same class;
4. else the stripped source itself (:func:`attnopt.patterns.module_path`, what a root-less backend uses).

A node traced in no module call is in the frame's own module (``L['self']``) when the frame is a
module's method; in a function frame passed parameters of the root (an attention function compiled on
its own after a graph break, as ``F.multi_head_attention_forward``), in the innermost module holding them
all; else at the top: ``""``, which detection reports as ``<top>``.

Limitation: a module without parameters or buffers that compiles as its own frame cannot be told apart
from the other instances its graph serves; its sites are named ``<top>``.
"""

from __future__ import annotations

import os
import re
import sys
from typing import Any

from torch import nn
from torch.fx import GraphModule, Node

from attnopt.patterns import module_path, normalize_source

_FRAME_INPUT = re.compile(r"^L(?:\[[^\]]+\])+")  # L['self'], L['args'][0], L['kwargs']['model']
OWNER = "<owner>"  # in FrameInputs.bases: the innermost module holding the tensors a function frame was passed


def compiled_root() -> nn.Module | None:
    """The module handed to ``torch.compile`` whose call is compiling now (the innermost such call on the
    Python stack), for a backend that was not told its model; None when a function was compiled."""
    from torch._dynamo.eval_frame import OptimizedModule

    frame = sys._getframe(1)
    while frame is not None:
        owner = frame.f_locals.get("self")
        if isinstance(owner, OptimizedModule):
            return owner._orig_mod
        frame = frame.f_back
    return None


class SiteNamer:
    """Names nodes of the graphs captured from ``root`` by module path (see the module docstring)."""

    def __init__(self, root: nn.Module):
        self.root = root
        self.paths = {id(m): name for name, m in root.named_modules()}
        self.classes = {name: type(m) for name, m in root.named_modules()}
        tensors = [*root.named_parameters(), *root.named_buffers()]
        self.tensor_paths = {id(t): name for name, t in tensors}

    def for_graph(self, gm: GraphModule, example_inputs: list | None) -> "GraphNamer":
        """The namer of ``gm``'s nodes when it runs on ``example_inputs``."""
        return GraphNamer(self, FrameInputs(self, gm, example_inputs or []).bases(example_inputs or []))

    def examples(self, n: int = 6) -> list[str]:
        """Up to ``n`` module paths that look like attention (by class or attribute name), for messages."""
        looks = [p for p, c in self.classes.items() if p and re.search("attn|attention", f"{p.rsplit('.', 1)[-1]} "
                                                                        f"{c.__name__}", re.I)]  # fmt: skip
        return (looks or [p for p in self.classes if p])[:n]

    def by_suffix(self, stripped: str, cls: Any) -> str | None:
        """The one module path of the root ending with ``stripped`` whose module is a ``cls``, if unique."""
        found = [p for p, c in self.classes.items()
                 if (p == stripped or p.endswith("." + stripped)) and (cls is None or c is cls)]  # fmt: skip
        return found[0] if len(found) == 1 else None


class FrameInputs:
    """The frame inputs of a graph that are modules of the root (``L['self']``, ``L['args'][0]``), each found
    through one of its lifted tensors. One compiled graph serves every module of the same structure (the
    layers of a stack compiled as their own frames), so their paths are read per call from the tensors
    passed: :meth:`bases` on a call's inputs says which module the graph runs for."""

    def __init__(self, namer: SiteNamer, gm: GraphModule, example_inputs: list):
        self.namer = namer
        self.where: dict[str, tuple[int, int]] = {}  # frame input -> (input index, length of the tensor's suffix)
        self.direct: list[int] = []  # inputs that are the root's tensors themselves
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        for i, (node, value) in enumerate(zip(placeholders, example_inputs)):
            full = namer.tensor_paths.get(id(value))
            source = getattr(getattr(node.meta.get("grapharg"), "source", None), "name", None)
            token = _FRAME_INPUT.match(source) if isinstance(source, str) and full is not None else None
            if token is None or token.group(0) in self.where:
                continue
            rest = normalize_source(source[token.end():])
            if not rest:  # a parameter passed as an argument (a function compiled as its own frame)
                self.direct.append(i)
            elif full == rest or full.endswith("." + rest):
                self.where[token.group(0)] = (i, len(rest))

    def bases(self, inputs: list | tuple) -> dict[str, str]:
        """Each frame input's module path for a call on ``inputs`` (inputs that are not the root's are left out)."""
        found = {}
        for token, (i, cut) in self.where.items():
            full = self.namer.tensor_paths.get(id(inputs[i])) if i < len(inputs) else None
            if full is not None:
                found[token] = full[: len(full) - cut].strip(".")
        owners = [self.namer.tensor_paths.get(id(inputs[i])) for i in self.direct if i < len(inputs)]
        if owners and None not in owners:  # the innermost module holding all of them
            found[OWNER] = ".".join(os.path.commonprefix([o.split(".")[:-1] for o in owners]))
        return found


class GraphNamer:
    """A :class:`SiteNamer` bound to one graph and its frame inputs' paths; call it with a node."""

    def __init__(self, namer: SiteNamer, bases: dict[str, str]):
        self.namer, self.bases = namer, bases

    def __call__(self, node: Node) -> str:
        stack = node.meta.get("nn_module_stack") or {}
        if not stack:
            return self.bases.get("L['self']", self.bases.get(OWNER, ""))
        key, (source, cls) = list(stack.items())[-1]
        token = _FRAME_INPUT.match(str(source))
        if token is not None and token.group(0) in self.bases:  # relative to the module this call runs for
            return ".".join(p for p in (self.bases[token.group(0)], normalize_source(str(source)[token.end():])) if p)
        module_id = str(key).split("@")[0]
        if module_id.isdigit() and int(module_id) in self.namer.paths:
            return self.namer.paths[int(module_id)]
        stripped = module_path(node)
        return self.namer.by_suffix(stripped, cls) or stripped


__all__ = ["FrameInputs", "GraphNamer", "SiteNamer", "compiled_root"]
