"""Atomic training checkpoints: module and optimizer tensors in safetensors, the rest in JSON.

Shared by every long run (the language-model loop, the SAE trainer): the checkpoint folder is
written with ``mitk.atomic.atomic_folder``, so a crash leaves the last complete one.
``CheckpointSchedule`` is the one rule for when they write one.
"""

from __future__ import annotations

from collections.abc import Callable
import json
from pathlib import Path
import time
from typing import Any

from safetensors.torch import load_file, save_file
import torch
from torch import Tensor, nn

from mitk.atomic import atomic_folder, complete_folder
from mitk.errors import MitkError

LATEST = "latest"


class NoCheckpointError(MitkError, FileNotFoundError):
    """Resuming was asked for, but the checkpoint directory holds no complete checkpoint."""


class CheckpointSchedule:
    """When a long run writes a checkpoint: every ``every_steps`` steps, by the clock, at the end.

    The clock rule fires at the first log step (``log_step=True``) at least
    ``every_seconds`` after the last checkpoint or the start, so a run of any
    length is resumable and a kill loses about ``every_seconds`` of work plus
    one logging interval at most. Waiting for a log step keeps resumed metrics
    identical: nothing is half-accumulated there. ``every_seconds=0`` turns the
    clock rule off. ``clock`` returns seconds (``time.monotonic``; tests pass a fake).
    """

    def __init__(
        self,
        every_steps: int,
        every_seconds: float,
        total_steps: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.every_steps, self.every_seconds, self.total_steps = (
            every_steps,
            every_seconds,
            total_steps,
        )
        self.clock = clock
        self._last = clock()

    def by_step(self, done: int) -> bool:
        """Whether ``done`` completed steps call for a checkpoint by count (or as the last step)."""
        return done % self.every_steps == 0 or done == self.total_steps

    def by_time(self) -> bool:
        """Whether ``every_seconds`` have passed since the last checkpoint (or the start)."""
        return self.every_seconds > 0 and self.clock() - self._last >= self.every_seconds

    def due(self, done: int, log_step: bool) -> bool:
        """One process's rule: by step count, or by the clock at a log step."""
        return self.by_step(done) or (log_step and self.by_time())

    def written(self) -> None:
        """Restart the clock: a checkpoint was just written."""
        self._last = self.clock()


def require_checkpoint(directory: Path) -> Path:
    """The last complete checkpoint folder in ``directory``; ``NoCheckpointError`` if none.

    Resuming calls this first, so asking to resume a run that never checkpointed
    says so instead of silently starting over.
    """
    target = complete_folder(directory / LATEST)  # a crash mid-swap leaves the old one aside
    if target is None:
        raise NoCheckpointError(
            f"nothing to resume: {directory} holds no complete checkpoint ({LATEST}/ is "
            "missing); start without resume to train from the beginning"
        )
    return target


def save_checkpoint(
    directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer, meta: dict[str, Any]
) -> Path:
    """Write ``directory/latest`` atomically: a complete folder replaces the old one."""
    tensors, opt_meta = _flatten_optimizer(optimizer.state_dict())
    with atomic_folder(directory / LATEST) as staging:
        save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()},
                  staging / "model.safetensors")  # fmt: skip
        save_file(tensors, staging / "optimizer.safetensors")
        (staging / "state.json").write_text(json.dumps({"meta": meta, "optimizer": opt_meta}))
    return directory / LATEST


def load_checkpoint(
    directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer
) -> dict[str, Any]:
    """Restore the last complete checkpoint into ``model``/``optimizer``; returns its meta.

    Raises ``NoCheckpointError`` when ``directory`` holds none.
    """
    target = require_checkpoint(directory)
    state = json.loads((target / "state.json").read_text())
    model.load_state_dict(load_file(target / "model.safetensors"))
    tensors = load_file(target / "optimizer.safetensors")
    optimizer.load_state_dict(_unflatten_optimizer(tensors, state["optimizer"]))
    return dict(state["meta"])


def _flatten_optimizer(state: dict[str, Any]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    tensors: dict[str, Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, slots in state["state"].items():
        for key, value in slots.items():
            if isinstance(value, Tensor):
                tensors[f"{index}.{key}"] = value.detach().contiguous()
            else:
                scalars.setdefault(str(index), {})[key] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    for index, slots in meta["scalars"].items():
        state.setdefault(int(index), {}).update(slots)
    return {"state": state, "param_groups": meta["param_groups"]}
