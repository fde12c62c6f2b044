"""Data-parallel SAE training: 2 gloo processes on loopback follow the 1-process trajectory."""

from __future__ import annotations

import json
import os
from pathlib import Path
import subprocess
import sys

import pytest
from safetensors.torch import load_file
import torch

from mitk.sae import TensorActivations, train
from tests.unit.sae.ddp_worker import activations, config

WORKER = Path(__file__).with_name("ddp_worker.py")
ROOT = Path(__file__).resolve().parents[3]


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["topk", "relu"])
def test_two_processes_match_one(arch: str, tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         str(WORKER), str(tmp_path), arch],
        capture_output=True, text=True, timeout=300, env=env, cwd=ROOT,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    meta = json.loads((tmp_path / "history.json").read_text())
    assert meta["world"] == 2
    distributed = load_file(tmp_path / "sae.safetensors")

    cfg = config(arch)
    single = train(cfg, TensorActivations(activations(), cfg.batch_size), progress=False)
    for name, tensor in single.sae.state_dict().items():
        torch.testing.assert_close(distributed[name], tensor, atol=2e-5, rtol=1e-4, msg=name)
    # metrics are reduced over both processes, so they describe the whole batch
    for got, want in zip(meta["history"], single.history, strict=True):
        for key, value in want.items():
            assert got[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key
