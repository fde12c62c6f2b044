"""``run_sweep``: a resumable, sharded patching sweep in one call, from a notebook or a script.

``mitk patch`` is a thin layer over this; whatever the CLI can do (resume after
a crash, ``--shard i/N``, torchrun ranks, merging) a Python caller can too.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
import time
from typing import Any

import pandas as pd

from mitk.sweeps.chunks import ChunkStore, IncompleteSweepError
from mitk.sweeps.ranks import join_ranks, leave_ranks, rank_device, wait_for_ranks
from mitk.sweeps.results import DashboardWriter, finish
from mitk.sweeps.runner import RunStats, prepare, run_units
from mitk.sweeps.shard import Shard, current_shard, parse_shard
from mitk.sweeps.spec import SweepSpec


@dataclass(frozen=True)
class SweepRun:
    """What one ``run_sweep`` call did; ``sidecar`` is results.json when this call merged."""

    out: Path
    fingerprint: str
    resumed: bool
    """True when ``out`` already held this sweep (finished units were skipped); under
    torchrun only rank 0 knows, the other ranks say False."""
    stats: RunStats
    n_units: int
    """Work units of the whole sweep, all shards together."""
    sidecar: dict[str, Any] | None

    @property
    def merged(self) -> bool:
        """True when this call wrote ``out/results.parquet``."""
        return self.sidecar is not None

    def results(self) -> pd.DataFrame:
        """The merged table: one row per pair, site, granularity, layer, position and head.

        ``IncompleteSweepError`` until every unit has run and the chunks were
        merged (by ``run_sweep`` or ``merge_sweep``).
        """
        return read_results(self.out)


def run_sweep(
    model: Any,
    spec: SweepSpec | Mapping[str, Any],
    out: str | Path,
    *,
    shard: Shard | str | None = None,
    max_units: int | None = None,
    pairs_dir: str | Path = ".",
    progress: bool = True,
    dashboard: DashboardWriter | None = None,
) -> SweepRun:
    """Run the sweep's units that have no chunk in ``out`` yet, then merge when all have run.

    ``model`` is the ``HookedTransformer`` to patch, used as it is (device and
    dtype included); ``None`` loads ``spec.model`` (an embedded name or a local
    folder) as ``spec.dtype``, ``spec.device`` and ``spec.device_map`` say.
    ``spec`` is a ``SweepSpec`` or a dict of its fields; a relative
    ``pairs_file`` is read from ``pairs_dir``. Every input is checked before
    any patching (``ConfigError``, ``PairsError``).

    Calling again with the same spec, pairs and model resumes: finished units
    are skipped. A different sweep in the same ``out`` is refused
    (``ConfigError``): the fingerprint covers the spec (not device or memory
    settings), the pairs' tokens and the model's config, not its weights, so
    resume only with the same weights.

    ``shard`` (``Shard`` or ``"i/N"``) runs only every N-th unit from i, e.g.
    one Slurm array task; ``None`` takes torchrun's ranks when launched by it,
    else the whole sweep. ``max_units`` stops after that many units, for a
    time-boxed run. The chunks are merged into ``out/results.parquet`` and
    ``out/results.json`` once none is missing (under torchrun: by rank 0
    after all ranks finish); otherwise call ``merge_sweep(out)`` when every
    shard is done. ``dashboard`` is handed the merged table (see ``finish``).
    """
    spec = spec if isinstance(spec, SweepSpec) else SweepSpec.from_dict(dict(spec))
    where = current_shard(None) if shard is None else shard
    where = parse_shard(where) if isinstance(where, str) else where
    if where.launched and model is None:
        spec = rank_device(spec)
    started = time.perf_counter()
    sweep = prepare(spec, Path(pairs_dir), model)  # every input check; nothing has run yet
    store = ChunkStore(Path(out))
    if where.launched:
        # rank 0 writes the manifest alone; the others, after the barrier, check it is this
        # sweep's. Claiming side by side raced: one rank cleared the other's half-written
        # manifest, or read its ledger before the rename (CI saw "manifest.json: missing")
        join_ranks()
        resumed = store.claim(sweep.fingerprint, sweep.manifest()) if where.is_main else False
        wait_for_ranks()
        if not where.is_main:
            store.claim(sweep.fingerprint, sweep.manifest())
    else:
        resumed = store.claim(sweep.fingerprint, sweep.manifest())
    stats = run_units(sweep, store, where, not (progress and where.is_main), max_units)
    timing = {"load_seconds": sweep.load_seconds, "total_seconds": time.perf_counter() - started}
    store.write_timing(where.label(), {**asdict(stats), **timing})
    if where.launched:
        wait_for_ranks()
    # under torchrun rank 0 merges after the barrier; otherwise whoever finds nothing missing
    merges = where.is_main if where.launched else not store.missing(len(sweep.units))
    sidecar = finish(store, dashboard) if merges else None
    if where.launched:
        leave_ranks()
    return SweepRun(store.root, sweep.fingerprint, resumed, stats, len(sweep.units), sidecar)


def merge_sweep(out: str | Path, dashboard: DashboardWriter | None = None) -> dict[str, Any]:
    """Merge the chunks every shard wrote to ``out``; the results.json sidecar.

    ``IncompleteSweepError`` naming the units that have no chunk yet.
    """
    return finish(ChunkStore(Path(out)), dashboard)


def read_results(out: str | Path) -> pd.DataFrame:
    """``out/results.parquet`` of a merged sweep; ``IncompleteSweepError`` before the merge."""
    path = ChunkStore(Path(out)).results_path
    if not path.exists():
        raise IncompleteSweepError(
            f"{out} has no merged results yet; run the remaining units, then merge_sweep({out!r})"
        )
    return pd.read_parquet(path)
