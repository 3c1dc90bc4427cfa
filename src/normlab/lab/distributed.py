"""Data-parallel runs of the lab: join the process group ``torchrun`` describes, and the few
collectives the trainer needs. One process (rank 0) writes metrics, checkpoints and reports.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["Team", "join"]


@dataclass(frozen=True)
class Team:
    """This process's place in the run: ``rank`` of ``world`` processes (1 without torchrun)."""

    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        """Rank 0: the process that writes the run folder."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def any(self, flag: bool) -> bool:
        """True on every process if ``flag`` is True on any (e.g. one of them was asked to stop)."""
        if not self.active:
            return flag
        value = torch.tensor([1.0 if flag else 0.0])
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item())

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        """The mean of a per-process tensor over the processes."""
        if not self.active:
            return value
        value = value.clone()
        dist.all_reduce(value)
        return value / self.world

    def share(self, obj):
        """Rank 0's ``obj`` on every process (e.g. an error message, or None for success)."""
        if not self.active:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]


def join(device: torch.device, timeout_s: float = 300.0) -> Team:
    """Join the process group that ``torchrun`` describes in the environment (``WORLD_SIZE``,
    ``RANK``, ``MASTER_ADDR``...), with gloo on the CPU and nccl on CUDA; a plain run is a
    team of one."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Team()
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return Team(dist.get_rank(), dist.get_world_size())
