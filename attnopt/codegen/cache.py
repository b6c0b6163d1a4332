"""On-disk cache of generated kernels.

Each spec's source lives in ``<cache root>/kernels/<spec.name>.py``, the cache root being
``$ATTNOPT_CACHE_DIR`` or ``~/.cache/attnopt``. Triton's ``@triton.jit`` reads the source of the
functions it compiles, so the generated modules are imported from real files. The file is
(re)written, atomically, whenever it is missing or differs from what the current renderer produces
for the spec (rendering is cheap string building), so a file left by an older attnopt never runs.

Loaded kernels are kept in a process-wide dict keyed by the kernel's name (the spec's hash) and the file. This module does not
import triton: the generated module does, when :func:`load_generated` first imports it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import sys
import tempfile
import threading
from pathlib import Path
from typing import Callable

from attnopt.codegen.spec import KernelSpec

_LOADED: dict[tuple[str, Path], object] = {}
_LOCK = threading.Lock()


def cache_root() -> Path:
    """``$ATTNOPT_CACHE_DIR`` if set, else ``~/.cache/attnopt``."""
    env = os.environ.get("ATTNOPT_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "attnopt"


def kernel_path(spec: KernelSpec) -> Path:
    """Where the source of ``spec``'s kernel is cached."""
    return _path(spec.name)


def _path(name: str) -> Path:
    return cache_root() / "kernels" / f"{name}.py"


def atomic_write(path: Path, text: str) -> Path:
    """Writes ``text`` to ``path`` through a temporary file beside it and a rename: a reader (another process
    sharing the cache) sees the old file or the new one, never a partial write."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return path


def key_digest(key: dict) -> str:
    """A short stable name for a JSON-able cache key (the key itself is stored in the file and checked on read)."""
    return hashlib.sha256(json.dumps(key, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]


def read_keyed(path: Path, key: dict) -> dict | None:
    """The JSON record in ``path`` when its ``"key"`` equals ``key``; None when the file is missing, corrupt,
    or belongs to another key (a digest collision)."""
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return record if isinstance(record, dict) and record.get("key") == key else None


def write_keyed(path: Path, record: dict) -> Path:
    """Writes ``record`` (which holds its ``"key"``) as JSON to ``path``, atomically."""
    return atomic_write(path, json.dumps(record, indent=1, sort_keys=True))


def write_generated(name: str, source: str) -> Path:
    """Writes ``source`` to ``name``'s cache file, atomically, unless the file already holds exactly it."""
    path = _path(name)
    if path.is_file() and path.read_text(encoding="utf-8") == source:
        return path
    return atomic_write(path, source)


def load_generated(name: str, render_source: Callable[[], str]):
    """The ``@triton.jit`` function ``name``, from the module ``render_source()`` returns.

    Serves every generated-kernel family (exact, sparse, linear, sigmoid): the source is rendered and
    written only on the first load in the process, then imported from its cache file.
    """
    path = _path(name)
    with _LOCK:
        kernel = _LOADED.get((name, path))
        if kernel is None:
            kernel = _import_kernel(name, write_generated(name, render_source()))
            _LOADED[(name, path)] = kernel
    return kernel


def _import_kernel(name: str, path: Path):
    module_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module
    try:
        module_spec.loader.exec_module(module)
        kernel = getattr(module, name)
        _check_triton_mode(name, kernel, module.tl)
    except BaseException:
        del sys.modules[name]
        raise
    return kernel


def _check_triton_mode(name: str, kernel, tl) -> None:
    """Refuses a kernel made in another triton mode than triton.language's own ``@triton.jit`` helpers.

    ``@triton.jit`` reads ``TRITON_INTERPRET`` when it decorates: the helpers the kernels call (``tl.zeros``)
    got the mode in force at triton's first import, the kernel the mode in force now. Mixed, the launch fails
    inside the kernel ("Cannot call @triton.jit'd outside of the scope of a kernel" for an interpreted kernel).
    """
    from triton.runtime.interpreter import InterpretedFunction

    interpreted = isinstance(kernel, InterpretedFunction)
    helpers_interpreted = isinstance(tl.zeros, InterpretedFunction)
    if interpreted != helpers_interpreted:
        mode = {True: "interpreted (TRITON_INTERPRET=1)", False: "compiled"}
        raise RuntimeError(
            f"kernel {name} would run {mode[interpreted]} but triton.language's own functions are "
            f"{mode[helpers_interpreted]}: TRITON_INTERPRET changed after triton was first imported (torch._dynamo, "
            "and so transformers, import it). Set it (1 for the CPU interpreter, unset for a GPU) before anything "
            "imports triton, e.g. first thing in the program or in conftest.py."
        )


def clear_loaded() -> None:
    """Forgets the kernels loaded in this process (the files stay); the next load imports again."""
    with _LOCK:
        _LOADED.clear()
