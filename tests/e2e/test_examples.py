"""Each example script runs with no arguments, offline, and prints what it promises."""

from __future__ import annotations

import os
from pathlib import Path
import re
import subprocess
import sys

import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
ALL = sorted(EXAMPLES.glob("*.py"))

# A line each script must print: evidence it computed the thing it is about, not just exited 0.
EXPECTED = {
    "activation_patching": r"resid_pre L1: best position \d+ restores (0\.9|1\.0)",
    "cache_and_hooks": r"attention paths: \['eager: hooked blocks\.0\.attn\.hook_pattern', 'sdpa",
    "dashboard": r"report written to .*report\.html",
    "direct_logit_attribution": r"sum of attributions matches",
    "induction_heads": r"induction heads ablated: [3-9]\.\d+ nats",
    "train_sae": r"held out: FVU 0\.[0-3]\d*, L0 16\.0, CE loss recovered",
}


def test_every_example_has_an_expected_line() -> None:
    assert {path.stem for path in ALL} == set(EXPECTED)


@pytest.mark.slow
@pytest.mark.parametrize("path", ALL, ids=[path.stem for path in ALL])
def test_example_runs_with_no_arguments(path: Path, tmp_path: Path) -> None:
    env = {
        **os.environ,
        "TMPDIR": str(tmp_path),  # files the examples write go to this test's directory
        "OMP_NUM_THREADS": "1",  # tiny matrices on shared CI cores: one thread is fastest
        "PYTHONWARNINGS": "error",  # as in the test suite
    }
    done = subprocess.run(
        [sys.executable, str(path)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        env=env,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert re.search(EXPECTED[path.stem], done.stdout), done.stdout[-3000:]
    if path.stem == "dashboard":
        report = next(tmp_path.rglob("report.html"))
        page = report.read_text()
        assert "<script src=" not in page  # plotly.js inlined: opens with no network
        assert page.count("<h2") >= 5 and "toy-induction" in page
