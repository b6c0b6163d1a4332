"""The report: every attention site attnopt found, what it decided and why, and every softmax it missed."""

from __future__ import annotations

import io
import json
import os
from dataclasses import asdict, dataclass, field, replace
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
    predicted_speedup: float | None = None  # cost model: the site as written over the decision, at seq_len
    predicted_for: str = ""  # the hardware the cost model modelled for predicted_speedup ("H100")
    device: str = ""  # where original_ms and rewritten_ms were measured ("cpu", "cuda (NVIDIA H100 ...)")
    original_ms: float | None = None  # the site as written, on the example inputs (median of timed calls)
    rewritten_ms: float | None = None  # its replacement, on the same operands
    runs: str = ""  # exact sites: the implementation that ran on the example inputs (SDPA dispatch), and by how much
    run_facts: dict | None = None  # what the replacement did on the example inputs (dynamic sparsity: its density)
    tried: list[Trial] = field(default_factory=list)  # the auto policy's candidates at this site
    variant: Any = field(default=None, repr=False, compare=False)  # the variant it runs (Keep() when kept)

    @property
    def measured_speedup(self) -> float | None:
        """The site as written over its replacement, measured on ``device`` on the example inputs."""
        if self.original_ms is None or not self.rewritten_ms:
            return None
        return self.original_ms / self.rewritten_ms

    def to_dict(self) -> dict:
        """The report's facts about the site (the variant object is written by its decision's name; an
        artifact writes the variant's own dict form beside)."""
        facts = asdict(replace(self, variant=None))
        del facts["variant"]
        return facts

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
    timing: dict | None = None  # the whole model on the example inputs: device, original_ms, optimized_ms
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
            "timing": self.timing,
            "sites": [s.to_dict() for s in self.sites],
            "misses": [asdict(m) for m in self.misses],
            "not_captured": [asdict(n) for n in self.not_captured],
            "notes": list(self.notes),
        }

    def to_json(self, **kwargs) -> str:
        return json.dumps(self.to_dict(), indent=2, default=str, **kwargs)

    def render(self, width: int | None = None, verbose: bool = False) -> str:
        """The report as text ``width`` columns wide (default: :func:`terminal_width`). Numbers and names stay
        on one line; reasons wrap in their own column. Columns that do not fit are left out (the caption says
        which); long reasons and the auto policy's candidates are summarized unless ``verbose``."""
        from rich.console import Console

        width = terminal_width() if width is None else width
        buf = io.StringIO()
        console = Console(file=buf, width=width, force_terminal=False, color_system=None)
        console.print(_sites_table(self, width, verbose))
        if self.misses:
            console.print(_misses_table(self.misses))
        if self.not_captured:
            console.print(_not_captured_table(self.not_captured))
        if self.output_deviation is not None:
            console.print(f"max relative output difference vs the original: {self.output_deviation:.2e}")
        if self.timing is not None:
            console.print(_timing_line(self.timing), markup=False)
        for note in self.notes:
            console.print(f"note: {note}", markup=False)
        return buf.getvalue().rstrip()

    def __str__(self) -> str:
        return self.render()

    __repr__ = __str__


def _timing_line(t: dict) -> str:
    speedup = t["original_ms"] / t["optimized_ms"] if t["optimized_ms"] else float("nan")
    return (f"measured on {t['device']}, example inputs: original {t['original_ms']:.3f} ms, optimized "
            f"{t['optimized_ms']:.3f} ms ({speedup:.2f}x)")


def _measured(s: Site, verbose: bool) -> str:
    speedup = s.measured_speedup
    return "-" if speedup is None else f"{speedup:.2f}x"


def _predicted(s: Site, verbose: bool) -> str:
    return "-" if s.predicted_speedup is None else f"{s.predicted_speedup:.2f}x {s.predicted_for}".rstrip()


def _short(x: float | None) -> str:
    return "-" if x is None else f"{x:.1e}"


DEFAULT_WIDTH = 120  # str(report) away from a terminal, without $COLUMNS
MIN_PROSE = 20  # a reason column narrower than this is unreadable: other columns go first
MAX_WORD = 32  # a longer word in a prose column (a path) folds rather than widening the column
_SUMMARY = 140  # characters of a reason shown in the table unless verbose


def terminal_width() -> int:
    """rich's detected width on a terminal; else ``$COLUMNS``; else :data:`DEFAULT_WIDTH`."""
    from rich.console import Console

    console = Console()
    if console.is_terminal:
        return console.width
    columns = os.environ.get("COLUMNS", "")
    return int(columns) if columns.isdigit() and int(columns) > 0 else DEFAULT_WIDTH


def _summary(text: str, verbose: bool) -> str:
    """The first clause of a long auto reason (the evidence follows it; to_json and ``verbose`` keep it
    whole). Other reasons name a problem and its fix: they are shown whole."""
    if verbose or len(text) <= _SUMMARY or not text.startswith("auto:"):
        return text
    head = text.split("; ")[0]
    return (head if len(head) <= _SUMMARY else head[: _SUMMARY - 3].rstrip()) + " ... (--verbose: all)"


def _tried(s: Site, verbose: bool) -> str:
    if verbose:
        return "; ".join(f"{t.variant} {_short(t.deviation)} {t.verdict}" for t in s.tried) or "-"
    chosen = [t.variant for t in s.tried if t.verdict == "chosen"]
    return f"{len(s.tried)} tried" + (f", chose {chosen[0]}" if chosen else "") if s.tried else "-"


# (header, cell, kind, priority): "name" and "number" cells never wrap and never shrink; "prose" wraps in its
# own column. When the columns do not fit, the lowest priority goes first.
_COLUMNS = (
    ("site", lambda s, v: s.name, "name", 9),
    ("kind", lambda s, v: s.kind, "name", 2),
    ("decision", lambda s, v: s.decision, "name", 8),
    ("heads", lambda s, v: "/".join(map(str, s.heads)), "number", 3),
    ("dims", lambda s, v: "/".join(map(str, s.head_dims)), "number", 3),
    ("seq", lambda s, v: "/".join(map(str, s.seq)), "number", 4),
    ("mask", lambda s, v: s.mask, "name", 5),
    ("causal", lambda s, v: s.causal, "name", 5),
    ("layout", lambda s, v: s.layout, "name", 1),
    ("deviation", lambda s, v: _short(s.deviation), "number", 7),
    ("speedup", _measured, "number", 6),  # measured on this device (Site.device), the site alone
    ("predicted", _predicted, "number", 0),  # the cost model's, for the hardware it names
    ("runs", lambda s, v: s.runs or "-", "prose", 4),
    ("reason", lambda s, v: _summary(s.reason, v), "prose", 10),
    ("tried", _tried, "prose", 6),
)


def _needs(columns: list, cells: dict) -> dict:
    """The narrowest each column may be: names and numbers their longest cell; prose MIN_PROSE, or its longest
    word (up to MAX_WORD) so that words wrap whole, or its longest cell, if shorter."""
    out = {}
    for header, _, kind, _ in columns:
        longest = max([len(header), *(len(c) for c in cells[header])])
        word = min(MAX_WORD, max((len(w) for c in cells[header] for w in c.split()), default=0))
        out[header] = min(longest, max(MIN_PROSE, len(header), word)) if kind == "prose" else longest
    return out


def _fit(columns: list, needs: dict, width: int) -> list:
    """The columns that fit ``width`` (3 characters of border and padding per column, 1 for the edge),
    dropping the lowest priority first."""
    def fits(cols) -> bool:
        return sum(needs[c[0]] + 3 for c in cols) + 1 <= width

    kept = list(columns)
    while len(kept) > 1 and not fits(kept):
        kept.remove(min(kept, key=lambda c: c[3]))
    for col in sorted((c for c in columns if c not in kept), key=lambda c: -c[3]):  # room left by a wide one
        if fits([*kept, col]):
            kept.append(col)
    return [c for c in columns if c in kept]


def _prose_widths(prose: list, needs: dict, cells: dict, room: int) -> dict:
    """Widths of the prose columns in ``room`` characters (their borders included): each its need, then what
    is left shared 3:1 between the reason and the others, none wider than its longest cell."""
    widths = {c[0]: needs[c[0]] for c in prose}
    natural = {h: max([len(h), *(len(x) for x in cells[h])]) for h in widths}
    extra = room - sum(w + 3 for w in widths.values())
    while extra > 0:
        growing = [h for h in widths if widths[h] < natural[h]]
        total = sum(3 if h == "reason" else 1 for h in growing)
        given = 0
        for h in growing:
            add = min(natural[h] - widths[h], max(1, extra * (3 if h == "reason" else 1) // total), extra - given)
            widths[h] += add
            given += add
        if not given:
            break
        extra -= given
    return widths


def _sites_table(report: Report, width: int, verbose: bool):
    from rich.table import Table
    from rich.text import Text

    tried = any(s.tried for s in report.sites)
    columns = [c for c in _COLUMNS if c[0] != "tried" or tried]
    cells = {c[0]: [c[1](s, verbose) for s in report.sites] for c in columns}
    needs = _needs(columns, cells)
    kept = _fit(columns, needs, width)
    hidden = [c[0] for c in columns if c not in kept]
    caption = "heads q/kv, dims qk/v, seq q/k, speedup predicted"
    if hidden:
        caption += f"; not shown at {width} columns: {', '.join(hidden)} (--json shows all)"
    fixed = sum(needs[c[0]] + 3 for c in kept if c[2] != "prose")
    prose = _prose_widths([c for c in kept if c[2] == "prose"], needs, cells, width - fixed - 1)
    table = Table(title=f"attnopt: {len(report.sites)} attention site(s) in {report.graphs} graph(s)", caption=caption)
    for header, _, kind, _ in kept:
        if kind == "prose":  # wraps at spaces; a word longer than the column folds
            table.add_column(header, overflow="fold", width=prose[header])
        else:  # one line, never narrower than its longest cell
            table.add_column(header, no_wrap=True, min_width=needs[header])
    for i in range(len(report.sites)):
        table.add_row(*(Text(cells[c[0]][i]) for c in kept))  # Text: a "[...]" in a reason is not markup
    return table


def _misses_table(misses: list[Miss]):
    from rich.table import Table
    from rich.text import Text

    table = Table(title=f"{len(misses)} softmax(es) not rewritten")
    table.add_column("where", overflow="fold", ratio=1)
    table.add_column("node", no_wrap=True, overflow="fold")
    table.add_column("reason", overflow="fold", ratio=2, min_width=MIN_PROSE)
    for m in misses:
        table.add_row(Text(m.name), Text(m.node), Text(m.reason))
    return table


def _not_captured_table(entries: list[NotCaptured]):
    from rich.table import Table
    from rich.text import Text

    table = Table(title=f"{len(entries)} attention call(s) not captured (a graph break ran them eagerly)")
    table.add_column("where", overflow="fold", ratio=1)
    table.add_column("graph break at", overflow="fold", ratio=1)
    table.add_column("reason", overflow="fold", ratio=2, min_width=MIN_PROSE)
    for n in entries:
        table.add_row(Text(n.name), Text(n.at), Text(n.reason))
    return table
