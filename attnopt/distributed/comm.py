"""The collectives context parallelism uses, on a ``torch.distributed`` process group, counting what they send.

Every call adds the bytes of the tensors this rank passes to it (the payload it contributes: an
all-gather's input, a reduce-scatter's input, each point-to-point send) to :data:`TRAFFIC`, so the
benchmarks and tests read measured traffic, not a formula.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.device_mesh import DeviceMesh


@dataclass
class Traffic:
    """Bytes this process passed to the collectives, in total and per routed op call (``(op, bytes)``)."""

    sent_bytes: int = 0
    calls: list = field(default_factory=list)

    def reset(self) -> None:
        self.sent_bytes = 0
        self.calls.clear()


TRAFFIC = Traffic()


def _count(*tensors: Tensor) -> None:
    TRAFFIC.sent_bytes += sum(t.numel() * t.element_size() for t in tensors)


class Comm:
    """A process group (the default one for None) and the collectives on it."""

    def __init__(self, group=None):
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("attnopt.distributed needs an initialized process group: call "
                               "torch.distributed.init_process_group('gloo' or 'nccl', ...) first")  # fmt: skip
        self.group = group
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)

    def all_gather(self, t: Tensor) -> Tensor:
        """``[world, *t.shape]``: every rank's ``t``, by rank."""
        t = t.contiguous().unsqueeze(0)
        out = t.new_empty((self.world, *t.shape[1:]))
        _count(t)
        dist.all_gather_single(out, t, group=self.group)  # gloo wants the ranks along the first dim
        return out

    def reduce_scatter(self, t: Tensor) -> Tensor:
        """``t [world, ...]`` summed over ranks; this rank's slice ``[...]``."""
        t = t.contiguous()
        out = t.new_empty((1, *t.shape[1:]))
        _count(t)
        dist.reduce_scatter_single(out, t, group=self.group)
        return out[0]

    def exchange(self, sends: list[tuple[int, Tensor]], recvs: list[tuple[int, Tensor]]) -> None:
        """Point-to-point: each ``(peer, tensor)`` of ``sends`` to its peer, each of ``recvs`` filled from its
        peer (peers are ranks in the group; messages between one pair match in order)."""
        ops = []
        for peer, t in sends:
            _count(t)
            ops.append(dist.P2POp(dist.isend, t.contiguous(), self._global(peer), self.group))
        ops += [dist.P2POp(dist.irecv, t, self._global(peer), self.group) for peer, t in recvs]
        if ops:
            for work in dist.batch_isend_irecv(ops):
                work.wait()

    def _global(self, peer: int) -> int:
        return peer if self.group is None else dist.get_global_rank(self.group, peer)

    def all_reduce(self, t: Tensor) -> Tensor:
        _count(t)
        dist.all_reduce(t, group=self.group)
        return t


def as_group(mesh_or_group):
    """The process group of a 1-D DeviceMesh, a process group, or None (the default group)."""
    if isinstance(mesh_or_group, DeviceMesh):
        if mesh_or_group.ndim != 1:
            raise ValueError(f"context_parallel takes a 1-D DeviceMesh (the context-parallel dimension); got "
                             f"{mesh_or_group.ndim}-D: pass mesh['cp'] for the dimension to shard over")  # fmt: skip
        return mesh_or_group.get_group()
    return mesh_or_group


def acc(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32
