"""Renders the Triton source of the exact-attention kernel a :class:`KernelSpec` describes.

:func:`render` returns a self-contained Python module defining one ``@triton.jit`` kernel named
``spec.name``, with the spec as JSON in its header. Every spec field is a compile-time decision in
the text: causal, mask, bias, key-padding, softcap and dropout code only appear when the spec asks
for them, and the head-dim masks only when a head dim is not a power of two. The kernels themselves
are documented in :mod:`attnopt.kernels.exact.render_fwd` (forward) and
:mod:`attnopt.kernels.exact.render_bwd` (backward); the scoring they share in
:mod:`attnopt.kernels.exact.render_common`.
"""

from __future__ import annotations

from pathlib import Path

from attnopt.codegen.cache import load_generated, write_generated
from attnopt.codegen.spec import KernelSpec
from attnopt.kernels.exact import render_bwd, render_fwd

__all__ = ["kernel_arg_names", "load_kernel", "render", "write_source"]


def kernel_arg_names(spec: KernelSpec) -> tuple[str, ...]:
    """The generated kernel's parameters in order (the launcher passes them by name)."""
    return render_fwd.arg_names(spec) if spec.direction == "fwd" else render_bwd.arg_names(spec)


def render(spec: KernelSpec) -> str:
    """The source of a Python module defining the ``@triton.jit`` kernel ``spec.name``."""
    lines = render_fwd.render_lines(spec) if spec.direction == "fwd" else render_bwd.render_lines(spec)
    return "\n".join(lines) + "\n"


def write_source(spec: KernelSpec) -> Path:
    """Renders ``spec`` into its cache file (:func:`~attnopt.codegen.cache.kernel_path`) unless the file
    already holds exactly that source."""
    return write_generated(spec.name, render(spec))


def load_kernel(spec: KernelSpec):
    """The ``@triton.jit`` kernel of ``spec``, rendered into the cache and imported on first use."""
    return load_generated(spec.name, lambda: render(spec))

