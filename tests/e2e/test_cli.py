"""The command line as a user runs it: subprocesses, exit codes, output."""

from __future__ import annotations

import json
from pathlib import Path
import subprocess
import sys

import pytest


def run_mitk(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mitk", *args], capture_output=True, text=True, timeout=300
    )


def test_demo_finds_induction_and_writes_a_self_contained_report(tmp_path: Path) -> None:
    out = tmp_path / "report.html"
    done = run_mitk("demo", "--json", "--out", str(out))
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    # the repeated half is predictable only through an induction circuit
    assert result["loss_repeated_half"] < 0.1 * result["loss_first_half"]
    late = [row for row in result["predictions"] if row["pos"] > 20 and row["next"] is not None]
    assert late and all(row["top"][0][0] == row["next"] for row in late)
    assert "blocks.1.attn.hook_pattern" in result["cached"]
    heads = {h["label"]: h for h in result["heads"]}
    assert max(heads.values(), key=lambda h: h["induction"])["layer"] == 1
    assert max(heads.values(), key=lambda h: h["previous_token"])["layer"] == 0
    assert result["top_attributions"][0][0].startswith("L1H")  # induction heads write the answer
    low, spread = result["k_composition_baseline"]
    assert result["k_composition_max"] > low + 5 * spread  # the circuit's K-composition
    recovery = result["patching_normalized"]  # [layer, head]
    assert max(recovery[1]) > max(recovery[0])  # layer-1 heads carry the answer
    page = out.read_text()
    assert result["report"] == str(out)
    assert "<script src=" not in page  # plotly.js is inlined: renders with no network
    assert page.count("Plotly.newPlot") >= 5 and "toy-induction" in page


def test_demo_human_output(tmp_path: Path) -> None:
    done = run_mitk("demo", "--out", str(tmp_path / "r.html"))
    assert done.returncode == 0, done.stderr
    assert "blocks.0.hook_resid_pre" in done.stdout and "top predictions" in done.stdout
    assert "report written to" in done.stdout


def test_models_lists_the_embedded_model() -> None:
    done = run_mitk("models", "--json")
    assert done.returncode == 0, done.stderr
    listing = json.loads(done.stdout)
    assert "toy-induction" in [m["name"] for m in listing["embedded"]]
    assert "gpt2" in listing["architectures"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["demo", "--model", "no-such-model"], "not a directory holding a checkpoint"),
        (["demo", "--half", "nope"], "Invalid value"),
        (["frobnicate"], "No such command"),
    ],
)
def test_bad_input_exits_2_with_a_message(args: list[str], message: str) -> None:
    done = run_mitk(*args)
    assert done.returncode == 2
    assert message in done.stderr
    assert "Traceback" not in done.stderr


def test_help_on_every_command() -> None:
    for args in (["--help"], ["demo", "--help"], ["models", "--help"]):
        done = run_mitk(*args)
        assert done.returncode == 0 and "Usage" in done.stdout
