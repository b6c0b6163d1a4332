"""The variants: what a site runs instead of the attention it was written as.

Each variant is a frozen config class and a handler registered in :mod:`attnopt.variants.registry`, in a module
of its own: :mod:`~attnopt.variants.exact` (exact and keep), :mod:`~attnopt.variants.sparse` (sparse and
exact-sparse), :mod:`~attnopt.variants.linear`, :mod:`~attnopt.variants.sigmoid`. (``auto`` is the policy's:
:mod:`attnopt.policy`.)

They register in the order imported here, which is the order ``auto`` asks them for candidates.
"""

from attnopt.variants import exact, sparse, linear, sigmoid  # noqa: F401,I001  (registration order)
