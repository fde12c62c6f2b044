"""The merged sweep: results.parquet, its JSON sidecar and the optional dashboard."""

from __future__ import annotations

from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
import json
from pathlib import Path
import time
from typing import Any

import pandas as pd
import torch

from mitk.analysis.patching import PatchResult
from mitk.atomic import atomic_write_text
from mitk.cli.sweep.chunks import ChunkStore, atomic_write_parquet


def finish(store: ChunkStore, dashboard: Path | None = None) -> dict[str, Any]:
    """Merge every chunk, write results.parquet and results.json atomically; the sidecar."""
    start = time.perf_counter()
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
        sidecar["dashboard"] = str(write_dashboard(dashboard, frame, manifest))
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
    """One prompt-averaged ``PatchResult`` per (site, granularity) of a results table.

    Cells missing for some pairs (positions past a shorter batch's width) average
    over the pairs that have them; a cell no pair has is NaN.
    """
    results = []
    for (site, per), part in frame.groupby(["site", "per"], sort=False):
        layers = sorted(part["layer"].unique().tolist())
        axes = [a for a in ("layer", "head", "pos") if part[a].notna().any()]
        sizes = [len(layers)] + [int(part[a].max()) + 1 for a in axes[1:]]
        grid = torch.full(sizes, float("nan"), dtype=torch.float64)
        means = part.groupby(axes)["value"].mean()
        for key, value in means.items():
            cell = (key,) if len(axes) == 1 else key
            grid[(layers.index(int(cell[0])), *(int(c) for c in cell[1:]))] = float(value)
        baselines = part.drop_duplicates("pair")
        results.append(
            PatchResult(
                per_prompt=grid[None],
                clean=torch.tensor([baselines["clean"].mean()], dtype=torch.float64),
                corrupted=torch.tensor([baselines["corrupted"].mean()], dtype=torch.float64),
                site=str(site),
                per=str(per),
                direction=str(part["direction"].iloc[0]),
                layers=layers,
            )
        )
    return results


def write_dashboard(path: Path, frame: pd.DataFrame, manifest: dict[str, Any]) -> Path:
    """An HTML page with each (site, granularity)'s prompt-averaged patching heatmaps."""
    from mitk.viz.dashboard import dashboard

    spec = manifest["spec"]
    header = {
        "model": spec["model"],
        "prompt pairs": str(manifest["n_pairs"]),
        "metric": f"{spec['metric']} ({spec['direction']})",
        "rows": str(len(frame)),
    }
    return dashboard(
        path, title=f"mitk patch: {spec['model']}", header=header, items=mean_results(frame)
    )
