"""Triton code generation for attnopt: specs, source rendering and the on-disk kernel cache.

Importing this package does not import triton; only loading a kernel does.
"""

from attnopt.codegen.cache import cache_root, kernel_path, load_kernel
from attnopt.codegen.render import render
from attnopt.codegen.spec import KernelSpec, default_spec

__all__ = ["KernelSpec", "cache_root", "default_spec", "kernel_path", "load_kernel", "render"]
