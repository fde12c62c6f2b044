"""Data parallelism for SAE training over ``torch.distributed`` (launched by torchrun).

Every rank computes the same global batch index, keeps its own slice of the
rows, and averages gradients and statistics with all-reduce, so N ranks follow
one optimiser trajectory. Without an initialised process group everything here
is the identity.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
import os

import torch
from torch import Tensor
import torch.distributed as dist

from mitk.errors import ConfigError


@dataclass(frozen=True)
class World:
    """This process's place among the training processes."""

    rank: int = 0
    size: int = 1

    @property
    def is_main(self) -> bool:
        """True on the process that logs and writes checkpoints."""
        return self.rank == 0

    def rows(self, batch_size: int) -> slice:
        """This rank's contiguous share of a global batch of ``batch_size`` rows."""
        if batch_size % self.size:
            raise ConfigError(
                f"batch_size={batch_size} does not split evenly over {self.size} processes"
            )
        share = batch_size // self.size
        return slice(self.rank * share, (self.rank + 1) * share)

    def average_(self, tensors: Iterable[Tensor | None]) -> None:
        """Replace each tensor, in place, by its mean over ranks (one flat all-reduce)."""
        if self.size == 1:
            return
        items = [t for t in tensors if t is not None]
        if not items:
            return
        flat = torch.cat([t.reshape(-1) for t in items])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat /= self.size
        offset = 0
        for t in items:
            t.copy_(flat[offset : offset + t.numel()].view_as(t))
            offset += t.numel()

    def any_(self, mask: Tensor) -> Tensor:
        """Logical OR of a boolean mask over ranks."""
        if self.size == 1:
            return mask
        counts = mask.to(torch.int32)
        dist.all_reduce(counts, op=dist.ReduceOp.SUM)
        return counts > 0

    def finish(self) -> None:
        """Leave together and tear the process group down.

        A rank that exits while its peer is still working (rank 0 saving, say)
        can take gloo down under it and abort that peer.
        """
        if self.size > 1:
            dist.barrier()
            dist.destroy_process_group()

    def barrier(self) -> None:
        """Wait for every rank (e.g. until rank 0 has written a checkpoint)."""
        if self.size > 1:
            dist.barrier()


def current_world() -> World:
    """The process group torchrun set up, initialising it from the environment if needed.

    Under torchrun (``WORLD_SIZE`` > 1) with no group yet, one is created with
    NCCL when CUDA is available, else gloo. Without torchrun: a world of one.
    """
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size())
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
        return World(dist.get_rank(), dist.get_world_size())
    return World()
