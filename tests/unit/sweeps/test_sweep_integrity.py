"""Sweep files are verified, not trusted: damaged chunks are redone, a damaged manifest stops.

Each file kind (a chunk, its ledger, the manifest, its ledger) is damaged in
each way of ``tests.corruption``. A damaged chunk is recomputed with a warning
naming it, and the sweep ends as an uninterrupted one; a damaged manifest
stops with ``CorruptFileError`` (exit 2 from the CLI) naming it, writing nothing.
"""

from __future__ import annotations

from pathlib import Path
import re
import shutil
import sys

import pandas as pd
import pytest

from mitk import HookedTransformer
from mitk.cli.app import main
from mitk.integrity import CorruptFileError, IntegrityWarning
from mitk.sweeps import ChunkStore, merge_sweep, read_results, run_sweep
from tests.corruption import CORRUPTIONS, LEDGER_SYMPTOMS, SYMPTOMS
from tests.unit.sweeps.test_run_sweep import N_UNITS, SPEC


@pytest.fixture(scope="module")
def model() -> HookedTransformer:
    return HookedTransformer.from_pretrained("toy-induction").eval()


@pytest.fixture(scope="module")
def uninterrupted(
    model: HookedTransformer, tmp_path_factory: pytest.TempPathFactory
) -> pd.DataFrame:
    return run_sweep(model, SPEC, tmp_path_factory.mktemp("whole"), progress=False).results()


@pytest.fixture(scope="module")
def half_done(model: HookedTransformer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A sweep stopped after units 0, 1 and 2."""
    out = tmp_path_factory.mktemp("half")
    run_sweep(model, SPEC, out, max_units=3, progress=False)
    return out


@pytest.fixture
def out(half_done: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(half_done, tmp_path / "out"))


def snapshot(directory: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(directory)): p.read_bytes() for p in directory.rglob("*") if p.is_file()
    }


@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
@pytest.mark.parametrize("ledger", [False, True], ids=["chunk", "chunk-ledger"])
def test_a_damaged_chunk_is_recomputed_with_a_warning_naming_it(
    ledger: bool,
    corruption: str,
    out: Path,
    model: HookedTransformer,
    uninterrupted: pd.DataFrame,
) -> None:
    store = ChunkStore(out)
    chunk = store.chunk_path(1)
    damaged = store.ledger(chunk) if ledger else chunk
    CORRUPTIONS[corruption](damaged)
    symptom = (LEDGER_SYMPTOMS if ledger else SYMPTOMS)[corruption]
    with pytest.warns(IntegrityWarning) as caught:
        run = run_sweep(model, SPEC, out, progress=False)
    message = str(caught[0].message)
    assert f"{damaged}: {symptom}" in message and "unit 1 will be recomputed" in message
    assert run.stats.units_skipped == 2 and run.stats.units_run == N_UNITS - 2
    pd.testing.assert_frame_equal(run.results(), uninterrupted)


@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
@pytest.mark.parametrize("ledger", [False, True], ids=["manifest", "manifest-ledger"])
def test_a_damaged_manifest_stops_the_sweep_naming_it(
    ledger: bool, corruption: str, out: Path, model: HookedTransformer
) -> None:
    store = ChunkStore(out)
    damaged = store.ledger(store.manifest_path) if ledger else store.manifest_path
    CORRUPTIONS[corruption](damaged)
    before = snapshot(out)
    symptom = (LEDGER_SYMPTOMS if ledger else SYMPTOMS)[corruption]
    with pytest.raises(CorruptFileError, match=rf"{damaged.name}: {symptom}") as raised:
        run_sweep(model, SPEC, out, progress=False)
    assert str(damaged) in str(raised.value) and "choose another --out" in str(raised.value)
    assert snapshot(out) == before


def test_chunks_without_any_manifest_are_not_adopted(out: Path, model: HookedTransformer) -> None:
    store = ChunkStore(out)
    store.manifest_path.unlink()
    store.ledger(store.manifest_path).unlink()
    with pytest.raises(CorruptFileError, match=r"manifest.json: missing, but .* holds chunks"):
        run_sweep(model, SPEC, out, progress=False)
    assert not store.manifest_path.exists()


def test_a_damaged_timing_file_is_dropped_with_a_warning(
    out: Path, model: HookedTransformer, uninterrupted: pd.DataFrame
) -> None:
    timing = ChunkStore(out).timing_dir / "shard-0-of-1.json"
    timing.write_bytes(b"\x00 garbage")
    with pytest.warns(IntegrityWarning, match=rf"{timing.name}: .*timing records are dropped"):
        run = run_sweep(model, SPEC, out, progress=False)
    assert run.sidecar is not None and len(run.sidecar["timings"]["shards"]["0-of-1"]) == 1
    pd.testing.assert_frame_equal(run.results(), uninterrupted)


def test_the_cli_merge_of_a_damaged_manifest_exits_2(
    out: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    CORRUPTIONS["flip"](ChunkStore(out).manifest_path)
    monkeypatch.setattr(sys, "argv", ["mitk", "patch", "--merge", str(out)])
    with pytest.raises(SystemExit) as done:
        main()
    err = capsys.readouterr().err
    assert done.value.code == 2, err
    assert err.startswith("error: the sweep's manifest is damaged") and "manifest.json" in err
    assert "Traceback" not in err


def test_a_chunk_damaged_after_the_run_stops_a_merge_until_it_is_redone(
    out: Path, model: HookedTransformer, uninterrupted: pd.DataFrame
) -> None:
    run_sweep(model, SPEC, out, progress=False)
    chunk = ChunkStore(out).chunk_path(4)
    CORRUPTIONS["flip"](chunk)
    with pytest.raises(
        CorruptFileError, match=rf"1 chunks are damaged: {re.escape(str(chunk))}: bytes"
    ):
        merge_sweep(out)
    with pytest.warns(IntegrityWarning, match="unit 4 will be recomputed"):
        again = run_sweep(model, SPEC, out, progress=False)
    assert again.stats.units_run == 1
    pd.testing.assert_frame_equal(read_results(out), uninterrupted)


def test_leftovers_of_a_killed_run_are_removed_and_nothing_else(
    out: Path, model: HookedTransformer
) -> None:
    store = ChunkStore(out)
    chunk = store.chunk_path(3)
    leftovers = [
        chunk.parent / f".{chunk.name}.abcd1234.tmp",
        store.ledger(chunk).parent / f".{store.ledger(chunk).name}.abcd1234.tmp",
        out / ".manifest.json.abcd1234.tmp",
    ]
    theirs = store.chunk_dir / f".{store.chunk_path(4).name}.abcd1234.tmp"
    kept = [out / "notes.txt", store.chunk_dir / f".{chunk.name}x.abcd1234.tmp", theirs]
    for path in [*leftovers, *kept]:
        path.write_bytes(b"half")
    run_sweep(model, SPEC, out, shard="1/2", progress=False)  # units 1, 3, 5
    assert not any(path.exists() for path in leftovers)
    assert all(path.exists() for path in kept)  # unit 4 is shard 0's: maybe a write in progress
    results_temp = out / ".results.parquet.0000abcd.tmp"
    results_temp.write_bytes(b"half")
    assert run_sweep(model, SPEC, out, shard="0/2", progress=False).merged
    assert not theirs.exists() and not results_temp.exists()
    assert (out / "notes.txt").exists()
