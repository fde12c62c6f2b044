"""An activation source that stands in for a killed or poisoned run (for resume tests)."""

from __future__ import annotations

from collections.abc import Callable
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from mitk.sae import TrainResult, train


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


def kill_then_resume(cfg: Any, source: Any, tmp_path: Path) -> tuple[TrainResult, TrainResult]:
    """Train ``cfg`` whole, then again killed at step 10 and resumed; both results.

    Checks that the kill left the step-8 checkpoint (``checkpoint_every=4``) and
    that the resumed run ends bit-identical to the whole one: every tensor of
    the SAE's state and the logged history.
    """
    whole = train(cfg, source, checkpoint_dir=tmp_path / "a", progress=False)
    with pytest.raises(KilledError):
        train(cfg, InterruptedSource(source, 10), checkpoint_dir=tmp_path / "b", progress=False)
    saved = json.loads((tmp_path / "b" / "latest" / "state.json").read_text())
    assert saved["meta"]["step"] == 8  # the last complete checkpoint before the kill
    resumed = train(cfg, source, checkpoint_dir=tmp_path / "b", resume=True, progress=False)
    expected, got = whole.sae.state_dict(), resumed.sae.state_dict()
    for name, tensor in expected.items():
        assert torch.equal(tensor, got[name]), name
    assert resumed.history == whole.history
    return whole, resumed
