"""Policies: what attnopt does with each attention site. Frozen dataclasses, validated at construction.

``Policy(default, overrides={glob: variant})`` picks a variant per site name (fnmatch globs, first match
wins, else ``default``); ``Policy.auto(max_error=...)`` lets calibration pick (:mod:`attnopt.auto`).
Policies have a dict form, a YAML/JSON file form (exact round trips) and a string form for the CLI
(``exact``, ``keep``, ``auto``, ``auto:1e-2``, ``sliding_window:1024``, ...). A variant class plugs into
these forms with optional ``from_string(text)``, ``to_dict()`` and ``from_dict(fields)``.
"""

from __future__ import annotations

import fnmatch
import json
import math
import os
import re
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Mapping, Union

from attnopt.variants.exact import Exact, Keep
from attnopt.variants.linear import Linear
from attnopt.variants.registry import (ApproximateVariant, is_variant, register_variant, string_heads,  # noqa: F401
                                       variant_class, variant_names)  # fmt: skip
from attnopt.variants.sigmoid import Sigmoid
from attnopt.variants.sparse import Sparse



RANK_BY = ("measured", "predicted")  # how auto orders its candidates (Auto.rank_by)


@dataclass(frozen=True)
class Auto:
    """Let calibration choose: per site, the cheapest candidate whose model outputs stay within the
    policy's ``max_error`` (:func:`attnopt.auto.calibrate`; ``Policy.auto(...)`` builds such a policy).

    The candidates come from the variant classes (``Sparse.candidates(site, match)``: exact-sparse,
    then windows and neighborhoods; ``Linear.candidates`` when ``allow_linear``), or are the explicit
    ``candidates``, tried at every site in place of the generated ones. Exact is always the fallback.

    ``rank_by="measured"`` (the default) times each candidate the cost model keeps on the device calibration
    runs on, at the site's example operands, drops those not faster than exact there, and tries the rest
    fastest first: auto never picks a variant slower than exact on the device it runs on. ``"predicted"``
    ranks by the cost model alone (it models an H100): to calibrate on one machine for another.
    """

    allow_linear: bool = False
    candidates: tuple = ()
    rank_by: str = "measured"
    name = "auto"

    def __post_init__(self):
        if self.rank_by not in RANK_BY:
            raise ValueError(f"Auto.rank_by must be one of {RANK_BY}, got {self.rank_by!r}")
        if not isinstance(self.allow_linear, bool):
            raise TypeError(f"Auto.allow_linear must be a bool, got {self.allow_linear!r}")
        if not isinstance(self.candidates, (tuple, list)):
            raise TypeError(f"Auto.candidates must be a list of variants, got {self.candidates!r}")
        candidates = tuple(_as_variant(c, f"Auto.candidates[{i}]") for i, c in enumerate(self.candidates))
        for i, c in enumerate(candidates):
            if isinstance(c, (Auto, Keep)):
                raise ValueError(f"Auto.candidates[{i}]: {c.name!r} cannot be a candidate (it is no rewrite to try)")
        object.__setattr__(self, "candidates", candidates)

    def to_dict(self) -> dict:
        """Its fields; ``rank_by`` only when not the default, so files written before it existed read the same."""
        body = {"allow_linear": self.allow_linear, "candidates": [variant_to_dict(c) for c in self.candidates]}
        return body if self.rank_by == "measured" else {**body, "rank_by": self.rank_by}

    def unsupported(self, match) -> str | None:
        """An auto site reaching the pipeline uncalibrated (a backend has no example outputs to compare)."""
        return "auto policies are calibrated by attnopt.optimize/inspect on example inputs, not by a backend"


Variant = Union[Exact, Keep, Auto, Sparse, Linear, Sigmoid]
# Each variant registers its config class and handler in its own module (attnopt.variants.*); the policy forms,
# the pipeline and the cost model ask the registry. Auto is the policy's own: calibration picks the variant.
register_variant(Auto)
_FILE_SUFFIXES = (".yaml", ".yml", ".json")
_POLICY_KEYS = ("default", "overrides", "max_error", "seq_len", "on_deviation")
ON_DEVIATION = ("fallback", "raise")  # what a whole-graph deviation does (Policy.on_deviation)
DEFAULT_AUTO_ERROR = 1e-2  # the budget of the plain "auto" string


def parse_variant(text: str) -> Variant:
    """A variant from its string form: ``exact``, ``keep``, ``auto``; ``sparse:...``, ``sliding_window:...``,
    ``linear[:...]``, ``sigmoid[:...]`` are parsed by their class's ``from_string(text)``."""
    if not isinstance(text, str):
        raise TypeError(f"a policy string was expected, got {type(text).__name__}")
    key = text.strip()
    head, sep, arg = key.partition(":")
    cls = string_heads().get(head.strip().lower())
    if cls is None:
        raise ValueError(f"unknown policy {text!r}: use one of {sorted(string_heads())} (or attnopt.Policy(...))")
    from_string = getattr(cls, "from_string", None)
    if from_string is not None:
        return from_string(key)
    if sep and cls is Auto:
        raise ValueError(f"policy {text!r}: a budget belongs to the whole policy (the string {text!r} as the policy, "
                         f"or Policy(..., max_error={arg.strip()})), not to one site")  # fmt: skip
    if sep:
        raise ValueError(f"policy {text!r}: {head.strip()!r} takes no argument")
    return cls()


def variant_to_dict(v: Variant) -> dict:
    """``{"variant": name, **fields}``: the class's ``to_dict()`` when it has one, else its dataclass fields."""
    to_dict = getattr(v, "to_dict", None)
    if to_dict is not None:
        body = to_dict()
    elif is_dataclass(v) and is_variant(v):
        body = {f.name: _plain(getattr(v, f.name), f"{type(v).name}.{f.name}") for f in fields(v)}
    else:
        raise TypeError(f"variant {v!r} has no dict form (give its class to_dict() and from_dict())")
    return {"variant": type(v).name, **body}  # the class's name: an instance may name itself more precisely


def _plain(x: Any, where: str) -> Any:
    if x is None or isinstance(x, (bool, int, float, str)):
        return x
    if isinstance(x, (tuple, list)):
        return [_plain(y, f"{where}[{i}]") for i, y in enumerate(x)]
    if isinstance(x, ApproximateVariant) or is_variant(x):
        return variant_to_dict(x)
    raise TypeError(f"{where}: {x!r} has no dict form")


def variant_from_dict(d: Any, where: str = "variant") -> Variant:
    """The inverse of :func:`variant_to_dict` (the class's ``from_dict(fields)`` when it has one)."""
    if not isinstance(d, Mapping):
        raise TypeError(f"{where}: expected a variant (a string, or a mapping with key 'variant'), got {d!r}")
    if "variant" not in d:
        raise ValueError(f"{where}: missing key 'variant' (one of {variant_names()})")
    name = d["variant"]
    cls = variant_class(name) if isinstance(name, str) else None
    if cls is None:
        raise ValueError(f"{where}.variant: unknown variant {name!r}; known: {variant_names()}")
    body = {k: x for k, x in d.items() if k != "variant"}
    from_dict = getattr(cls, "from_dict", None)
    known = {f.name for f in fields(cls)}
    unknown = [k for k in body if k not in known]
    if from_dict is None and unknown:
        raise ValueError(f"{where}: unknown key {unknown[0]!r} for variant {name!r}; known keys: {sorted(known)}")
    try:
        return from_dict(body) if from_dict is not None else cls(**body)
    except (TypeError, ValueError) as exc:
        raise type(exc)(f"{where}: {exc}") from exc


def _as_variant(v: Any, where: str) -> Variant:
    if isinstance(v, str):
        return parse_variant(v)
    if isinstance(v, Mapping):
        return variant_from_dict(v, where)
    if isinstance(v, ApproximateVariant) or is_variant(v):
        return v
    raise TypeError(f"{where}: expected a variant (attnopt.Exact(), attnopt.Keep(), ...) or a string, got {v!r}")


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


@dataclass(frozen=True)
class Policy:
    """A variant per site: ``overrides`` maps fnmatch globs on site names to variants (first match wins);
    else ``default``. ``max_error`` bounds approximate variants (for auto: the model's outputs);
    ``seq_len`` is the target sequence length the cost model predicts speedups at.
    ``on_deviation``: when a rewritten graph's outputs deviate from the original's on the example inputs
    beyond the tolerance (the dtype's, or ``max_error`` for approximate variants), ``"fallback"`` (the
    default) keeps the graph as written, every site reported with the reason; ``"raise"`` raises
    :class:`attnopt.GraphDeviationError` with the deviation.

    Forms: ``to_dict``/``from_dict``, ``to_yaml``/``from_yaml``, ``save``/``load`` (.yaml, .yml, .json),
    ``from_string`` (``exact``, ``keep``, ``auto``, ``auto:1e-2``, ``sliding_window:1024``, a policy file).
    """

    default: Variant = field(default_factory=Exact)
    overrides: tuple[tuple[str, Variant], ...] = ()
    max_error: float | None = None
    seq_len: int | None = None
    on_deviation: str = "fallback"

    def __post_init__(self):
        object.__setattr__(self, "default", _as_variant(self.default, "Policy.default"))
        if isinstance(self.overrides, str) or not isinstance(self.overrides, (Mapping, tuple, list)):
            raise TypeError(f"Policy.overrides: expected a mapping {{glob: variant}}, got {self.overrides!r}")
        items = self.overrides.items() if isinstance(self.overrides, Mapping) else self.overrides
        checked = []
        for item in items:
            if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str)):
                raise TypeError(f"Policy.overrides: expected {{glob: variant}} with string globs, got entry {item!r}")
            glob = item[0]
            if not glob:
                raise ValueError("Policy.overrides: a glob is empty")
            if any(glob == g for g, _ in checked):
                raise ValueError(f"Policy.overrides: glob {glob!r} appears twice")
            checked.append((glob, _as_variant(item[1], f"Policy.overrides[{glob!r}]")))
        object.__setattr__(self, "overrides", tuple(checked))
        if self.max_error is not None:
            if not (_is_number(self.max_error) and math.isfinite(self.max_error) and self.max_error >= 0):
                raise ValueError(f"Policy.max_error must be a finite number >= 0, got {self.max_error!r}")
            object.__setattr__(self, "max_error", float(self.max_error))
        if self.seq_len is not None and not (isinstance(self.seq_len, int) and not isinstance(self.seq_len, bool)
                                             and self.seq_len > 0):  # fmt: skip
            raise ValueError(f"Policy.seq_len must be a positive int, got {self.seq_len!r}")
        if self.on_deviation not in ON_DEVIATION:
            raise ValueError(f"Policy.on_deviation must be one of {ON_DEVIATION}, got {self.on_deviation!r}")
        if self.is_auto and self.max_error is None:
            raise ValueError("Policy.max_error is required with an auto variant (the budget on the model's outputs), "
                             "e.g. Policy.auto(max_error=1e-2)")  # fmt: skip

    @classmethod
    def auto(cls, max_error: float = DEFAULT_AUTO_ERROR, seq_len: int | None = None, allow_linear: bool = False,
             candidates: Any = (), overrides: Any = (), rank_by: str = "measured") -> "Policy":  # fmt: skip
        """As fast as possible with the model's outputs within ``max_error`` (relative) of the original
        (``rank_by``: see :class:`Auto`)."""
        return cls(Auto(allow_linear, tuple(candidates), rank_by), overrides, max_error=max_error, seq_len=seq_len)

    @property
    def is_auto(self) -> bool:
        return any(isinstance(v, Auto) for v in (self.default, *(v for _, v in self.overrides)))

    def for_site(self, name: str) -> Variant:
        for glob, variant in self.overrides:
            if fnmatch.fnmatchcase(name, glob):
                return variant
        return self.default

    def unmatched_globs(self, names: list[str]) -> list[str]:
        return [g for g, _ in self.overrides if not any(fnmatch.fnmatchcase(n, g) for n in names)]

    def to_dict(self) -> dict:
        return {
            "default": variant_to_dict(self.default),
            "overrides": {g: variant_to_dict(v) for g, v in self.overrides},
            "max_error": self.max_error,
            "seq_len": self.seq_len,
            # the default is left out, so the dict (and files) of a policy that never set it stay as they were
            **({"on_deviation": self.on_deviation} if self.on_deviation != "fallback" else {}),
        }

    @classmethod
    def from_dict(cls, d: Any) -> "Policy":
        if not isinstance(d, Mapping):
            raise TypeError(f"policy: expected a mapping with keys {', '.join(_POLICY_KEYS)}, got {d!r}")
        for key in d:
            if key not in _POLICY_KEYS:
                raise ValueError(f"policy: unknown key {key!r}; known keys: {', '.join(_POLICY_KEYS)}")
        overrides = d.get("overrides") or {}
        if not isinstance(overrides, Mapping):
            raise TypeError(f"Policy.overrides: expected a mapping {{glob: variant}}, got {overrides!r}")
        return cls(d.get("default", "exact"), tuple(overrides.items()), d.get("max_error"), d.get("seq_len"),
                   d.get("on_deviation", "fallback"))

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_yaml(cls, source: str | os.PathLike) -> "Policy":
        """From YAML (or JSON) text, or from a file: a path object, or a string ending in .yaml/.yml/.json."""
        import yaml

        if isinstance(source, os.PathLike) or (isinstance(source, str) and _looks_like_file(source)):
            source = Path(source).read_text()
        try:
            data = yaml.load(source, Loader=_yaml_loader())
        except yaml.YAMLError as exc:
            raise ValueError(f"policy: not valid YAML: {exc}") from exc
        return cls.from_dict(data)

    def save(self, path: str | os.PathLike) -> None:
        """Writes the policy as YAML (.yaml, .yml) or JSON (.json), chosen by the extension."""
        path = Path(path)
        if path.suffix.lower() not in _FILE_SUFFIXES:
            raise ValueError(f"policy file {str(path)!r}: unknown extension {path.suffix!r}; use .yaml, .yml or .json")
        text = json.dumps(self.to_dict(), indent=2) + "\n" if path.suffix.lower() == ".json" else self.to_yaml()
        path.write_text(text)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Policy":
        path = Path(path)
        if path.suffix.lower() not in _FILE_SUFFIXES:
            raise ValueError(f"policy file {str(path)!r}: unknown extension {path.suffix!r}; use .yaml, .yml or .json")
        if path.suffix.lower() == ".json":
            return cls.from_dict(json.loads(path.read_text()))
        return cls.from_yaml(path)

    @classmethod
    def from_string(cls, text: str) -> "Policy":
        """The CLI form: ``auto`` or ``auto:<max_error>``, a policy file, or one variant's string for every site."""
        if not isinstance(text, str):
            raise TypeError(f"a policy string was expected, got {type(text).__name__}")
        key = text.strip()
        if _looks_like_file(key):
            return cls.load(key)
        head, sep, arg = key.partition(":")
        if head.strip().lower() != "auto":
            return cls(default=parse_variant(key))
        if not sep:
            return cls.auto()
        try:
            budget = float(arg)
        except ValueError:
            raise ValueError(f"policy {text!r}: the budget {arg.strip()!r} is not a number (e.g. auto:1e-2)") from None
        if not (math.isfinite(budget) and budget >= 0):
            raise ValueError(f"policy {text!r}: the budget {arg.strip()!r} must be a finite number >= 0")
        return cls.auto(max_error=budget)


def _looks_like_file(text: str) -> bool:
    return "\n" not in text and text.strip().lower().endswith(_FILE_SUFFIXES)


def _yaml_loader():
    """PyYAML's safe loader, reading ``1e-2`` as a number (YAML 1.1 reads it as text; YAML 1.2 as a float)."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    exponent = re.compile(r"^[-+]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)[eE][-+]?[0-9]+$")
    Loader.add_implicit_resolver("tag:yaml.org,2002:float", exponent, list("-+0123456789."))
    return Loader


def as_policy(policy: Any) -> Policy:
    """Normalizes what the API accepts (a Policy, its dict form, a string, or a variant) into a :class:`Policy`."""
    if isinstance(policy, Policy):
        return policy
    if policy is None:
        return Policy()
    if isinstance(policy, str):
        return Policy.from_string(policy)
    if isinstance(policy, Mapping) and "variant" not in policy:
        return Policy.from_dict(policy)
    return Policy(default=_as_variant(policy, "policy"))
