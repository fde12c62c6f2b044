"""Benchmarks stay runnable: each script's quick mode finishes and prints its ratios."""

from __future__ import annotations

from pathlib import Path
import subprocess
import sys

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


@pytest.mark.slow
@pytest.mark.parametrize(
    ("script", "ratio"),
    [
        ("forward.py", "mitk fused / HF sdpa"),
        ("patching.py", "TL bridge / mitk batched"),
        ("sweep.py", "TL loop / mitk units"),
        ("sae.py", "mitk / SAELens throughput (topk)"),
        ("sae_dictionaries.py", "mitk / SAELens throughput"),
        ("long_context.py", "mitk fused / TL HookedTransformer (added memory)"),
        ("gpu_check.py", "mitk fused / HF sdpa"),  # on a CPU: paths, bf16 bound, timings
        ("discovery.py", "TL EAP-IG reference / mitk eap_ig"),
    ],
)
def test_benchmark_quick_mode(script: str, ratio: str) -> None:
    done = subprocess.run(
        [sys.executable, str(BENCH / script), "--quick"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert ratio in done.stdout and "loadavg" in done.stdout
