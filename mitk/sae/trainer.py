"""``mitk.sae.train``: train one SAE per hook point on an activation source, resumably."""

from __future__ import annotations

from collections.abc import Callable, Sequence
import copy
from dataclasses import dataclass, field
import logging
import math
from pathlib import Path
import time
from typing import Any
import warnings

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from mitk.checkpoint import CheckpointSchedule, save_checkpoint
from mitk.errors import ConfigError, ShapeMismatchError
from mitk.sae.autoencoder import SparseAutoencoder
from mitk.sae.collapse import FLAG, CollapseError, CollapseWarning, collapse_verdict
from mitk.sae.config import SAEConfig
from mitk.sae.distributed import World, current_world
from mitk.sae.geometric_median import geometric_median
from mitk.sae.losses import LossParts, sae_loss
from mitk.sae.metrics import ReconstructionStats
from mitk.sae.resample import resample_due, resample_silent_
from mitk.sae.run_state import (
    check_finite,
    restored_run,
    write_csv_atomically,
)
from mitk.sae.schedule import lr_factor, warmup_factor
from mitk.sae.sources import ActivationSource, TensorActivations

_log = logging.getLogger("mitk.sae")
THRESHOLD_EMA = 0.99  # BatchTopK: smoothing of the inference-threshold estimate


@dataclass
class TrainResult:
    """What ``train`` returns: the trained dictionaries by label, and the logged metrics.

    A label is the config's hook name, ``"{hook}->{target}"`` for a transcoder, and
    ``"{label}[{j}]"`` (j counting from 0 in the order given) where several configs
    share one; metrics are keyed ``"{label}/{metric}"``. ``in_order`` lists the
    dictionaries in the order of the configs.
    """

    saes: dict[str, SparseAutoencoder]
    history: list[dict[str, Any]] = field(default_factory=list)

    @property
    def in_order(self) -> list[SparseAutoencoder]:
        """The trained dictionaries in the order their configs were given."""
        return list(self.saes.values())

    @property
    def sae(self) -> SparseAutoencoder:
        """The SAE, when exactly one was trained."""
        if len(self.saes) != 1:
            raise ValueError(f"{len(self.saes)} SAEs were trained; pick one from .saes")
        return next(iter(self.saes.values()))


class _TrainingState(nn.Module):
    """Everything a checkpoint must restore besides the optimiser: SAEs and firing clocks."""

    def __init__(self, saes: list[SparseAutoencoder]) -> None:
        super().__init__()
        self.saes = nn.ModuleList(saes)
        self.models = saes  # the same modules, typed
        for i, sae in enumerate(saes):
            # rows since each latent last fired, counted in optimiser steps
            self.register_buffer(f"idle_steps_{i}", torch.zeros(sae.cfg.d_sae, dtype=torch.long))
            self.register_buffer(f"resampled_{i}", torch.zeros((), dtype=torch.long))

    def idle_steps(self, i: int) -> Tensor:
        idle: Tensor = getattr(self, f"idle_steps_{i}")
        return idle

    def resampled(self, i: int) -> Tensor:
        """Latents of dictionary ``i`` resampled so far (a count over the whole run)."""
        count: Tensor = getattr(self, f"resampled_{i}")
        return count


def train(
    cfg: SAEConfig | Sequence[SAEConfig],
    source: ActivationSource | Tensor,
    *,
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
    log_csv: str | Path | None = None,
    wandb_project: str | None = None,
    device: str | torch.device | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> TrainResult:
    """Train one SAE per config on ``source``'s activations; returns the SAEs and metrics.

    - ``source``: an ``ActivationSource`` (e.g. ``ActivationStore`` over a model,
      ``CachedActivations``) or a ``[n, d_in]`` tensor of activations. Each
      config's ``hook_name`` picks its activations ("" works with a one-hook source).
      All configs share one pass over the data, so their ``batch_size`` and
      ``total_tokens`` must agree; several may read the same hook (a sweep over
      width, k or sparsity costs one model pass). A transcoder config
      (``target_hook_name``) reconstructs that hook's activations from its own.
    - ``checkpoint_dir``: checkpoints are written there atomically every
      ``checkpoint_every`` steps, at the first log step ``checkpoint_seconds``
      (of ``clock``) after the last one, and at the end, so a run of any length
      can be resumed; ``resume=True`` continues from the last complete one and
      ends bit-identical (on CPU) to an uninterrupted run, or raises
      ``NoCheckpointError`` when there is none.
    - Metrics every ``log_every`` steps: loss parts, L0, FVU over the window,
      dead and dense latent fractions, learning rate; to ``log_csv`` (rewritten
      atomically) and to Weights & Biases when ``wandb_project`` is given.
    - Under torchrun each process trains on its slice of every batch and gradients
      are averaged; rank 0 logs and writes checkpoints.
    - Activations or losses that are NaN/inf raise ``NonFiniteError`` before any
      weight changes; the last checkpoint stays as it was.

    The returned SAEs read raw activations: a source's normalisation scale is
    folded into their weights.
    """
    cfgs = [cfg] if isinstance(cfg, SAEConfig) else list(cfg)
    if not cfgs:
        raise ConfigError("train needs at least one SAEConfig")
    if isinstance(source, Tensor):
        source = TensorActivations(source, cfgs[0].batch_size, seed=cfgs[0].seed)
    cfgs = _bind_hooks(cfgs, source)
    labels = run_labels(cfgs)
    directory = Path(checkpoint_dir) if checkpoint_dir is not None else None
    if resume and directory is None:
        raise ConfigError("resume=True needs the checkpoint_dir to resume from")
    world = current_world()
    rows = world.rows(cfgs[0].batch_size)
    target = torch.device(device) if device is not None else torch.device("cpu")
    state = _TrainingState([SparseAutoencoder(c) for c in cfgs]).to(target)
    optimizer = torch.optim.Adam(
        {"params": list(sae.parameters()), "lr": c.peak_lr, "betas": (c.adam_beta1, c.adam_beta2)}
        for sae, c in zip(state.models, cfgs, strict=True)
    )
    meta: dict[str, Any] = {"configs": [c.to_dict() for c in cfgs], "source": source.fingerprint()}
    start, history = 0, []
    restored = restored_run(directory, resume, state, optimizer, meta)
    if restored is not None:
        start, history = restored["step"], restored["history"]
    else:
        _init_decoder_bias(state, cfgs, source.batch(0), target)
    logger = _Logger(log_csv, wandb_project, cfgs, world)
    total = cfgs[0].total_steps
    schedule = CheckpointSchedule(
        cfgs[0].checkpoint_every, cfgs[0].checkpoint_seconds, total, clock
    )
    window = [ReconstructionStats(c.d_out, c.d_sae) for c in cfgs]
    bar = tqdm(range(start, total), desc="sae", initial=start, total=total,
               disable=not (progress and world.is_main))  # fmt: skip
    for step in bar:
        batch = source.batch(step)
        parts = []
        optimizer.zero_grad(set_to_none=True)
        for i, (sae, c) in enumerate(zip(state.models, cfgs, strict=True)):
            x = batch[c.hook_name][rows].to(target, sae.W_enc.dtype)
            check_finite(x, f"activations of {c.hook_name!r}", step, directory)
            y = x
            if c.is_transcoder:
                y = batch[c.target_hook_name][rows].to(target, sae.W_enc.dtype)
                check_finite(y, f"activations of {c.target_hook_name!r}", step, directory)
            factor = lr_factor(step, c.total_steps, c.lr_warmup_fraction, c.lr_decay_fraction)
            optimizer.param_groups[i]["lr"] = c.peak_lr * factor
            idle = state.idle_steps(i)
            dead = idle * c.batch_size >= c.dead_window
            warm = warmup_factor(step, c.sparsity_warmup_fraction, c.total_steps)
            part = sae_loss(sae, x, warm, dead, target=y if c.is_transcoder else None)
            check_finite(part.loss.detach(), f"the loss of {labels[i]!r}", step, directory)
            part.loss.backward()
            parts.append(part)
            counts = part.fire_counts
            window[i].update(y, part.reconstruction, fires=counts, active=float(counts.sum()))
        for i, (sae, c, part) in enumerate(zip(state.models, cfgs, parts, strict=True)):
            world.average_(p.grad for p in sae.parameters())
            if c.unit_norm_decoder:
                sae.remove_parallel_decoder_grad_()
            if c.grad_clip > 0:
                nn.utils.clip_grad_norm_(sae.parameters(), c.grad_clip)
            fired = world.any_(part.fire_counts > 0)
            idle = state.idle_steps(i)
            idle.add_(1).masked_fill_(fired, 0)
            if c.batch_level_k:
                _update_batch_threshold(sae, part.min_active, world)
        optimizer.step()
        done = step + 1
        for i, (sae, c) in enumerate(zip(state.models, cfgs, strict=True)):
            if c.unit_norm_decoder:
                sae.normalize_decoder_()
            if resample_due(c, done):
                x = batch[c.hook_name].to(target, sae.W_enc.dtype)  # the whole global batch,
                y = batch[_target_hook(c)].to(target, sae.W_enc.dtype)  # so every rank agrees
                seed = c.seed * 1_000_003 + done
                count = resample_silent_(sae, state.idle_steps(i), x, y, optimizer, seed)
                state.resampled(i).add_(count)
        logged = done % cfgs[0].log_every == 0 or done == total
        if logged:
            record = _record(done, cfgs, labels, parts, window, state, optimizer, world)
            history.append(record)
            stop = _judge_collapse(cfgs, labels, history, source, world)
            logger.log(history)
            if stop is not None:
                logger.close()
                kept = f"; the last checkpoint in {directory} is kept" if directory else ""
                raise CollapseError(f"{stop} (stop_on_collapse=True stopped the run{kept})")
            window = [ReconstructionStats(c.d_out, c.d_sae) for c in cfgs]
            bar.set_postfix(_postfix(record, labels[0]))
        if directory is not None and _checkpoint_due(schedule, done, logged, world, target):
            if world.is_main:
                save_checkpoint(directory, state, optimizer, {**meta, "step": done,
                                                              "history": history})  # fmt: skip
            world.barrier()
            schedule.written()
    logger.close()
    trained = {}
    for label, sae, c in zip(labels, state.models, cfgs, strict=True):
        final = copy.deepcopy(sae).eval()
        final.fold_input_scale_(source.scale(c.hook_name), source.scale(_target_hook(c)))
        trained[label] = final
    return TrainResult(trained, history)


def run_labels(cfgs: Sequence[SAEConfig]) -> list[str]:
    """Each config's label in results and metrics (see ``TrainResult``)."""
    bases = [
        f"{c.hook_name}->{c.target_hook_name}" if c.is_transcoder else c.hook_name for c in cfgs
    ]
    seen: dict[str, int] = {}
    labels = []
    for base in bases:
        if bases.count(base) == 1:
            labels.append(base)
        else:
            labels.append(f"{base}[{seen.get(base, 0)}]")
            seen[base] = seen.get(base, 0) + 1
    return labels


def _target_hook(c: SAEConfig) -> str:
    return c.target_hook_name if c.is_transcoder else c.hook_name


def _judge_collapse(
    cfgs: list[SAEConfig],
    labels: list[str],
    history: list[dict[str, Any]],
    source: ActivationSource,
    world: World,
) -> str | None:
    """Flag collapsed dictionaries in the last record; warn, or return why the run must stop."""
    record, stop = history[-1], None
    for c, label in zip(cfgs, labels, strict=True):
        flagged = any(r.get(f"{label}/{FLAG}") for r in history[:-1])
        why = collapse_verdict(c, label, history, source.scale(c.hook_name))
        record[f"{label}/{FLAG}"] = float(flagged or why is not None)
        if why is None:
            continue
        if c.stop_on_collapse:
            stop = stop or why
        elif world.is_main:
            _log.warning(why)
            warnings.warn(CollapseWarning(f"{why} (stop_on_collapse=True would stop here)"),
                          stacklevel=3)  # fmt: skip
    return stop


def _checkpoint_due(
    schedule: CheckpointSchedule, done: int, logged: bool, world: World, device: torch.device
) -> bool:
    """The schedule's rule, with every process agreeing on the clock's (their clocks differ)."""
    if schedule.by_step(done):
        return True
    if not logged:
        return False
    late = torch.tensor([schedule.by_time()], device=device)  # NCCL reduces on the GPU
    return bool(world.any_(late).any())


def _bind_hooks(cfgs: list[SAEConfig], source: ActivationSource) -> list[SAEConfig]:
    """Give each config its hook and check widths, batch sizes and lengths agree."""
    reads = ", ".join(source.hook_names)
    bound = []
    for c in cfgs:
        if not c.hook_name:
            if len(source.hook_names) != 1:
                raise ConfigError(
                    f"the source has hooks {list(source.hook_names)}; set hook_name on each config"
                )
            c = c.replace(hook_name=source.hook_names[0])
        for hook, width, what in ((c.hook_name, c.d_in, "d_in"),
                                  (_target_hook(c), c.d_out, "d_out")):  # fmt: skip
            if hook not in source.hook_names:
                raise ConfigError(f"hook {hook!r} is not read by the source (it has {reads})")
            if source.d_in[hook] != width:
                raise ShapeMismatchError(
                    f"the dictionary on {c.hook_name!r} has {what}={width}, the activations of "
                    f"{hook!r} have width {source.d_in[hook]}"
                )
        if source.batch_size != c.batch_size:
            raise ConfigError(
                f"config batch_size={c.batch_size} differs from the source's {source.batch_size}"
            )
        bound.append(c)
    shared = {
        (c.batch_size, c.total_tokens, c.log_every, c.checkpoint_every, c.checkpoint_seconds)
        for c in bound
    }
    if len(shared) != 1:
        raise ConfigError(
            "SAEs trained together must share batch_size, total_tokens, log_every, "
            "checkpoint_every and checkpoint_seconds"
        )
    return bound


@torch.no_grad()
def _init_decoder_bias(
    state: _TrainingState, cfgs: list[SAEConfig], batch: dict[str, Tensor], device: torch.device
) -> None:
    """Set ``b_dec`` from the first batch (the whole global batch, so every rank agrees)."""
    for sae, c in zip(state.models, cfgs, strict=True):
        # b_dec lives in the reconstructed space: the target's, for a transcoder
        x = batch[_target_hook(c)].to(device, sae.b_dec.dtype)
        check_finite(x, f"activations of {_target_hook(c)!r}", 0, None)
        if c.b_dec_init == "geometric_median":
            sae.b_dec.copy_(geometric_median(x))
        elif c.b_dec_init == "mean":
            sae.b_dec.copy_(x.mean(0))


@torch.no_grad()
def _update_batch_threshold(sae: SparseAutoencoder, min_active: Tensor, world: World) -> None:
    value = min_active.detach().clone().reshape(1)
    world.average_([value])
    if not math.isfinite(float(value)):
        return
    theta = sae.batch_threshold
    if torch.isnan(theta):
        theta.copy_(value[0])
    else:
        theta.mul_(THRESHOLD_EMA).add_((1 - THRESHOLD_EMA) * value[0])


def _record(
    done: int,
    cfgs: list[SAEConfig],
    labels: list[str],
    parts: list[LossParts],
    window: list[ReconstructionStats],
    state: _TrainingState,
    optimizer: torch.optim.Optimizer,
    world: World,
) -> dict[str, Any]:
    """One metrics row: per-dictionary values under ``{label}/{metric}`` keys."""
    record: dict[str, Any] = {"step": done, "tokens": done * cfgs[0].batch_size}
    for i, (c, prefix, part, stats) in enumerate(zip(cfgs, labels, parts, window, strict=True)):
        stats.combine_(world.average_, world.size)
        scalars = torch.stack([part.loss.detach(), part.mse, part.sparsity, part.aux])
        world.average_([scalars])
        idle = state.idle_steps(i)
        record.update({
            f"{prefix}/loss": float(scalars[0]),
            f"{prefix}/mse": float(scalars[1]),
            f"{prefix}/sparsity_loss": float(scalars[2]),
            f"{prefix}/aux_loss": float(scalars[3]),
            f"{prefix}/l0": stats.l0,
            f"{prefix}/fvu": stats.fvu,
            f"{prefix}/dead_fraction": float(
                (idle * c.batch_size >= c.dead_window).double().mean()
            ),
            f"{prefix}/dense_fraction": stats.dense_fraction(c.dense_threshold),
            f"{prefix}/resampled": int(state.resampled(i)),
            f"{prefix}/lr": optimizer.param_groups[i]["lr"],
        })  # fmt: skip
    return record


def _postfix(record: dict[str, Any], c: str) -> dict[str, str]:
    return {"loss": f"{record[f'{c}/loss']:.4g}", "l0": f"{record[f'{c}/l0']:.1f}",
            "fvu": f"{record[f'{c}/fvu']:.3f}"}  # fmt: skip


class _Logger:
    """Writes the metric history to CSV (atomically, whole) and/or Weights & Biases."""

    def __init__(
        self, csv_path: str | Path | None, project: str | None, cfgs: list[SAEConfig], world: World
    ) -> None:
        self.csv_path = Path(csv_path) if csv_path is not None and world.is_main else None
        self.run: Any = None
        if project is not None and world.is_main:
            try:
                import wandb
            except ImportError as err:
                raise ConfigError("wandb_project needs `pip install wandb`") from err
            self.run = wandb.init(project=project, config={"saes": [c.to_dict() for c in cfgs]})

    def log(self, history: list[dict[str, Any]]) -> None:
        if self.run is not None:
            self.run.log(history[-1], step=history[-1]["step"])
        if self.csv_path is not None:
            write_csv_atomically(self.csv_path, history)

    def close(self) -> None:
        if self.run is not None:
            self.run.finish()
