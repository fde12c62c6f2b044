"""Ranks launched by torchrun: one gloo group that only synchronises, and each rank's own GPU.

Only a sweep whose ``Shard`` is ``launched`` (``current_shard`` saw torchrun's
``WORLD_SIZE``) touches ``torch.distributed``; a notebook or a ``--shard i/N``
task never does.
"""

from __future__ import annotations

from datetime import timedelta
import os

from mitk.sweeps.spec import SweepSpec


def rank_device(spec: SweepSpec) -> SweepSpec:
    """Under torchrun a bare ``cuda`` means this rank's own GPU (``LOCAL_RANK``)."""
    if spec.device == "cuda" and spec.device_map is None:
        return SweepSpec.from_dict(
            {**spec.to_dict(), "device": f"cuda:{os.environ.get('LOCAL_RANK', '0')}"}
        )
    return spec


def join_ranks() -> None:
    """Join torchrun's process group (gloo: it only synchronises, whatever the device)."""
    import torch.distributed as dist

    if not dist.is_initialized():
        # ranks finish their shares at different times; the barrier waits for the slowest
        dist.init_process_group("gloo", timeout=timedelta(days=1))


def wait_for_ranks() -> None:
    """Block until every rank has reached this point."""
    import torch.distributed as dist

    dist.barrier()


def leave_ranks() -> None:
    """Wait for every rank (nobody exits while rank 0 still merges), then tear the group down."""
    import torch.distributed as dist

    dist.barrier()
    dist.destroy_process_group()
