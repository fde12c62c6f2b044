"""What a training run keeps across sessions: resume checks, NaN guards, the metric CSV.

Shared by ``mitk.sae.train`` and ``mitk.sae.train_clt``, so both refuse the same
mismatched resumes and stop on NaN/inf the same way.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from mitk.atomic import atomic_write_text
from mitk.checkpoint import load_checkpoint, refuse_existing_run
from mitk.errors import ConfigError, MitkError

# config fields that change when checkpoints are written, not what is trained: a resume may differ
SCHEDULE_FIELDS = ("checkpoint_every", "checkpoint_seconds")


class NonFiniteError(MitkError, FloatingPointError):
    """Activations or a loss were NaN/inf; training stopped and the last checkpoint was kept."""


def restored_run(
    directory: Path | None,
    resume: bool,
    state: nn.Module,
    optimizer: torch.optim.Optimizer,
    meta: dict[str, Any],
) -> dict[str, Any] | None:
    """The checkpoint a resumed run continues from (loaded into ``state`` and ``optimizer``).

    ``None`` for a fresh run, which refuses a directory that already holds one.
    ``meta`` holds ``configs`` (dicts) and the ``source`` fingerprint; a checkpoint
    made with other configs (beyond ``SCHEDULE_FIELDS``) or another source is refused.
    """
    if directory is not None and not resume:
        refuse_existing_run(directory)
    restored = load_checkpoint(directory, state, optimizer) if resume and directory else None
    if restored is not None:
        trained_as = [trajectory(c) for c in restored["configs"]]
        if trained_as != [trajectory(c) for c in meta["configs"]] or (
            restored["source"] != meta["source"]
        ):
            raise ConfigError(
                f"the checkpoint in {directory} was made with other configs or another "
                "activation source; resume with the same ones, or use a new directory"
            )
    return restored


def trajectory(config: dict[str, Any]) -> dict[str, Any]:
    """A config dict without the checkpoint-schedule fields, which a resume may change.

    Compared as JSON values, since a checkpoint's configs come back from JSON (tuples as lists).
    """
    kept = {k: v for k, v in config.items() if k not in SCHEDULE_FIELDS}
    return dict(json.loads(json.dumps(kept)))


def check_finite(value: Tensor, what: str, step: int, directory: Path | None) -> None:
    """Raise ``NonFiniteError`` (naming ``what``, the step and the kept checkpoint) on NaN/inf."""
    if bool(torch.isfinite(value).all()):
        return
    bad = int((~torch.isfinite(value)).sum())
    kept = f"; the last checkpoint in {directory} is untouched" if directory else ""
    raise NonFiniteError(f"{what} at step {step} hold {bad} NaN/inf value(s); stopped{kept}")


def write_csv_atomically(path: Path, history: list[dict[str, Any]]) -> None:
    """Write the metric history (one row per record, the first record's keys) atomically."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(history[0]))
    writer.writeheader()
    writer.writerows(history)
    atomic_write_text(path, buffer.getvalue())
