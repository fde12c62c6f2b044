"""Atomic, verified training checkpoints: tensors in safetensors, the rest in JSON, hashes beside.

Shared by every long run (the language-model loop, the SAE trainer). A
checkpoint is a folder (``model.safetensors``, ``optimizer.safetensors``,
``state.json`` and ``hashes.json``, the ledger of the other three; see
``mitk.integrity``) written with ``mitk.atomic.atomic_folder``. The directory
keeps two: ``latest/`` and ``previous/``, the newest intact one before it.
Resuming verifies ``latest/`` first and falls back to ``previous/`` with an
``IntegrityWarning`` naming the damaged file; with neither intact it raises
``NoIntactCheckpointError``, never starting over. ``CheckpointSchedule`` is the
one rule for when they write one.
"""

from __future__ import annotations

from collections.abc import Callable
import json
from pathlib import Path
import time
from typing import Any
import warnings

from safetensors.torch import load_file, save_file
import torch
from torch import Tensor, nn

from mitk.atomic import atomic_folder, complete_folder, move_folder, remove_leftovers
from mitk.errors import MitkError
from mitk.integrity import CorruptFileError, IntegrityWarning, verify, write_ledger

LATEST = "latest"
PREVIOUS = "previous"
FILES = ("model.safetensors", "optimizer.safetensors", "state.json")
"""What a checkpoint folder holds besides its ledger."""
LEDGER = "hashes.json"


class NoCheckpointError(MitkError, FileNotFoundError):
    """Resuming was asked for, but the checkpoint directory holds no complete checkpoint."""


class NoIntactCheckpointError(NoCheckpointError, CorruptFileError):
    """Every checkpoint in the directory is damaged; the message names each damaged file."""


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
    """The newest intact checkpoint folder in ``directory``, verified against its hashes.

    Resuming calls this first. Passing over a damaged or missing ``latest/``
    warns (``IntegrityWarning``) naming the file and what was wrong;
    ``NoIntactCheckpointError`` when no checkpoint is intact, and
    ``NoCheckpointError`` when there is none at all, so asking to resume never
    silently starts over. Leftovers of a killed checkpoint write are deleted.
    """
    remove_leftovers(directory, (LATEST, PREVIOUS))
    latest, previous = complete_folder(directory / LATEST), directory / PREVIOUS
    candidates = [c for c in (latest, previous) if c is not None and c.is_dir()]
    if not candidates:
        raise NoCheckpointError(
            f"nothing to resume: {directory} holds no complete checkpoint ({LATEST}/ is "
            "missing); start without resume to train from the beginning"
        )
    passed_over = [] if latest is not None else [f"{directory / LATEST}: missing"]
    for folder in candidates:
        try:
            verify_checkpoint(folder)
        except CorruptFileError as err:
            passed_over.append(str(err))
            continue
        for reason in passed_over:
            warnings.warn(f"{reason}; resuming from {folder} instead", IntegrityWarning,
                          stacklevel=2)  # fmt: skip
        return folder
    raise NoIntactCheckpointError(
        f"no intact checkpoint to resume in {directory}: {'; '.join(passed_over)}. Start "
        "without resume to train from the beginning (or restore the files)"
    )


class CheckpointExistsError(MitkError, FileExistsError):
    """A fresh run was pointed at a directory that holds another run's checkpoints."""


def refuse_existing_run(directory: Path) -> None:
    """Raise ``CheckpointExistsError`` when ``directory`` holds a checkpoint of an earlier run.

    A fresh run would replace it within two saves; the last good checkpoint of a
    killed run is exactly what must not be lost, so starting over has to be asked
    for by emptying the directory or choosing another.
    """
    held = [directory / name for name in (LATEST, PREVIOUS) if (directory / name).exists()]
    if held:
        raise CheckpointExistsError(
            f"{directory} holds checkpoints of an earlier run ({', '.join(p.name for p in held)}); "
            "resume it (resume=True, --resume), or pick a new or empty checkpoint directory"
        )


def verify_checkpoint(folder: Path) -> None:
    """Check a checkpoint folder's files against its ``hashes.json``; else ``CorruptFileError``."""
    verify(folder / LEDGER, {name: folder / name for name in FILES})


def reseal_checkpoint(folder: Path) -> Path:
    """Record fresh hashes for a checkpoint folder whose files were edited on purpose.

    For tools that rewrite a checkpoint deliberately (e.g. a benchmark zeroing the
    optimiser state); anything else that changes a file is damage, caught on resume.
    """
    return write_ledger(folder / LEDGER, {name: folder / name for name in FILES})


def save_checkpoint(
    directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer, meta: dict[str, Any]
) -> Path:
    """Write ``directory/latest`` atomically with its hashes; the old one, if intact, becomes
    ``previous``. A damaged old ``latest`` is dropped with a warning, keeping ``previous``."""
    remove_leftovers(directory, (LATEST, PREVIOUS))
    tensors, opt_meta = _flatten_optimizer(optimizer.state_dict())
    with atomic_folder(directory / LATEST) as staging:
        save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()},
                  staging / "model.safetensors")  # fmt: skip
        save_file(tensors, staging / "optimizer.safetensors")
        (staging / "state.json").write_text(json.dumps({"meta": meta, "optimizer": opt_meta}))
        write_ledger(staging / LEDGER, {name: staging / name for name in FILES})
        _keep_as_previous(directory)
    return directory / LATEST


def _keep_as_previous(directory: Path) -> None:
    """Move the current ``latest`` (or its set-aside copy) to ``previous`` if it is intact.

    At every instant one intact checkpoint stays under ``latest`` or ``previous``.
    """
    current = complete_folder(directory / LATEST)
    if current is None:
        return
    try:
        verify_checkpoint(current)
    except CorruptFileError as err:
        warnings.warn(f"{err}; dropping {current}, keeping {directory / PREVIOUS}",
                      IntegrityWarning, stacklevel=3)  # fmt: skip
        return  # the swap replaces it; previous stays the last intact one
    move_folder(current, directory / PREVIOUS)


def load_checkpoint(
    directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer
) -> dict[str, Any]:
    """Restore the newest intact checkpoint into ``model``/``optimizer``; returns its meta.

    See ``require_checkpoint`` for the fallback, warnings and errors.
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
