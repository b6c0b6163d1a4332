"""The report: every attention site attnopt found, what it decided and why, and every softmax it missed."""

from __future__ import annotations

import io
import json
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from attnopt.patterns import Detection
from attnopt.patterns.canonical import tensor_meta
from attnopt.patterns.match import CAUSAL_NAMES


def _dim(x: Any) -> Any:
    return int(x) if isinstance(x, int) or (isinstance(x, torch.SymInt) and x.node.has_hint()) else str(x)


@dataclass
class Trial:
    """One candidate the auto policy tried at a site: its model-output deviation and the verdict."""

    variant: str
    deviation: float | None  # max relative deviation of the model's outputs; None when not measured
    predicted_speedup: float | None
    verdict: str  # "chosen", "over budget", "backed off: ...", "not applicable: ...", "failed: ...", ...


@dataclass
class Site:
    """One attention site: where it is, what it computes, and what attnopt did with it."""

    name: str
    kind: str  # "sdpa" | "manual" | "mha"
    graph: int  # index of the captured graph it lives in
    node: str = ""  # the anchor node (SDPA call, softmax, MHA call) in that graph
    decision: str = "pending"  # "exact" | "keep"
    reason: str = ""
    heads: tuple = ()  # (query heads, key/value heads)
    head_dims: tuple = ()  # (D, Dv)
    seq: tuple = ()  # (Sq, Sk)
    batch: Any = None
    scale: float | None = None
    mask: str = "none"
    causal: str = "none"
    dropout_p: float = 0.0
    layout: str = ""
    dtype: str = ""
    deviation: float | None = None  # measured relative deviation from the original on the example inputs
    predicted_speedup: float | None = None  # cost model: the site as written over the decision, at the target length
    runs: str = ""  # exact sites: the implementation that ran on the example inputs (SDPA dispatch), and by how much
    tried: list[Trial] = field(default_factory=list)  # the auto policy's candidates at this site

    @classmethod
    def from_detection(cls, d: Detection, graph: int) -> "Site":
        m = d.match
        site = cls(name=d.name, kind=m.kind, graph=graph, node=d.anchor.name, scale=m.scale, mask=m.mask_kind,
                   causal=CAUSAL_NAMES[m.causal], dropout_p=m.dropout_p)  # fmt: skip
        q, k, v = tensor_meta(m.q), tensor_meta(m.k), tensor_meta(m.v)
        if q is not None:
            site.dtype = str(q.dtype).replace("torch.", "")
        if "heads" in m.info:
            site.heads, site.head_dims, site.layout = m.info["heads"], m.info["head_dims"], m.info["layout"]
            if "seq" in m.info:  # the pattern knows its layout (manual, sdpa, mha)
                site.seq, site.batch = m.info["seq"], m.info.get("batch")
                return site
            site.seq = (_dim(q.shape[0]), _dim(k.shape[0])) if q is not None and k is not None else ()
            site.batch = _dim(q.shape[1]) if q is not None else None
            return site
        if q is None or k is None or v is None:
            return site
        sk = k.shape[-1] if m.k_transposed else k.shape[-2]
        site.head_dims = (_dim(q.shape[-1]), _dim(v.shape[-1]))
        site.seq = (_dim(q.shape[-2]), _dim(sk))
        if q.dim() == 4:
            site.batch, site.heads = _dim(q.shape[0]), (_dim(q.shape[1]), _dim(k.shape[1]))
            stored_seq_major = q.shape[1] > 1 and q.shape[2] > 1 and q.stride(1) < q.stride(2)
            site.layout = "BSHD" if stored_seq_major else "BHSD"
        else:
            site.batch, site.heads, site.layout = None, (_dim(q.shape[0]), _dim(k.shape[0])), "(B*H)SD"
        return site


@dataclass
class Miss:
    """A softmax (or attention call) that attnopt did not recognize as a rewritable attention site."""

    name: str
    graph: int
    node: str
    reason: str


@dataclass
class NotCaptured:
    """Attention that ran outside every captured graph: a graph break inside it ran it eagerly, unseen."""

    name: str  # the attention module's path (or its class, or the attention function)
    at: str  # file:line of the graph break
    reason: str  # dynamo's reason for the break


@dataclass
class Report:
    sites: list[Site] = field(default_factory=list)
    misses: list[Miss] = field(default_factory=list)
    not_captured: list[NotCaptured] = field(default_factory=list)
    graphs: int = 0
    output_deviation: float | None = None  # max relative output difference, original vs optimized
    notes: list[str] = field(default_factory=list)

    def merge_graph(self, sites: list[Site], misses: list[Miss]) -> None:
        """Adds one captured graph's sites, replacing those a recompilation of the same code found again
        (same site name and anchor node)
        (which keep the predicted speedup and the candidates the auto policy tried)."""
        keys = {(s.name, s.node) for s in sites}
        previous = {(s.name, s.node): s for s in self.sites}
        for new in sites:
            if (new.name, new.node) in previous:
                old = previous[(new.name, new.node)]
                new.predicted_speedup, new.tried = old.predicted_speedup, old.tried
        self.sites = [s for s in self.sites if (s.name, s.node) not in keys] + sites
        miss_keys = {(m.name, m.node) for m in misses}
        self.misses = [m for m in self.misses if (m.name, m.node) not in miss_keys] + misses
        self.graphs += 1

    def add_not_captured(self, entries: list[NotCaptured]) -> None:
        """Adds attention that ran outside the captured graphs, once per (name, break location)."""
        known = {(n.name, n.at) for n in self.not_captured}
        for entry in entries:
            if (entry.name, entry.at) not in known:
                self.not_captured.append(entry)
                known.add((entry.name, entry.at))

    def site(self, name: str) -> Site:
        for s in self.sites:
            if s.name == name:
                return s
        raise KeyError(f"no attention site named {name!r}; sites: {[s.name for s in self.sites]}")

    def to_dict(self) -> dict:
        return {
            "graphs": self.graphs,
            "output_deviation": self.output_deviation,
            "sites": [asdict(s) for s in self.sites],
            "misses": [asdict(m) for m in self.misses],
            "not_captured": [asdict(n) for n in self.not_captured],
            "notes": list(self.notes),
        }

    def to_json(self, **kwargs) -> str:
        return json.dumps(self.to_dict(), indent=2, default=str, **kwargs)

    def __str__(self) -> str:
        from rich.console import Console
        from rich.table import Table

        table = Table(title=f"attnopt: {len(self.sites)} attention site(s) in {self.graphs} graph(s)",
                      caption="heads q/kv, dims qk/v, seq q/k")
        tried = any(s.tried for s in self.sites)
        for col in ("site", "kind", "decision", "heads", "dims", "seq", "mask", "causal", "layout", "deviation",
                    "speedup (pred.)", "runs", "reason", *(("tried",) if tried else ())):  # fmt: skip
            # the prose columns fold; names and numbers stay on one line (and stay searchable)
            table.add_column(col, overflow="fold", no_wrap=col not in ("runs", "reason", "tried"))
        for s in self.sites:
            dev = "-" if s.deviation is None else f"{s.deviation:.1e}"
            speedup = "-" if s.predicted_speedup is None else f"{s.predicted_speedup:.2f}x"
            row = [s.name, s.kind, s.decision, "/".join(map(str, s.heads)), "/".join(map(str, s.head_dims)),
                   "/".join(map(str, s.seq)), s.mask, s.causal, s.layout, dev, speedup, s.runs or "-",
                   s.reason]  # fmt: skip
            if tried:
                row.append("; ".join(f"{t.variant} {_short(t.deviation)} {t.verdict}" for t in s.tried) or "-")
            table.add_row(*row)
        buf = io.StringIO()
        console = Console(file=buf, width=160, force_terminal=False, color_system=None)
        console.print(table)
        if self.misses:
            misses = Table(title=f"{len(self.misses)} softmax(es) not rewritten")
            for col in ("where", "node", "reason"):
                misses.add_column(col, overflow="fold")
            for m in self.misses:
                misses.add_row(m.name, m.node, m.reason)
            console.print(misses)
        if self.not_captured:
            title = f"{len(self.not_captured)} attention call(s) not captured (a graph break ran them eagerly)"
            lost = Table(title=title)
            for col in ("where", "graph break at", "reason"):
                lost.add_column(col, overflow="fold")
            for n in self.not_captured:
                lost.add_row(n.name, n.at, n.reason)
            console.print(lost)
        if self.output_deviation is not None:
            console.print(f"max relative output difference vs the original: {self.output_deviation:.2e}")
        for note in self.notes:
            console.print(f"note: {note}")
        return buf.getvalue().rstrip()

    __repr__ = __str__


def _short(x: float | None) -> str:
    return "-" if x is None else f"{x:.1e}"
