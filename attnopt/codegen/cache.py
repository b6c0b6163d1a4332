"""On-disk cache of generated kernels.

Each spec's source lives in ``<cache root>/kernels/<spec.name>.py``, the cache root being
``$ATTNOPT_CACHE_DIR`` or ``~/.cache/attnopt``. Triton's ``@triton.jit`` reads the source of the
functions it compiles, so the generated modules are imported from real files. The file is
(re)written, atomically, whenever it is missing or differs from what the current renderer produces
for the spec (rendering is cheap string building), so a file left by an older attnopt never runs.

Loaded kernels are kept in a process-wide dict keyed by the spec and the file. This module does not
import triton: the generated module does, when :func:`load_kernel` first imports it.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import tempfile
import threading
from pathlib import Path

from attnopt.codegen.render import render
from attnopt.codegen.spec import KernelSpec

_LOADED: dict[tuple[KernelSpec, Path], object] = {}
_LOCK = threading.Lock()


def cache_root() -> Path:
    """``$ATTNOPT_CACHE_DIR`` if set, else ``~/.cache/attnopt``."""
    env = os.environ.get("ATTNOPT_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "attnopt"


def kernel_path(spec: KernelSpec) -> Path:
    """Where the source of ``spec``'s kernel is cached."""
    return cache_root() / "kernels" / f"{spec.name}.py"


def write_source(spec: KernelSpec) -> Path:
    """Renders ``spec`` into its cache file unless the file already holds exactly that source."""
    path = kernel_path(spec)
    source = render(spec)
    if path.is_file() and path.read_text(encoding="utf-8") == source:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{spec.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(source)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return path


def load_kernel(spec: KernelSpec):
    """The ``@triton.jit`` kernel of ``spec``, rendered into the cache and imported on first use."""
    path = kernel_path(spec)
    with _LOCK:
        kernel = _LOADED.get((spec, path))
        if kernel is None:
            kernel = _import_kernel(spec, write_source(spec))
            _LOADED[(spec, path)] = kernel
    return kernel


def _import_kernel(spec: KernelSpec, path: Path):
    module_spec = importlib.util.spec_from_file_location(spec.name, path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[spec.name] = module
    try:
        module_spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[spec.name]
        raise
    return getattr(module, spec.name)


def clear_loaded() -> None:
    """Forgets the kernels loaded in this process (the files stay); the next load imports again."""
    with _LOCK:
        _LOADED.clear()
