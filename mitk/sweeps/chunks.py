"""A sweep's output folder: a manifest, one parquet chunk per finished unit, the merge.

Layout of ``OUT``::

    manifest.json          spec, fingerprint, unit count (written once, then checked)
    chunks/unit-000000.parquet ...
    timings/shard-0-of-1.json  what each shard ran and how long it took
    hashes/manifest.json.json, hashes/unit-000000.parquet.json ...
                           size and sha256 of each file above (``mitk.integrity`` ledgers)
    results.parquet        the merged table (``merge``), results.json beside it

A chunk is written to a temporary file, its hash recorded, then renamed, so it
either exists complete or not at all; resuming skips every unit whose chunk
matches its recorded hash, and recomputes (with an ``IntegrityWarning``) one
that is damaged or missing. A damaged manifest stops the run (``CorruptFileError``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
import json
from pathlib import Path
from typing import Any
import warnings

import pandas as pd

from mitk.atomic import atomic_write, remove_leftovers
from mitk.errors import ConfigError, MitkError
from mitk.integrity import CorruptFileError, IntegrityWarning, verify, write_ledger
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
        self.hash_dir = root / "hashes"

    def claim(self, fingerprint: str, manifest: dict[str, Any]) -> bool:
        """Create the manifest, or check that an existing one is this sweep's; True if resuming.

        ``ConfigError`` when ``root`` holds a sweep with another fingerprint:
        mixing its chunks with this spec's would corrupt both. ``CorruptFileError``
        when the manifest is damaged, or missing while chunks are there.
        """
        self._remove_leftovers([self.manifest_path])
        if self.manifest_path.exists() or self.ledger(self.manifest_path).exists():
            found = self.manifest()
            if found.get("fingerprint") != fingerprint:
                raise ConfigError(
                    f"{self.root} holds a different sweep (fingerprint {found.get('fingerprint')}"
                    f", this spec's is {fingerprint}); resume only with the same spec, pairs "
                    "and model, or choose another --out"
                )
            return True
        if self.chunk_dir.is_dir() and any(self.chunk_dir.glob("unit-*.parquet")):
            raise CorruptFileError(
                f"{self.manifest_path}: missing, but {self.chunk_dir} holds chunks of a sweep; "
                "which sweep they belong to is unknown: choose another --out (or delete "
                f"{self.root} to start over)"
            )
        text = json.dumps({**manifest, "fingerprint": fingerprint}, indent=2)
        self._write_recorded(self.manifest_path, lambda temp: temp.write_bytes(text.encode()))
        return False

    def manifest(self) -> dict[str, Any]:
        """The manifest's contents, verified against its recorded hash.

        ``FileNotFoundError`` when ``root`` holds no sweep; ``CorruptFileError``
        naming the file when it is damaged (the sweep cannot be resumed then).
        """
        if not self.manifest_path.exists() and not self.ledger(self.manifest_path).exists():
            raise FileNotFoundError(f"{self.root} holds no sweep (no manifest.json)")
        try:
            verify(self.ledger(self.manifest_path), {self.manifest_path.name: self.manifest_path})
        except CorruptFileError as err:
            raise CorruptFileError(
                f"the sweep's manifest is damaged, so {self.root} cannot be resumed or merged: "
                f"{err}; choose another --out (or delete {self.root} to start over)"
            ) from None
        return dict(json.loads(self.manifest_path.read_text()))

    def ledger(self, path: Path) -> Path:
        """Where the size and hash of the file at ``path`` (in ``root`` or its chunks) are kept."""
        return self.hash_dir / f"{path.name}.json"

    def chunk_path(self, unit_index: int) -> Path:
        """Where the chunk of unit ``unit_index`` lives."""
        return self.chunk_dir / f"unit-{unit_index:06d}.parquet"

    def damage(self, unit_index: int) -> str | None:
        """What is wrong with a written chunk, in words; None when intact or never written."""
        path = self.chunk_path(unit_index)
        if not path.exists() and not self.ledger(path).exists():
            return None
        try:
            verify(self.ledger(path), {path.name: path})
        except CorruptFileError as err:
            return str(err)
        return None

    def done(self, unit: Unit) -> bool:
        """True when ``unit``'s chunk is on disk and matches its recorded hash.

        A damaged or missing chunk warns (``IntegrityWarning``) and counts as not
        done, so it is recomputed.
        """
        found = self.damage(unit.index)
        if found is not None:
            warnings.warn(f"{found}; unit {unit.index} will be recomputed", IntegrityWarning,
                          stacklevel=2)  # fmt: skip
            return False
        return self.chunk_path(unit.index).exists()

    def write(self, unit: Unit, frame: pd.DataFrame) -> Path:
        """Write ``unit``'s rows atomically, its hash recorded before the chunk appears."""
        path = self.chunk_path(unit.index)
        return self._write_recorded(path, lambda temp: frame.to_parquet(temp, index=False))

    def remove_leftovers(self, units: Iterable[Unit]) -> None:
        """Delete temp files a killed run left while writing these units' chunks (only those:
        other shards may be writing theirs)."""
        self._remove_leftovers([self.chunk_path(unit.index) for unit in units])

    def write_timing(self, label: str, record: dict[str, Any]) -> None:
        """Append one run's timing record to this shard's timing file."""
        path = self.timing_dir / f"shard-{label}.json"
        self._remove_leftovers([path])
        exists = path.exists() or self.ledger(path).exists()
        text = json.dumps([*(self._timing_runs(path) if exists else []), record], indent=2)
        self._write_recorded(path, lambda temp: temp.write_bytes(text.encode()))

    def timings(self) -> dict[str, Any]:
        """Every shard's timing records, by shard label."""
        if not self.timing_dir.is_dir():
            return {}
        return {
            p.stem.removeprefix("shard-"): self._timing_runs(p)
            for p in sorted(self.timing_dir.glob("shard-*.json"))
        }

    def _timing_runs(self, path: Path) -> list[Any]:
        """A shard's timing records; a damaged file warns and counts as none (they only inform)."""
        try:
            verify(self.ledger(path), {path.name: path})
        except CorruptFileError as err:
            warnings.warn(f"{err}; its timing records are dropped", IntegrityWarning,
                          stacklevel=3)  # fmt: skip
            return []
        return list(json.loads(path.read_text()))

    def missing(self, n_units: int) -> list[int]:
        """Indices of units without a chunk."""
        return [i for i in range(n_units) if not self.chunk_path(i).exists()]

    def merge(self, n_units: int) -> pd.DataFrame:
        """All chunks in unit order, checked to hold each row exactly once.

        ``IncompleteSweepError`` if a unit has no chunk yet; ``CorruptFileError``
        naming the chunks that differ from their recorded hash; ``RuntimeError``
        if a chunk holds another unit's rows or a row appears twice.
        """
        missing = self.missing(n_units)
        if missing:
            names = ", ".join(f"unit-{i:06d}" for i in missing[:3])
            raise IncompleteSweepError(
                f"{self.root}: {len(missing)} of {n_units} units have no chunk yet ({names}"
                f"{', ...' if len(missing) > 3 else ''}); run the remaining shards first"
            )
        damaged = [found for i in range(n_units) if (found := self.damage(i)) is not None]
        if damaged:
            raise CorruptFileError(
                f"{len(damaged)} chunks are damaged: {'; '.join(damaged[:3])}"
                f"{'; ...' if len(damaged) > 3 else ''}. Run the sweep again with the same spec "
                "and --out to recompute them"
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

    def _write_recorded(self, path: Path, writer: Callable[[Path], object]) -> Path:
        """Write ``path`` atomically; its ledger is written first, from the temp file."""

        def write_then_record(temp: Path) -> None:
            writer(temp)
            write_ledger(self.ledger(path), {path.name: temp})

        return atomic_write(path, write_then_record)

    def _remove_leftovers(self, paths: list[Path]) -> None:
        for folder in {p.parent for p in paths}:
            remove_leftovers(folder, [p.name for p in paths if p.parent == folder])
        remove_leftovers(self.hash_dir, [self.ledger(p).name for p in paths])
