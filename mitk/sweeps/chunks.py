"""A sweep's output folder: a manifest, one parquet chunk per finished unit, the merge.

Layout of ``OUT``::

    manifest.json          spec, fingerprint, unit count (written once, then checked)
    chunks/unit-000000.parquet ...
    timings/shard-0-of-1.json  what each shard ran and how long it took
    results.parquet        the merged table (``merge``), results.json beside it

A chunk is written to a temporary file and renamed, so it either exists
complete or not at all; resuming skips every unit whose chunk exists.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd

from mitk.atomic import atomic_write, atomic_write_text
from mitk.errors import ConfigError, MitkError
from mitk.sweeps.units import Unit

# One row per (pair, site, granularity, cell): what "each row exactly once" means.
ROW_KEY = ["pair", "site", "per", "layer", "pos", "head"]


class IncompleteSweepError(MitkError, ValueError):
    """A merge was asked for while some units have no chunk yet."""


def atomic_write_parquet(frame: pd.DataFrame, path: Path) -> Path:
    """Write ``frame`` (no index) atomically (``mitk.atomic``): never half a file."""
    return atomic_write(path, lambda temp: frame.to_parquet(temp, index=False))


class ChunkStore:
    """The files of one sweep under ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.chunk_dir = root / "chunks"
        self.manifest_path = root / "manifest.json"
        self.results_path = root / "results.parquet"
        self.sidecar_path = root / "results.json"
        self.timing_dir = root / "timings"

    def claim(self, fingerprint: str, manifest: dict[str, Any]) -> bool:
        """Create the manifest, or check that an existing one is this sweep's; True if resuming.

        ``ConfigError`` when ``root`` holds a sweep with another fingerprint:
        mixing its chunks with this spec's would corrupt both.
        """
        if self.manifest_path.exists():
            found = self.manifest()
            if found.get("fingerprint") != fingerprint:
                raise ConfigError(
                    f"{self.root} holds a different sweep (fingerprint {found.get('fingerprint')}"
                    f", this spec's is {fingerprint}); resume only with the same spec, pairs "
                    "and model, or choose another --out"
                )
            return True
        atomic_write_text(
            self.manifest_path, json.dumps({**manifest, "fingerprint": fingerprint}, indent=2)
        )
        return False

    def manifest(self) -> dict[str, Any]:
        """The manifest's contents; ``FileNotFoundError`` when ``root`` holds no sweep."""
        if not self.manifest_path.exists():
            raise FileNotFoundError(f"{self.root} holds no sweep (no manifest.json)")
        return dict(json.loads(self.manifest_path.read_text()))

    def chunk_path(self, unit_index: int) -> Path:
        """Where the chunk of unit ``unit_index`` lives."""
        return self.chunk_dir / f"unit-{unit_index:06d}.parquet"

    def done(self, unit: Unit) -> bool:
        """True when ``unit``'s chunk is complete on disk."""
        return self.chunk_path(unit.index).exists()

    def write(self, unit: Unit, frame: pd.DataFrame) -> Path:
        """Write ``unit``'s rows atomically (temp file, then rename)."""
        return atomic_write_parquet(frame, self.chunk_path(unit.index))

    def write_timing(self, label: str, record: dict[str, Any]) -> None:
        """Append one run's timing record to this shard's timing file."""
        path = self.timing_dir / f"shard-{label}.json"
        runs = json.loads(path.read_text()) if path.exists() else []
        atomic_write_text(path, json.dumps([*runs, record], indent=2))

    def timings(self) -> dict[str, Any]:
        """Every shard's timing records, by shard label."""
        if not self.timing_dir.is_dir():
            return {}
        return {
            p.stem.removeprefix("shard-"): json.loads(p.read_text())
            for p in sorted(self.timing_dir.glob("shard-*.json"))
        }

    def missing(self, n_units: int) -> list[int]:
        """Indices of units without a chunk."""
        return [i for i in range(n_units) if not self.chunk_path(i).exists()]

    def merge(self, n_units: int) -> pd.DataFrame:
        """All chunks in unit order, checked to hold each row exactly once.

        ``IncompleteSweepError`` if a unit has no chunk yet; ``RuntimeError``
        if a chunk holds another unit's rows or a row appears twice.
        """
        missing = self.missing(n_units)
        if missing:
            names = ", ".join(f"unit-{i:06d}" for i in missing[:3])
            raise IncompleteSweepError(
                f"{self.root}: {len(missing)} of {n_units} units have no chunk yet ({names}"
                f"{', ...' if len(missing) > 3 else ''}); run the remaining shards first"
            )
        frames = []
        for index in range(n_units):
            frame = pd.read_parquet(self.chunk_path(index))
            if not (frame["unit"] == index).all():
                raise RuntimeError(f"{self.chunk_path(index)} holds rows of another unit")
            frames.append(frame)
        merged = pd.concat(frames, ignore_index=True)
        repeated = merged.duplicated(ROW_KEY)
        if repeated.any():
            raise RuntimeError(
                f"{int(repeated.sum())} rows appear more than once, e.g. "
                f"{merged[repeated].iloc[0][ROW_KEY].to_dict()}"
            )
        return merged
