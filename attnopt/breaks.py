"""Attention that ran outside every captured graph: dynamo's graph breaks inside attention code.

Dynamo records each graph break with the user stack it happened at (``torch._dynamo.utils.graph_break_reasons``).
A break inside an attention module's forward (``nn.MultiheadAttention`` warning about a float ``attn_mask``
with a boolean ``key_padding_mask``, a data-dependent branch, an untraceable call) runs that attention
eagerly, where no pass sees it; :class:`BreakWatch` turns those breaks into the report's not-captured entries.
"""

from __future__ import annotations

import inspect
from typing import Any, Iterable

import torch
from torch import nn

from attnopt.report import NotCaptured

# Attention code every model may run: (label, function). The model's own attention modules are added per model.
_KNOWN = (("MultiheadAttention", nn.MultiheadAttention.forward),
          ("multi_head_attention_forward", torch.nn.functional.multi_head_attention_forward))  # fmt: skip
_WORDS = ("attention", "attn")


def _span(fn: Any) -> tuple[str, int, int] | None:
    """(file, first line, last line) of ``fn``'s source, or None when it has none (builtins)."""
    fn = inspect.unwrap(fn)
    try:
        lines, first = inspect.getsourcelines(fn)
        return inspect.getsourcefile(fn) or "", first, first + len(lines) - 1
    except (OSError, TypeError):
        return None


def _model_spans(model: nn.Module | None) -> list[tuple[str, tuple[str, int, int]]]:
    """(label, span) of the forward of each attention module of ``model``: ``nn.MultiheadAttention`` or a class
    whose name says attention. The label is the module's path when one module has that class, else the class."""
    if model is None:
        return []
    paths: dict[type, list[str]] = {}
    for path, mod in model.named_modules():
        cls = type(mod)
        if isinstance(mod, nn.MultiheadAttention) or any(w in cls.__name__.lower() for w in _WORDS):
            paths.setdefault(cls, []).append(path or "<top>")
    spans = []
    for cls, names in paths.items():
        span = _span(cls.forward)
        if span is not None:
            spans.append((names[0] if len(names) == 1 else f"{cls.__name__} ({len(names)} modules)", span))
    return spans


def _reason(text: str) -> str:
    """Dynamo's reason in one line: its headline and its explanation."""
    lines = [ln.strip() for ln in str(text).splitlines() if ln.strip()]
    if not lines:
        return "graph break"
    explanation = next((ln.removeprefix("Explanation:").strip() for ln in lines if ln.startswith("Explanation:")), "")
    return f"{lines[0]}: {explanation}" if explanation else lines[0]


class BreakWatch:
    """The graph breaks dynamo records after this watch is made, read as attention that was not captured."""

    def __init__(self, model: nn.Module | None = None):
        # id -> reason: holding the reasons keeps their ids unique even after dynamo's list is cleared
        self._seen = {id(r): r for r in torch._dynamo.utils.graph_break_reasons}
        self._spans = _model_spans(model) + [(label, s) for label, fn in _KNOWN if (s := _span(fn)) is not None]

    def _label(self, frames: Iterable) -> str | None:
        """The attention the innermost attention frame of a break's stack belongs to, if any."""
        for frame in reversed(list(frames)):
            for label, (file, first, last) in self._spans:
                if frame.filename == file and first <= (frame.lineno or 0) <= last:
                    return label
            if any(w in frame.name.lower() for w in _WORDS):
                return frame.name
        return None

    def new_entries(self) -> list[NotCaptured]:
        """One entry per graph break since the last call whose stack passes through attention code."""
        entries = []
        for r in list(torch._dynamo.utils.graph_break_reasons):
            if id(r) in self._seen:
                continue
            self._seen[id(r)] = r
            label = self._label(r.user_stack)
            if label is not None:
                at = f"{r.user_stack[-1].filename}:{r.user_stack[-1].lineno}" if r.user_stack else "?"
                entries.append(NotCaptured(label, at, _reason(r.reason)))
        return entries


__all__ = ["BreakWatch"]
