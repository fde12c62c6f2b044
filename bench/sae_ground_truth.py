"""Dictionary recovery for bench/sae.py: mitk's four architectures on a small known dictionary.

Each architecture trains on 64 unit-norm features in 32 dimensions (~3 active per row) with
its default settings (as tests/unit/sae/test_ground_truth.py does, which asserts a mean max
cosine >= 0.95), and the table reports how well each decoder recovers the dictionary.
``sae_defaults.py`` runs the defaults over a grid of other sizes, next to SAELens's.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import Tensor

from mitk.sae import (
    ReconstructionStats,
    SAEConfig,
    SparseAutoencoder,
    SparseDictionaryData,
    mean_max_cosine_similarity,
    train,
)

SEED = 0
GROUND_TRUTH: dict[str, dict[str, Any]] = {  # defaults only, as a new user would train
    "relu": {"steps": 1500},
    "topk": {"k": 3, "steps": 1500},
    "batchtopk": {"k": 3, "steps": 3000},
    "jumprelu": {"steps": 1500},
}
GT_SHAPE = {"d_in": 32, "n_features": 64, "mean_active": 3, "batch": 256}


def _quality(sae: SparseAutoencoder, x: Tensor) -> ReconstructionStats:
    stats = ReconstructionStats(sae.cfg.d_in, sae.cfg.d_sae)
    with torch.no_grad():
        out = sae.eval()(x)
        stats.update(x, out.reconstruction, latents=out.latents)
    return stats


def ground_truth_rows(step_scale: float) -> list[dict[str, Any]]:
    shape = GT_SHAPE
    data = SparseDictionaryData(shape["d_in"], shape["n_features"], shape["mean_active"], SEED)
    train_rows, held_out = data.sample(40_000), data.sample(4096, seed=9)
    rows = []
    for arch, settings in GROUND_TRUTH.items():
        settings = dict(settings)
        steps = max(1, round(settings.pop("steps") * step_scale))
        cfg = SAEConfig(
            d_in=shape["d_in"],
            d_sae=shape["n_features"],
            architecture=arch,
            batch_size=shape["batch"],
            total_tokens=shape["batch"] * steps,
            log_every=steps,
            checkpoint_every=steps,
            **settings,
        )
        start = time.perf_counter()
        result = train(cfg, train_rows, progress=False)
        seconds = time.perf_counter() - start
        stats = _quality(result.sae, held_out)
        rows.append(
            {
                "arch": arch,
                "steps": steps,
                "seconds": seconds,
                "fvu": stats.fvu,
                "l0": stats.l0,
                "mmcs": mean_max_cosine_similarity(result.sae.W_dec.detach(), data.features),
            }
        )
    return rows


def print_ground_truth(rows: list[dict[str, Any]]) -> None:
    shape = GT_SHAPE
    print(
        f"\nground-truth recovery: {shape['n_features']} features in {shape['d_in']} dims, "
        f"~{shape['mean_active']} active, batch {shape['batch']}, default settings"
    )
    print(
        f"{'architecture':<12} {'steps':>6} {'seconds':>8} {'mean max cos':>13} {'FVU':>7} "
        f"{'L0':>6}"
    )
    for row in rows:
        print(
            f"{row['arch']:<12} {row['steps']:>6} {row['seconds']:>8.1f} {row['mmcs']:>13.3f} "
            f"{row['fvu']:>7.4f} {row['l0']:>6.2f}"
        )
