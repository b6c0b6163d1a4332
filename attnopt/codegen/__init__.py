"""Triton code generation for attnopt: specs, source rendering, the on-disk kernel cache and tile tuning.

- :mod:`~attnopt.codegen.spec`: :class:`KernelSpec`, the compile-time decisions of one kernel.
- :mod:`~attnopt.codegen.render` (with :mod:`~attnopt.codegen.fwd`, :mod:`~attnopt.codegen.bwd` and
  :mod:`~attnopt.codegen.common`): the readable Triton source of a spec.
- :mod:`~attnopt.codegen.cache`: generated modules on disk, named by the spec's hash.
- :mod:`~attnopt.codegen.tuning`: the resource model, candidate pruning, defaults and the autotuning cache.

Importing this package does not import triton; only loading a kernel does.
"""

from attnopt.codegen.cache import cache_root, kernel_path, load_kernel
from attnopt.codegen.render import render
from attnopt.codegen.spec import KernelSpec, default_spec

__all__ = ["KernelSpec", "cache_root", "default_spec", "kernel_path", "load_kernel", "render"]
