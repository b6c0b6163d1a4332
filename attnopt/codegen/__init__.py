"""The machinery every generated-kernel family shares: specs, Triton text helpers, the on-disk kernel cache, tuning.

- :mod:`~attnopt.codegen.spec`: :class:`KernelSpec` (the compile-time decisions of one exact kernel) and
  :class:`~attnopt.codegen.spec.GeneratedSpec`, the base of the other families' specs.
- :mod:`~attnopt.codegen.triton_text`: Triton source text shared by the renderers.
- :mod:`~attnopt.codegen.cache`: generated modules on disk, named by the spec's hash.
- :mod:`~attnopt.codegen.tuning`: the resource model, candidate pruning, defaults and the autotuning cache.

Each family's renderer lives with its kernels: ``attnopt/kernels/<family>/render.py``.
Importing this package does not import triton; only loading a kernel does.
"""

from attnopt.codegen.cache import cache_root, kernel_path
from attnopt.codegen.spec import KernelSpec, default_spec

__all__ = ["KernelSpec", "cache_root", "default_spec", "kernel_path"]
