"""The merged sweep: results.parquet, its JSON sidecar, and prompt-averaged results."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
import json
from pathlib import Path
import time
from typing import Any

import pandas as pd
import torch

from mitk.analysis.patching import PatchResult
from mitk.atomic import atomic_write_text, remove_leftovers
from mitk.sweeps.chunks import ChunkStore, atomic_write_parquet

DashboardWriter = Callable[[pd.DataFrame, dict[str, Any]], Path]
"""Writes a page of the merged table (given the manifest too); returns the page's path."""


def finish(store: ChunkStore, dashboard: DashboardWriter | None = None) -> dict[str, Any]:
    """Merge every chunk, write results.parquet and results.json atomically; the sidecar.

    ``IncompleteSweepError`` while a unit has no chunk, ``CorruptFileError``
    when the manifest or a chunk differs from its recorded hash. ``dashboard``, if
    given, is called with the merged table and the manifest before the sidecar
    is written, and the sidecar records the path it returns.
    """
    start = time.perf_counter()
    remove_leftovers(store.root, [store.results_path.name, store.sidecar_path.name])
    manifest = store.manifest()
    frame = store.merge(manifest["n_units"])
    atomic_write_parquet(frame, store.results_path)
    sidecar = {
        **manifest,
        "rows": len(frame),
        "results": str(store.results_path),
        "versions": _versions(),
        "timings": {"shards": store.timings(), "merge_seconds": time.perf_counter() - start},
        "written_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    if dashboard is not None:
        sidecar["dashboard"] = str(dashboard(frame, manifest))
    atomic_write_text(store.sidecar_path, json.dumps(sidecar, indent=2, default=str))
    return sidecar


def _versions() -> dict[str, str]:
    found = {}
    for package in ("mitk", "torch", "transformers"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = "unknown"
    return found


def mean_results(frame: pd.DataFrame) -> list[PatchResult]:
    """One ``PatchResult`` per (site, granularity) of a results table, holding every pair.

    ``per_prompt`` is ``[pair, ...]``; a cell missing for some pairs (a position
    past a shorter batch's width) is NaN for them, so ``values`` averages over
    the pairs that have it, and the figures' intervals and tests use those pairs.
    A cell no pair has is NaN.
    """
    results = []
    for (site, per), part in frame.groupby(["site", "per"], sort=False):
        layers = sorted(part["layer"].unique().tolist())
        axes = [a for a in ("layer", "head", "pos") if part[a].notna().any()]
        sizes = [len(layers)] + [int(part[a].max()) + 1 for a in axes[1:]]
        pairs = sorted(part["pair"].unique().tolist())
        grid = torch.full([len(pairs), *sizes], float("nan"), dtype=torch.float64)
        index = [
            torch.tensor(part["pair"].map({p: i for i, p in enumerate(pairs)}).to_numpy()),
            torch.tensor(part["layer"].map({x: i for i, x in enumerate(layers)}).to_numpy()),
            *(torch.tensor(part[a].astype("int64").to_numpy()) for a in axes[1:]),
        ]
        grid[tuple(index)] = torch.tensor(part["value"].to_numpy(dtype=float))
        baselines = part.drop_duplicates("pair").set_index("pair").loc[pairs]
        results.append(
            PatchResult(
                per_prompt=grid,
                clean=torch.tensor(baselines["clean"].to_numpy(dtype=float)),
                corrupted=torch.tensor(baselines["corrupted"].to_numpy(dtype=float)),
                site=str(site),
                per=str(per),
                direction=str(part["direction"].iloc[0]),
                layers=layers,
            )
        )
    return results
