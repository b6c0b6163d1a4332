"""The base of attnopt's errors, below every layer so that any of them can raise one."""

from __future__ import annotations


class AttnoptError(Exception):
    """Base class of the errors attnopt raises on bad input."""


class GraphDeviationError(AttnoptError):
    """A rewritten graph's outputs deviate from the original's on the example inputs beyond the tolerance,
    and the policy says ``on_deviation="raise"``."""
