"""``mitk patch`` as a user runs it: exit codes, resume after SIGKILL, torchrun and shards."""

from __future__ import annotations

import json
import os
from pathlib import Path
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest
import torch

# One thread per process: on a shared machine that keeps runs steady, and every run (one
# process or several) then computes with the same kernels, so results compare exactly.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
SPEC = {
    "model": "toy-induction",
    "pairs_file": "pairs.jsonl",
    "sites": ["z:head", "resid_pre:pos"],
    "metric": "logit_diff",
    "batch_size": 3,
}


def mitk(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mitk", "patch", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=ENV,
        cwd=cwd,
    )


def induction_pairs(n: int, half: int = 6) -> list[dict]:
    """Repeated random segments; the corrupted first copy differs, so only induction answers."""
    gen = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(n):
        segment, other = (torch.randint(1, 256, (half,), generator=gen).tolist() for _ in range(2))
        clean, corrupted = [0, *segment, *segment], [0, *other, *segment]
        rows.append(
            {
                "clean": clean[:-1],
                "corrupted": corrupted[:-1],
                "answer": clean[-1],
                "wrong_answer": other[-1],
            }
        )
    return rows


def write_sweep(directory: Path, n_pairs: int, **changes: object) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "pairs.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in induction_pairs(n_pairs))
    )
    spec = directory / "spec.json"
    spec.write_text(json.dumps({**SPEC, **changes}))
    return spec


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, pd.DataFrame]:
    """An uninterrupted one-process run of the 12-pair sweep (spec, results)."""
    root = tmp_path_factory.mktemp("reference")
    spec = write_sweep(root, 12)
    done = mitk("--spec", str(spec), "--out", str(root / "out"), "--json", "--quiet")
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert (
        summary["units"] == summary["units_run"] == 8
        and summary["rows"] == 12 * 2 * 4 + 12 * 2 * 12
    )
    return spec, pd.read_parquet(root / "out" / "results.parquet")


def test_results_and_sidecar(reference: tuple[Path, pd.DataFrame]) -> None:
    spec, frame = reference
    sidecar = json.loads((spec.parent / "out" / "results.json").read_text())
    assert sidecar["spec"]["sites"] == ["z:head", "resid_pre:pos"] and sidecar["rows"] == len(frame)
    assert {"mitk", "torch", "transformers"} <= set(sidecar["versions"])
    assert sidecar["model"]["config"]["n_layers"] == 2 and sidecar["timings"]["shards"]["0-of-1"]
    assert not frame.duplicated(["pair", "site", "per", "layer", "pos", "head"]).any()
    heads = frame[frame["site"] == "z"].groupby(["layer", "head"])["normalized"].mean()
    assert heads.loc[1].max() > heads.loc[0].max()  # induction heads sit in layer 1


def test_killed_sweep_resumes_to_the_uninterrupted_result(
    reference: tuple[Path, pd.DataFrame], tmp_path: Path
) -> None:
    spec, expected = reference
    out = tmp_path / "out"
    run = [sys.executable, "-m", "mitk", "patch", "--spec", str(spec), "--out", str(out), "-q"]
    process = subprocess.Popen(run, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not list(out.glob("chunks/unit-*.parquet")) and time.monotonic() < deadline:
        assert process.poll() is None, process.stderr.read() if process.stderr else ""
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.communicate()  # reaps it and closes the pipe
    finished = len(list(out.glob("chunks/unit-*.parquet")))
    assert 1 <= finished < 8 and not (out / "results.parquet").exists()
    done = mitk("--spec", str(spec), "--out", str(out), "--json", "-q")
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["resumed"] and summary["units_skipped"] == finished
    assert summary["units_run"] == 8 - finished
    pd.testing.assert_frame_equal(pd.read_parquet(out / "results.parquet"), expected)


def test_two_torchrun_ranks_merge_to_the_single_process_result(
    reference: tuple[Path, pd.DataFrame], tmp_path: Path
) -> None:
    spec, expected = reference
    out = tmp_path / "out"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "2",
            "-m",
            "mitk",
            "patch",
            "--spec",
            str(spec),
            "--out",
            str(out),
            "--json",
            "-q",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=ENV,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])  # rank 0 reports alone
    assert summary["shard"] == "0-of-2" and summary["units_assigned"] == 4
    assert set(json.loads((out / "results.json").read_text())["timings"]["shards"]) == {
        "0-of-2",
        "1-of-2",
    }
    pd.testing.assert_frame_equal(pd.read_parquet(out / "results.parquet"), expected)


def test_manual_shards_then_merge_and_another_spec_refused(
    reference: tuple[Path, pd.DataFrame], tmp_path: Path
) -> None:
    spec, expected = reference
    out = tmp_path / "out"
    first = mitk("--spec", str(spec), "--out", str(out), "--shard", "1/2", "--json", "-q")
    assert first.returncode == 0, first.stderr
    assert "--merge" in json.loads(first.stdout)["note"]
    early = mitk("--merge", str(out))
    assert early.returncode == 2 and "4 of 8 units have no chunk yet" in early.stderr
    second = mitk("--spec", str(spec), "--out", str(out), "--shard", "0/2", "-q")
    assert second.returncode == 0, second.stderr  # the last shard to finish merges
    merged = mitk("--merge", str(out), "--dashboard", str(tmp_path / "d.html"), "--json")
    assert merged.returncode == 0, merged.stderr
    assert json.loads(merged.stdout)["rows"] == len(expected)
    pd.testing.assert_frame_equal(pd.read_parquet(out / "results.parquet"), expected)
    assert "Plotly.newPlot" in (tmp_path / "d.html").read_text()
    other = mitk("--spec", str(spec), "--out", str(out), "--metric", "prob")
    assert other.returncode == 2 and "holds a different sweep" in other.stderr


def test_text_pairs_from_csv_with_a_tokenizer(gpt2_dir: Path, tmp_path: Path) -> None:
    pairs = tmp_path / "pairs.csv"
    pairs.write_text(
        "clean,corrupted,answer\nthe cat sat on the,the dog sat on the,mat\n"
        "when it was,when it ran,late\n"
    )
    done = mitk(
        "--model",
        str(gpt2_dir),
        "--pairs",
        str(pairs),
        "--metric",
        "prob",
        "--site",
        "resid_pre,attn_out",
        "--per",
        "layer",
        "--align",
        "right-pad",
        "--out",
        str(tmp_path / "out"),
        "--json",
    )
    assert done.returncode == 0, done.stderr
    frame = pd.read_parquet(tmp_path / "out" / "results.parquet")
    assert len(frame) == 2 * 2 * 3 and frame["head"].isna().all()
    assert frame["value"].between(0, 1).all()


@pytest.mark.parametrize(
    ("changes", "pairs", "message"),
    [
        ({"sites": ["zz"]}, None, "unknown patching site 'zz'; did you mean 'z'"),
        (
            {},
            '{"clean": [0, 1], "corrupted": [0, 2], "answer": 1, "wrong_answer": 2}\n{"clean": [',
            "pairs.jsonl:2: not valid JSON",
        ),
        (
            {},
            '{"clean": [0, 1, 2], "corrupted": [0, 2], "answer": 1, "wrong_answer": 2}\n',
            "pairs.jsonl:1: field 'corrupted': 2 tokens but 'clean' has 3",
        ),
        ({"batch_size": 2.5}, None, "spec.json:1: batch_size: expected an int, got 2.5"),
        ({"layers": ["a"]}, None, "spec.json:1: layers[0]: expected an int, got 'a'"),
        ({}, "\x00\x01binary", "pairs.jsonl:1: holds a NUL byte: a binary file"),
    ],
)
def test_bad_input_exits_2_before_any_work(
    tmp_path: Path, changes: dict, pairs: str | None, message: str
) -> None:
    spec = write_sweep(tmp_path, 2, **changes)
    if pairs is not None:
        (tmp_path / "pairs.jsonl").write_text(pairs)
    done = mitk("--spec", str(spec), "--out", str(tmp_path / "out"))
    assert done.returncode == 2, done.stderr
    assert message in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "out" / "chunks").exists()
