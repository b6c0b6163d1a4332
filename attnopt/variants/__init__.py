"""How approximate variants plug into the pipeline: applicability, validation and the code they emit.

The variant classes live in :mod:`attnopt.policy`; each delegates here (imported on first use, so that
``import attnopt`` stays light): :mod:`attnopt.variants.linear` for ``Linear`` and ``Sigmoid``.
"""
