"""Worker for test_distributed: trains one SAE under torchrun and saves what rank 0 got.

Run as ``python -m torch.distributed.run --nproc-per-node 2 ddp_worker.py OUT_DIR ARCH``.
"""

from __future__ import annotations

import json
from pathlib import Path
import sys

from safetensors.torch import save_file
import torch
import torch.distributed as dist

from mitk.sae import SAEConfig, SparseDictionaryData, TensorActivations, train
from mitk.sae.distributed import current_world


def config(arch: str) -> SAEConfig:
    """The run both the test and the workers train (no latent dies: AuxK is per rank)."""
    return SAEConfig(
        d_in=16, d_sae=48, architecture=arch, k=3, batch_size=64, total_tokens=64 * 12,
        lr=3e-3, log_every=4, checkpoint_every=4, dead_after_tokens=64 * 12, l1_coefficient=0.1,
    )  # fmt: skip


def activations() -> torch.Tensor:
    return SparseDictionaryData(d_in=16, n_features=48, mean_active=3.0).sample(2000)


def main(out: Path, arch: str) -> None:
    torch.set_num_threads(1)
    cfg = config(arch)
    result = train(cfg, TensorActivations(activations(), cfg.batch_size), progress=False,
                   checkpoint_dir=out / "ckpt")  # fmt: skip
    world = dist.get_world_size()
    if dist.get_rank() == 0:
        tensors = {k: v.contiguous() for k, v in result.sae.state_dict().items()}
        save_file(tensors, out / "sae.safetensors")
        (out / "history.json").write_text(json.dumps({"world": world, "history": result.history}))
    current_world().finish()  # leave together: an early exit can abort the peer


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
