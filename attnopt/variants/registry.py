"""The variant registry: a variant is a frozen config class registered with a handler.

The config (a frozen dataclass with a class attribute ``name``) is what a policy holds: validated at
construction, with its string form (an optional ``from_string(text)`` classmethod, read for the registered
string heads) and dict form (optional ``to_dict()`` / ``from_dict(fields)``, else its fields). The handler is
what the compiler asks about a variant: whether a site can take it, the report's reason, how it is written
into the graph, its candidates for ``auto``, its cost, whether it computes the same function, and how a
model rewritten with it generates. Policies, the pipeline and the cost model ask the registry, so a new
variant is one config class and one ``register_variant`` call::

    @dataclass(frozen=True)
    class Scaled:
        factor: float = 2.0
        name = "scaled"

    class ScaledHandler(VariantHandler):
        def emit(self, variant, graph, match, lookup): ...

    register_variant(Scaled, ScaledHandler(), heads=("scaled",))
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, is_dataclass
from typing import Any


class VariantHandler:
    """What attnopt asks about a registered variant (``variant`` is the config instance); each answer has a
    default, a handler overrides those that apply."""

    def unsupported(self, variant: Any, match: Any) -> str | None:
        """Why the site of ``match`` cannot take ``variant`` (it is then kept, with this reason), or None."""
        return None

    def describe(self, variant: Any, match: Any = None) -> str:
        """The report's reason for a site rewritten with ``variant`` (``match``: the site's, or None)."""
        return f"{variant.name} attention (changes the function)"

    def emit(self, variant: Any, graph: Any, match: Any, lookup: Callable) -> Any:
        """Writes the replacement of the site of ``match`` into ``graph`` and returns its output node
        (``lookup`` maps the original graph's nodes to ``graph``'s; see :func:`attnopt.patterns.match.emit`)."""
        raise NotImplementedError(f"{type(variant).__name__} has no emit: give its handler one")

    def candidates(self, config: type, site: Any, match: Any) -> list:
        """The variants of class ``config`` that ``auto`` tries at ``site``, cheapest first."""
        return []

    def auto_option(self, config: type) -> str | None:
        """The field of :class:`attnopt.Auto` that must be true for ``auto`` to try this class's candidates
        (``"allow_linear"``), or None: always tried."""
        return None

    def cost(self, variant: Any, shape: Any) -> Any:
        """The :class:`attnopt.cost.Cost` of ``variant`` at a site of ``shape``, or None (no cost model)."""
        return None

    def exact(self, variant: Any) -> bool:
        """Whether ``variant`` computes the site's own function (validated at the dtype's tolerance, not the
        policy's ``max_error``)."""
        return False

    def generation(self, variant: Any) -> str:
        """How a model whose sites are rewritten with ``variant`` generates: ``"kv-cache"`` (transformers'
        own loop), ``"recurrent"`` (:func:`attnopt.generate`, through recurrent states) or ``"paged"``
        (:func:`attnopt.generate`, through paged KV caches with a decode-time selection)."""
        return "kv-cache"

    def run_facts(self, variant: Any) -> dict | None:
        """What the replacement's last run did, measured at run time (validation runs it on the site's example
        operands; the report keeps it as ``Site.run_facts``), or None: e.g. a dynamic selection's density."""
        return None


class ApproximateVariant:
    """Protocol of a variant that replaces attention by a different function (sparse, linear, sigmoid).

    ``unsupported(match)`` returns a reason when the site cannot take the variant (else None);
    ``emit(graph, match, lookup)`` writes the replacement into ``graph`` (see
    :func:`attnopt.patterns.match.emit` for the exact one); ``describe(match)`` is the report's reason
    (``match`` is the site's, or None outside a site).
    """

    name = "approximate"

    def unsupported(self, match) -> str | None:
        return None

    def describe(self, match=None) -> str:
        return f"{self.name} attention (changes the function)"

    def emit(self, graph, match, lookup):
        raise NotImplementedError(f"{type(self).__name__}.emit")


class MethodHandler(VariantHandler):
    """The handler of a config class that answers for itself: each question goes to the config's method of
    the same name (``unsupported(match)``, ``describe(match)``, ``emit(graph, match, lookup)``,
    ``candidates(site, match)``, ``cost(shape)``, the ``exact``, ``auto_option`` and ``generation`` attributes)
    when it has one."""

    def unsupported(self, variant, match):
        method = getattr(variant, "unsupported", None)
        return method(match) if method is not None else super().unsupported(variant, match)

    def describe(self, variant, match=None):
        method = getattr(variant, "describe", None)
        return method(match) if method is not None else super().describe(variant, match)

    def emit(self, variant, graph, match, lookup):
        method = getattr(variant, "emit", None)
        return method(graph, match, lookup) if method is not None else super().emit(variant, graph, match, lookup)

    def candidates(self, config, site, match):
        method = getattr(config, "candidates", None)
        return method(site, match) if callable(method) else []  # (Auto's ``candidates`` is a field)

    def auto_option(self, config):
        return getattr(config, "auto_option", None)

    def cost(self, variant, shape):
        method = getattr(variant, "cost", None)
        return method(shape) if method is not None else None

    def exact(self, variant):
        return bool(getattr(variant, "exact", False))

    def generation(self, variant):
        return getattr(variant, "generation", super().generation(variant))


@dataclass(frozen=True)
class Registered:
    config: type
    handler: VariantHandler
    heads: tuple[str, ...]  # the heads of its string forms ("head" or "head:argument")


_BY_NAME: dict[str, Registered] = {}
_METHODS = MethodHandler()


def register_variant(config: type | None = None, handler: VariantHandler | None = None, *,
                     heads: tuple[str, ...] = ()) -> Any:  # fmt: skip
    """Registers the frozen dataclass ``config`` as a variant answered for by ``handler`` (default: the
    config's own methods, :class:`MethodHandler`); its string forms are ``name`` and ``heads``. Returns
    ``config``; without it, a decorator: ``@register_variant(handler=...)``."""
    if config is None:
        return lambda cls: register_variant(cls, handler, heads=heads)
    name = getattr(config, "name", None)
    if not (isinstance(config, type) and is_dataclass(config) and config.__dataclass_params__.frozen):
        raise TypeError(f"register_variant takes a frozen dataclass (@dataclass(frozen=True)), got {config!r}")
    if not isinstance(name, str) or not name:
        raise TypeError(f"variant class {config.__name__} needs a class attribute name (a non-empty string)")
    if handler is not None and not isinstance(handler, VariantHandler):
        raise TypeError(f"the handler of {name!r} must be a VariantHandler instance, got {handler!r}")
    known = _BY_NAME.get(name)
    if known is not None and known.config is not config:
        raise ValueError(f"a variant named {name!r} is already registered ({known.config.__qualname__})")
    taken = {h: r.config for r in _BY_NAME.values() for h in (r.config.name, *r.heads) if r.config is not config}
    clash = [h for h in (name, *heads) if h in taken]
    if clash:
        raise ValueError(f"variant string head {clash[0]!r} is already {taken[clash[0]].__qualname__}'s")
    _BY_NAME[name] = Registered(config, handler or _METHODS, tuple(heads))
    return config


def unregister_variant(config: type) -> None:
    """Forgets the variant class ``config`` (a plug-in unloading, a test cleaning up)."""
    for name, entry in list(_BY_NAME.items()):
        if entry.config is config:
            del _BY_NAME[name]


def variant_classes() -> tuple[type, ...]:
    """Every registered config class, in registration order."""
    return tuple(r.config for r in _BY_NAME.values())


def variant_names() -> list[str]:
    return sorted(_BY_NAME)


def variant_class(name: str) -> type | None:
    """The config class registered under ``name`` (the dict form's ``variant``), or None."""
    entry = _BY_NAME.get(name)
    return entry.config if entry is not None else None


def string_heads() -> dict[str, type]:
    """Every string-form head (``name`` and the registered ``heads``) and its config class."""
    return {h: r.config for r in _BY_NAME.values() for h in (r.config.name, *r.heads)}


def is_variant(x: Any) -> bool:
    return isinstance(x, variant_classes())


def handler_for(variant: Any) -> VariantHandler:
    """The handler of ``variant``'s class (or of the nearest registered base class); a variant of no
    registered class answers for itself (:class:`MethodHandler`)."""
    return handler_of(type(variant))


def generation_mode(variant: Any) -> str:
    """How a site that runs ``variant`` generates (its handler's answer; ``"kv-cache"`` for a site not yet
    decided, ``variant`` None)."""
    return "kv-cache" if variant is None else handler_for(variant).generation(variant)


def handler_of(config: type) -> VariantHandler:
    """The handler of the config class ``config`` (or of its nearest registered base class), else
    :class:`MethodHandler`."""
    for cls in config.__mro__:
        for entry in _BY_NAME.values():
            if entry.config is cls:
                return entry.handler
    return _METHODS
