"""The sweep loop: check everything, then patch unit by unit, writing one chunk per unit.

``prepare`` does every check that can fail on bad input (spec, model, pairs)
before any patching starts; ``run_units`` then runs this shard's units that
have no chunk yet, in order, so a killed run resumes where it stopped.
"""

from __future__ import annotations

from dataclasses import dataclass
import hashlib
from pathlib import Path
import sys
import time
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from mitk.analysis.patching import PatchResult, activation_patch
from mitk.errors import ConfigError
from mitk.sweeps.batch import batch_pairs
from mitk.sweeps.chunks import ChunkStore
from mitk.sweeps.metrics import metric_for
from mitk.sweeps.pairs import PromptPair, Vocabulary, pairs_digest, read_pairs
from mitk.sweeps.placement import load_sweep_model
from mitk.sweeps.shard import Shard
from mitk.sweeps.spec import SweepSpec
from mitk.sweeps.units import Unit, plan_units


@dataclass(frozen=True)
class Sweep:
    """A checked sweep, ready to run: spec, model, pairs, units and fingerprint."""

    spec: SweepSpec
    model: Any
    pairs: list[PromptPair]
    vocab: Vocabulary
    units: list[Unit]
    fingerprint: str
    load_seconds: float

    def manifest(self) -> dict[str, Any]:
        """What ``manifest.json`` records (and the results' sidecar repeats)."""
        return {
            "spec": self.spec.to_dict(),
            "model": {"name": self.spec.model, "config": self.model.cfg.to_dict(placement=False)},
            "n_pairs": len(self.pairs),
            "n_units": len(self.units),
            "grid": [list(cell) for cell in self.spec.grid()],
        }


@dataclass(frozen=True)
class RunStats:
    """What one process did: its units, how many it ran and skipped, and how long it took."""

    shard: str
    units_assigned: int
    units_run: int
    units_skipped: int
    rows_written: int
    seconds: float


def prepare(spec: SweepSpec, pairs_dir: Path = Path(), model: Any = None) -> Sweep:
    """Load the model (unless given) and read the pairs, raising on bad input before any work.

    A relative ``spec.pairs_file`` is read from ``pairs_dir``. ``model`` is
    patched as it is; without one, ``spec.model`` is loaded as the spec says.
    """
    start = time.perf_counter()
    if model is None:
        model = load_sweep_model(spec)
    cfg = model.cfg
    vocab = Vocabulary(cfg.d_vocab, cfg.n_ctx, model.tokenizer, cfg.default_prepend_bos)
    source: Path | list[dict[str, Any]] = (
        pairs_dir / spec.pairs_file if spec.pairs_file is not None else list(spec.pairs)
    )
    pairs = read_pairs(source, vocab, spec.metric, spec.align)
    if spec.layers is not None and any(not 0 <= x < cfg.n_layers for x in spec.layers):
        raise ConfigError(f"layers {list(spec.layers)} must lie in [0, {cfg.n_layers})")
    model_digest = hashlib.sha256(cfg.to_json().encode()).hexdigest()[:16]
    fingerprint = spec.fingerprint(pairs_digest(pairs), model_digest)
    units = plan_units(len(pairs), spec.batch_size, spec.grid())
    return Sweep(spec, model, pairs, vocab, units, fingerprint, time.perf_counter() - start)


def run_units(
    sweep: Sweep, store: ChunkStore, shard: Shard, quiet: bool, max_units: int | None = None
) -> RunStats:
    """Run this shard's units that have no intact chunk yet, writing each chunk as it finishes.

    With ``max_units``, stop after that many (the rest run on the next call).
    """
    start = time.perf_counter()
    mine = shard.take(sweep.units)
    store.remove_leftovers(mine)
    pending = [unit for unit in mine if not store.done(unit)]  # damaged chunks are redone
    todo = pending if max_units is None else pending[:max_units]
    rows = 0
    # delay: a bar only for runs longer than a couple of seconds
    bar = tqdm(
        total=len(mine),
        initial=len(mine) - len(pending),
        unit="unit",
        desc="patching",
        disable=quiet,
        delay=2.0,
        file=sys.stderr,
        dynamic_ncols=True,
    )
    with bar:
        for unit in todo:
            frame = run_unit(sweep, unit)
            store.write(unit, frame)
            rows += len(frame)
            bar.update(1)
    return RunStats(
        shard.label(),
        len(mine),
        len(todo),
        len(mine) - len(pending),
        rows,
        time.perf_counter() - start,
    )


def run_unit(sweep: Sweep, unit: Unit) -> pd.DataFrame:
    """Patch one unit's pairs at its site and granularity; its long-format rows."""
    spec = sweep.spec
    batch = batch_pairs(sweep.pairs[unit.start : unit.stop], spec.align, sweep.vocab.pad_id)
    device = _input_device(sweep.model)
    result = activation_patch(
        sweep.model,
        batch.clean.to(device),
        batch.corrupted.to(device),
        metric_for(spec.metric, batch),
        unit.site,
        unit.per,  # type: ignore[arg-type]
        direction=spec.direction,  # type: ignore[arg-type]
        attention_mask=None if batch.mask is None else batch.mask.to(device),
        layers=None if spec.layers is None else list(spec.layers),
        memory_budget_gb=spec.memory_budget_mb / 1024,
    )
    return result_rows(result, unit, spec)


def result_rows(result: PatchResult, unit: Unit, spec: SweepSpec) -> pd.DataFrame:
    """One row per (pair, layer, pos, head) cell: the patched metric and both baselines."""
    per_prompt = result.per_prompt.detach().double().cpu()
    axes = ("pair", *result.axes)
    grids = torch.meshgrid(*[torch.arange(n) for n in per_prompt.shape], indexing="ij")
    index = {axis: grid.reshape(-1).numpy() for axis, grid in zip(axes, grids, strict=True)}
    n_rows = per_prompt.numel()
    local = index["pair"]
    value = per_prompt.reshape(-1).numpy()
    clean = result.clean.detach().double().cpu().numpy()[local]
    corrupted = result.corrupted.detach().double().cpu().numpy()[local]
    gap = clean - corrupted
    with np.errstate(divide="ignore", invalid="ignore"):  # equal baselines: no recovery defined
        normalized = np.where(gap != 0, (value - corrupted) / gap, np.nan)

    def optional(axis: str) -> pd.arrays.IntegerArray:
        column = index[axis] if axis in index else [pd.NA] * n_rows
        return pd.array(column, dtype="Int64")

    return pd.DataFrame(
        {
            "unit": np.full(n_rows, unit.index, dtype=np.int64),
            "batch": np.full(n_rows, unit.batch, dtype=np.int64),
            "pair": local.astype(np.int64) + unit.start,
            "site": unit.site,
            "per": unit.per,
            "layer": np.asarray(result.layers, dtype=np.int64)[index["layer"]],
            "pos": optional("pos"),
            "head": optional("head"),
            "value": value,
            "normalized": normalized,
            "clean": clean,
            "corrupted": corrupted,
            "metric": spec.metric,
            "direction": spec.direction,
        }
    )


def _input_device(model: Any) -> torch.device:
    """Where token ids go: the embedding's device (the first block's, under a device map)."""
    return next(model.parameters()).device
