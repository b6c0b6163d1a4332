"""Policies: what attnopt does with each attention site. Frozen dataclasses, validated at construction.

``Policy(default, overrides={glob: variant})`` picks a variant per site name (fnmatch globs, first match
wins, else ``default``). Strings are accepted where a policy is: ``"exact"`` and ``"keep"``.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Any, Mapping, Union

_SPARSE_ISSUE = "sparse attention (issue 5: mask descriptors and block-sparse kernels)"
_LINEAR_ISSUE = "linear and sigmoid attention (issue 6)"
_AUTO_ISSUE = "the auto policy (issue 7: cost model and calibration)"


class ApproximateVariant:
    """Protocol of a variant that replaces attention by a different function (sparse, linear, sigmoid).

    ``unsupported(match)`` returns a reason when the site cannot take the variant (else None);
    ``emit(graph, match, lookup)`` writes the replacement into ``graph`` (see
    :func:`attnopt.patterns.match.emit` for the exact one); ``describe()`` is the report's reason.
    """

    name = "approximate"

    def unsupported(self, match) -> str | None:
        return None

    def describe(self) -> str:
        return f"{self.name} attention (changes the function)"

    def emit(self, graph, match, lookup):
        raise NotImplementedError(f"{type(self).__name__}.emit")


@dataclass(frozen=True)
class Exact:
    """Same function, through attnopt's fused kernel."""

    name = "exact"


@dataclass(frozen=True)
class Keep:
    """Leave the site as the model wrote it."""

    name = "keep"


@dataclass(frozen=True)
class Sparse:
    """Attention restricted to a mask descriptor (changes the function unless the mask was the model's)."""

    mask: Any = None
    name = "sparse"

    def __post_init__(self):
        raise NotImplementedError(f"attnopt.Sparse is not available yet: it lands with {_SPARSE_ISSUE}")


@dataclass(frozen=True)
class Linear:
    """Linear attention with a feature map (changes the function)."""

    feature_map: str = "elu"
    causal: bool | None = None
    decay: Any = None
    normalize: bool = True
    name = "linear"

    def __post_init__(self):
        raise NotImplementedError(f"attnopt.Linear is not available yet: it lands with {_LINEAR_ISSUE}")


@dataclass(frozen=True)
class Sigmoid:
    """Sigmoid attention (changes the function)."""

    bias: float | None = None
    name = "sigmoid"

    def __post_init__(self):
        raise NotImplementedError(f"attnopt.Sigmoid is not available yet: it lands with {_LINEAR_ISSUE}")


Variant = Union[Exact, Keep, Sparse, Linear, Sigmoid]
_STRINGS = {"exact": Exact, "keep": Keep}
_LATER = {"auto": _AUTO_ISSUE, "sparse": _SPARSE_ISSUE, "sliding_window": _SPARSE_ISSUE, "linear": _LINEAR_ISSUE,
          "sigmoid": _LINEAR_ISSUE}  # fmt: skip


def parse_variant(text: str) -> Variant:
    """``"exact"`` or ``"keep"``; forms of later issues raise NotImplementedError naming the issue."""
    if not isinstance(text, str):
        raise TypeError(f"a policy string was expected, got {type(text).__name__}")
    key = text.strip().lower()
    head = key.split(":", 1)[0]
    if key in _STRINGS:
        return _STRINGS[key]()
    if head in _LATER:
        raise NotImplementedError(f"policy {text!r} is not available yet: it lands with {_LATER[head]}")
    raise ValueError(f"unknown policy {text!r}: use one of {sorted(_STRINGS)} (or attnopt.Policy(...))")


def _as_variant(v: Any, where: str) -> Variant:
    if isinstance(v, str):
        return parse_variant(v)
    if isinstance(v, (Exact, Keep, Sparse, Linear, Sigmoid, ApproximateVariant)):
        return v
    raise TypeError(f"{where}: expected a variant (attnopt.Exact(), attnopt.Keep(), ...) or a string, got {v!r}")


@dataclass(frozen=True)
class Policy:
    """A variant per site: ``overrides`` maps fnmatch globs on site names to variants; else ``default``."""

    default: Variant = field(default_factory=Exact)
    overrides: tuple[tuple[str, Variant], ...] = ()
    max_error: float | None = None
    seq_len: int | None = None

    def __post_init__(self):
        object.__setattr__(self, "default", _as_variant(self.default, "Policy.default"))
        items = self.overrides.items() if isinstance(self.overrides, Mapping) else self.overrides
        checked = []
        for item in items:
            if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str)):
                raise TypeError(f"Policy.overrides: expected {{glob: variant}}, got entry {item!r}")
            checked.append((item[0], _as_variant(item[1], f"Policy.overrides[{item[0]!r}]")))
        object.__setattr__(self, "overrides", tuple(checked))
        if self.max_error is not None and not (isinstance(self.max_error, (int, float)) and self.max_error >= 0):
            raise ValueError(f"Policy.max_error must be a number >= 0, got {self.max_error!r}")
        if self.seq_len is not None and not (isinstance(self.seq_len, int) and self.seq_len > 0):
            raise ValueError(f"Policy.seq_len must be a positive int, got {self.seq_len!r}")

    def for_site(self, name: str) -> Variant:
        for glob, variant in self.overrides:
            if fnmatch.fnmatchcase(name, glob):
                return variant
        return self.default

    def unmatched_globs(self, names: list[str]) -> list[str]:
        return [g for g, _ in self.overrides if not any(fnmatch.fnmatchcase(n, g) for n in names)]


def as_policy(policy: Any) -> Policy:
    """Normalizes what the API accepts (a Policy, a variant, or a string) into a :class:`Policy`."""
    if isinstance(policy, Policy):
        return policy
    if policy is None:
        return Policy()
    return Policy(default=_as_variant(policy, "policy"))
