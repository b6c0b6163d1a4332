"""Linear attention: the reference, the chunked CPU path, the custom ops and the recurrent decode.

Importing this package registers ``torch.ops.attnopt.linear_attention`` (and its backward) and imports
no triton; the Triton kernels load on the first CUDA call. See :mod:`attnopt.kernels.linear.reference`
for the semantics, :mod:`attnopt.kernels.linear.chunked` for the chunked algorithm and
:mod:`attnopt.kernels.linear.decode` for generation through the recurrent step.
"""

from attnopt.kernels.linear import ops  # noqa: F401  (registers torch.ops.attnopt.linear_attention*)
from attnopt.kernels.linear.reference import feature_map, lightning_log_decay, linear_attention_step

__all__ = ["feature_map", "lightning_log_decay", "linear_attention_step"]
