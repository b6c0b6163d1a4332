"""attnopt: an attention compiler for PyTorch.

    report = attnopt.inspect(model, args)           # every attention site, and what attnopt would do
    fast = attnopt.optimize(model, "exact", args)   # same function, attention through attnopt's kernels
    torch.compile(model, backend="attnopt")         # as a dynamo backend, then Inductor
    out = attnopt.attention(q, k, v, mask=..., variant=...)  # the kernels on raw tensors (docs/functional.md)

Importing attnopt is light: it registers the ``torch.ops.attnopt`` custom ops and imports neither
triton nor CUDA; kernels are generated and compiled when first needed.
"""

import importlib

from attnopt.kernels.exact import ops as _exact_ops  # noqa: F401  (registers torch.ops.attnopt.attention*)
from attnopt.api import (
    AttnoptError,
    CaptureError,
    GraphDeviationError,
    InputError,
    OptimizedModule,
    attention,
    generate,
    inspect,
    optimize,
    report,
)
from attnopt.backend import Backend, make_backend
from attnopt.policy import Exact, Keep, Linear, Policy, Sigmoid, Sparse
from attnopt.report import Report, Site
from attnopt.version import __version__  # noqa: F401


__all__ = [
    "AttnoptError",
    "Backend",
    "CaptureError",
    "Exact",
    "GraphDeviationError",
    "InputError",
    "Keep",
    "Linear",
    "OptimizedModule",
    "Policy",
    "Report",
    "Sigmoid",
    "Site",
    "Sparse",
    "attention",
    "generate",
    "inspect",
    "make_backend",
    "optimize",
    "report",
]

# Artifacts: attnopt.load(DIR) returns the optimized module an `attnopt convert` wrote.
from attnopt.artifact import ArtifactError, load  # noqa: E402

__all__ += ["ArtifactError", "load"]


def __getattr__(name: str):
    """``attnopt.hf`` (the Hugging Face integration) is imported on first use: it imports transformers."""
    if name == "hf":
        return importlib.import_module("attnopt.hf")
    raise AttributeError(f"module 'attnopt' has no attribute {name!r}")

# Sparse attention: mask descriptors and the torch.ops.attnopt.sparse_attention* ops (torch only).
from attnopt import masks  # noqa: E402
from attnopt.kernels.sparse import ops as _sparse_ops  # noqa: E402,F401  (registers torch.ops.attnopt.sparse_*)

__all__ += ["masks"]

# The functional API: every variant on raw tensors, NATTEN-style neighborhood attention, packed sequences.
from attnopt.functional import varlen_attention  # noqa: E402
from attnopt.natten import na1d, na2d, na3d  # noqa: E402

__all__ += ["na1d", "na2d", "na3d", "varlen_attention"]
