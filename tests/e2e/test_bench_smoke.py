"""Benchmarks stay runnable: each script's quick mode finishes and prints its ratios."""

from __future__ import annotations

from pathlib import Path
import subprocess
import sys

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


@pytest.mark.slow
def test_forward_benchmark_quick_mode() -> None:
    done = subprocess.run(
        [sys.executable, str(BENCH / "forward.py"), "--quick"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "mitk fused / HF sdpa" in done.stdout and "loadavg" in done.stdout


@pytest.mark.slow
def test_patching_benchmark_quick_mode() -> None:
    done = subprocess.run(
        [sys.executable, str(BENCH / "patching.py"), "--quick"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "TL bridge / mitk batched" in done.stdout and "loadavg" in done.stdout
