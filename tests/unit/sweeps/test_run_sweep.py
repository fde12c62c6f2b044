"""``mitk.sweeps.run_sweep`` from Python: interrupted, resumed or sharded, it ends as one run."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch

from mitk import HookedTransformer
from mitk.errors import ConfigError
from mitk.sweeps import (
    ChunkStore,
    IncompleteSweepError,
    SweepSpec,
    merge_sweep,
    read_results,
    run_sweep,
)
from mitk.sweeps.units import Unit

N_PAIRS = 5


def induction_pairs(n: int = N_PAIRS, half: int = 4) -> list[dict]:
    """A repeated random segment; the corrupted first copy differs, so only induction answers."""
    gen = torch.Generator().manual_seed(0)
    pairs = []
    for _ in range(n):
        segment, other = (torch.randint(1, 256, (half,), generator=gen).tolist() for _ in range(2))
        clean, corrupted = [0, *segment, *segment], [0, *other, *segment]
        pairs.append(
            {
                "clean": clean[:-1],
                "corrupted": corrupted[:-1],
                "answer": clean[-1],
                "wrong_answer": other[-1],
            }
        )
    return pairs


SPEC = SweepSpec(pairs=tuple(induction_pairs()), sites=("z:head", "resid_pre"), batch_size=2)
N_UNITS = 6  # two (site, per) cells x three batches of pairs


@pytest.fixture(scope="module")
def model() -> HookedTransformer:
    return HookedTransformer.from_pretrained("toy-induction").eval()


@pytest.fixture(scope="module")
def uninterrupted(
    model: HookedTransformer, tmp_path_factory: pytest.TempPathFactory
) -> pd.DataFrame:
    run = run_sweep(model, SPEC, tmp_path_factory.mktemp("whole"), progress=False)
    assert run.merged and not run.resumed and run.n_units == N_UNITS
    assert run.stats.units_run == N_UNITS and run.sidecar is not None
    assert run.sidecar["rows"] == N_PAIRS * 2 * 4 + N_PAIRS * 2  # heads, then layers
    return run.results()


def test_a_unit_limit_then_a_rerun_equals_one_run(
    model: HookedTransformer, uninterrupted: pd.DataFrame, tmp_path: Path
) -> None:
    first = run_sweep(model, SPEC, tmp_path, max_units=2, progress=False)
    assert first.stats.units_run == 2 and not first.merged
    with pytest.raises(IncompleteSweepError, match="no merged results"):
        first.results()
    second = run_sweep(model, SPEC.to_dict(), tmp_path, progress=False)  # a dict spec works too
    assert second.resumed and second.stats.units_skipped == 2 and second.stats.units_run == 4
    pd.testing.assert_frame_equal(second.results(), uninterrupted)


def test_a_crash_after_one_chunk_resumes_to_the_uninterrupted_result(
    model: HookedTransformer,
    uninterrupted: pd.DataFrame,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    write = ChunkStore.write

    def crash_on_the_second_chunk(store: ChunkStore, unit: Unit, frame: pd.DataFrame) -> Path:
        if list(store.chunk_dir.glob("unit-*.parquet")):
            raise KeyboardInterrupt  # as if the user pressed Ctrl-C mid-sweep
        return write(store, unit, frame)

    monkeypatch.setattr(ChunkStore, "write", crash_on_the_second_chunk)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(model, SPEC, tmp_path, progress=False)
    monkeypatch.undo()
    assert len(list((tmp_path / "chunks").iterdir())) == 1  # one whole chunk, no temp file
    resumed = run_sweep(model, SPEC, tmp_path, progress=False)
    assert resumed.resumed and resumed.stats.units_skipped == 1
    pd.testing.assert_frame_equal(read_results(tmp_path), uninterrupted)


def test_shards_then_merge_equal_one_run(
    model: HookedTransformer, uninterrupted: pd.DataFrame, tmp_path: Path
) -> None:
    first = run_sweep(model, SPEC, tmp_path, shard="0/2", progress=False)
    assert first.stats.units_assigned == 3 and not first.merged  # shard 1's units are missing
    last = run_sweep(model, SPEC, tmp_path, shard="1/2", progress=False)
    assert last.merged  # nothing was missing any more, so this shard merged
    pd.testing.assert_frame_equal(last.results(), uninterrupted)
    assert merge_sweep(tmp_path)["rows"] == len(uninterrupted)  # merging again is harmless


def test_another_sweep_in_the_same_folder_is_refused(
    model: HookedTransformer, tmp_path: Path
) -> None:
    run_sweep(model, SPEC, tmp_path, max_units=1, progress=False)
    other = SweepSpec.from_dict({**SPEC.to_dict(), "metric": "logit"})
    with pytest.raises(ConfigError, match="holds a different sweep"):
        run_sweep(model, other, tmp_path, progress=False)


def test_the_docs_notebook_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    page = (Path(__file__).resolve().parents[3] / "docs" / "cli.md").read_text()
    section = page.split("### The same sweep from a notebook", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    monkeypatch.chdir(tmp_path)  # it writes runs/notebook relative to where it runs
    namespace: dict[str, object] = {}
    exec(compile(code, "docs/cli.md", "exec"), namespace)
    frame = namespace["frame"]
    assert isinstance(frame, pd.DataFrame) and set(frame["site"]) == {"z", "resid_pre"}
    assert (tmp_path / "runs" / "notebook" / "results.parquet").exists()
