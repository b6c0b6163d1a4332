"""Context parallelism for attnopt-optimized models on ``torch.distributed`` (docs/distributed.md).

``with attnopt.distributed.context_parallel(mesh, buffers=[ids, pos], buffer_seq_dims=[1, 1]):`` runs an
optimized model with its sequence sharded: exact sites exchange K/V by all-gather, sliding-window sites
only their neighbours' halos, causal linear sites only their ``[D, Dv]`` states. :data:`TRAFFIC` counts the
bytes each process passes to the collectives.
"""

from attnopt.distributed.comm import TRAFFIC, Comm, Traffic
from attnopt.distributed.context import Router, context_parallel, shard, site_mask, unshard
from attnopt.distributed.layout import Layout, visible_key_tiles

__all__ = ["TRAFFIC", "Comm", "Layout", "Router", "Traffic", "context_parallel", "shard", "site_mask", "unshard",
           "visible_key_tiles"]
