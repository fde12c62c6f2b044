"""An activation source that stands in for a killed or poisoned run (for resume tests)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


class KilledError(Exception):
    """Raised where the run would have been killed (kill -9 mid-run)."""


class InterruptedSource:
    """Wraps an activation source: at step ``at`` it dies, or hands out a poisoned batch.

    ``poison`` fills that step's batch with the value instead of dying; ``on_batch``
    runs before every batch that is served (e.g. to advance a fake clock).
    """

    def __init__(
        self,
        source: Any,
        at: int | None = None,
        poison: float | None = None,
        on_batch: Callable[[], None] | None = None,
    ) -> None:
        self.source, self.at, self.poison, self.on_batch = source, at, poison, on_batch
        self.hook_names, self.batch_size, self.d_in = (
            source.hook_names,
            source.batch_size,
            source.d_in,
        )

    def batch(self, step: int) -> dict[str, torch.Tensor]:
        if step == self.at and self.poison is None:
            raise KilledError
        if self.on_batch is not None:
            self.on_batch()
        out = dict(self.source.batch(step))
        if step == self.at:
            out = {k: v.clone().fill_(self.poison) for k, v in out.items()}
        return out

    def scale(self, hook_name: str) -> float:
        return float(self.source.scale(hook_name))

    def fingerprint(self) -> dict[str, Any]:
        return dict(self.source.fingerprint())
