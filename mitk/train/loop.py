"""A small language-model training loop: AdamW, warmup + cosine, atomic checkpoints, resume."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
import math
from pathlib import Path
import time
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from mitk.checkpoint import (
    CheckpointSchedule,
    load_checkpoint,
    refuse_existing_run,
    save_checkpoint,
)
from mitk.errors import ConfigError, MitkError
from mitk.model import HookedTransformer
from mitk.train.schedule import warmup_cosine

BatchFn = Callable[[int], Tensor]


class NonFiniteLossError(MitkError, FloatingPointError):
    """Training produced NaN/inf; the last good checkpoint is left untouched."""


@dataclass(frozen=True)
class TrainConfig:
    """Optimiser and schedule settings for ``train_language_model``."""

    steps: int = 2000
    """Optimiser steps in total."""
    lr: float = 1e-3
    """Peak learning rate."""
    warmup: int = 100
    """Linear warmup steps."""
    weight_decay: float = 0.01
    """AdamW decoupled weight decay (applied to matrices only, not norms or biases)."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0 disables)."""
    checkpoint_every: int = 500
    """Steps between checkpoints, when a checkpoint directory is given (and always at the end)."""
    checkpoint_seconds: float = 300.0
    """Also checkpoint at the first log step this many seconds after the last one (0: off)."""
    log_every: int = 50
    """Steps between recorded metrics."""

    def __post_init__(self) -> None:
        if self.steps <= 0 or self.warmup < 0 or self.lr <= 0:
            raise ConfigError(f"steps and lr must be positive and warmup >= 0: {self}")
        if self.checkpoint_every <= 0 or self.log_every <= 0:
            raise ConfigError("checkpoint_every and log_every must be positive")
        if not (math.isfinite(self.checkpoint_seconds) and self.checkpoint_seconds >= 0):
            raise ConfigError(
                f"checkpoint_seconds must be finite and >= 0, got {self.checkpoint_seconds!r}"
            )


def _optimizer(model: HookedTransformer, cfg: TrainConfig) -> torch.optim.AdamW:
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.98))


def train_language_model(
    model: HookedTransformer,
    batch_fn: BatchFn,
    cfg: TrainConfig,
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
    clock: Callable[[], float] = time.monotonic,
) -> list[dict[str, Any]]:
    """Train ``model`` on next-token loss over ``batch_fn(step)`` batches; returns logged metrics.

    ``batch_fn`` must be a pure function of the step (seed it from the step),
    which is what makes a resumed run identical to an uninterrupted one.
    Checkpoints go to ``checkpoint_dir`` every ``cfg.checkpoint_every`` steps,
    every ``cfg.checkpoint_seconds`` of ``clock`` (at a log step) and at the
    end, so a run of any length can be resumed. With ``resume=True`` training
    continues from its newest intact checkpoint, verified against the hashes
    recorded with it (a damaged ``latest`` falls back to ``previous`` with an
    ``IntegrityWarning``); ``NoCheckpointError`` if there is none,
    ``NoIntactCheckpointError`` if none is intact. A non-finite loss raises
    ``NonFiniteLossError`` before the optimiser touches the weights.
    """
    directory = Path(checkpoint_dir) if checkpoint_dir is not None else None
    if resume and directory is None:
        raise ConfigError("resume=True needs the checkpoint_dir to resume from")
    optimizer = _optimizer(model, cfg)
    start, history = 0, []
    if directory is not None and not resume:
        refuse_existing_run(directory)
    if resume and directory is not None:
        meta = load_checkpoint(directory, model, optimizer)
        start, history = meta["step"], meta["history"]
    schedule = CheckpointSchedule(cfg.checkpoint_every, cfg.checkpoint_seconds, cfg.steps, clock)
    model.train()
    with deterministic_algorithms():
        _steps(model, batch_fn, cfg, optimizer, start, history, directory, schedule, progress)
    model.eval()
    return history


@contextmanager
def deterministic_algorithms() -> Iterator[None]:
    """``torch.use_deterministic_algorithms`` within the block, the caller's setting after.

    Without it the CPU backward of an embedding lookup of more than about a thousand
    ids sums repeated ids' gradients in an order that varies with the threads
    (measured: two 2-thread runs on 64 x 64 tokens differed in ``W_E``), so a
    resumed run would not equal an uninterrupted one. ``warn_only``: an op without
    a deterministic kernel (on a GPU) warns rather than stopping the run.
    """
    was, was_warn_only = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
    )
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was, warn_only=was_warn_only)


def _steps(
    model: HookedTransformer,
    batch_fn: BatchFn,
    cfg: TrainConfig,
    optimizer: torch.optim.Optimizer,
    start: int,
    history: list[dict[str, Any]],
    directory: Path | None,
    schedule: CheckpointSchedule,
    progress: bool,
) -> None:
    """Steps ``start .. cfg.steps - 1``, appending to ``history`` and checkpointing."""
    bar = tqdm(range(start, cfg.steps), disable=not progress, desc="train", initial=start,
               total=cfg.steps)  # fmt: skip
    for step in bar:
        # the lr is a pure function of the step, so a resumed run needs no scheduler state
        lr = cfg.lr * warmup_cosine(step, cfg.steps, cfg.warmup)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss = model(batch_fn(step), return_type="loss")
        if not math.isfinite(loss.item()):
            raise NonFiniteLossError(f"loss is {loss.item()} at step {step}; weights not updated")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        done = step + 1
        logged = done % cfg.log_every == 0 or done == cfg.steps
        if logged:
            history.append({"step": done, "loss": loss.item(), "lr": lr})
            bar.set_postfix(loss=f"{loss.item():.3f}")
        if directory is not None and schedule.due(done, logged):
            meta = {"step": done, "history": history, "train_config": asdict(cfg)}
            save_checkpoint(directory, model, optimizer, meta)
            schedule.written()
