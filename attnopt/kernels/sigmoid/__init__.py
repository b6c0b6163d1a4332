"""Sigmoid attention: the reference, the custom ops (registered on import; no triton) and the Triton kernels.

``torch.ops.attnopt.sigmoid_attention`` computes ``σ(scale · Q Kᵀ + b + mask) V`` (default
``b = -log Sk``); see :mod:`attnopt.kernels.sigmoid.reference`.
"""

from attnopt.kernels.sigmoid import ops  # noqa: F401  (registers torch.ops.attnopt.sigmoid_attention*)
