"""Renders the Triton source of the kernel a :class:`KernelSpec` describes.

:func:`render` returns a self-contained Python module defining one ``@triton.jit`` kernel named
``spec.name``, with the spec as JSON in its header. Every spec field is a compile-time decision in
the text: causal, mask, bias, key-padding, softcap and dropout code only appear when the spec asks
for them, and the head-dim masks only when a head dim is not a power of two. The kernels themselves
are documented in :mod:`attnopt.codegen.fwd` (forward) and :mod:`attnopt.codegen.bwd` (backward);
the scoring they share in :mod:`attnopt.codegen.common`.
"""

from __future__ import annotations

from attnopt.codegen import bwd, fwd
from attnopt.codegen.common import LN2, LOG2E
from attnopt.codegen.spec import KernelSpec

__all__ = ["LN2", "LOG2E", "kernel_arg_names", "render"]


def kernel_arg_names(spec: KernelSpec) -> tuple[str, ...]:
    """The generated kernel's parameters in order (the launcher passes them by name)."""
    return fwd.arg_names(spec) if spec.direction == "fwd" else bwd.arg_names(spec)


def render(spec: KernelSpec) -> str:
    """The source of a Python module defining the ``@triton.jit`` kernel ``spec.name``."""
    lines = fwd.render_lines(spec) if spec.direction == "fwd" else bwd.render_lines(spec)
    return "\n".join(lines) + "\n"
