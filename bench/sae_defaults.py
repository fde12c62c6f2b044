"""Defaults on data nobody tuned for: mitk's SAE defaults against SAELens's on ground truth.

Each grid point is a known dictionary (``SparseDictionaryData``: ``n_features`` unit-norm
features in ``d_in`` dimensions, each row a sparse non-negative mix of about
``mean_active`` of them) and a token budget. Sizes differ from every size the unit tests
and ``sae_ground_truth.py`` use. For each architecture both tools get what a new user
would type — the shape, ``k`` (= mean_active, rounded) where the architecture takes one,
the batch size and the token budget — and nothing else (Matryoshka also gets its prefix
widths, mitk's default ``d_sae/8, /4, /2, d_sae``, as SAELens has no default for them):

- ``mitk``: ``train(SAEConfig(d_in, d_sae, architecture, k, batch_size, total_tokens), x)``
  on the raw tensor ``x``;
- ``SAELens``: its training SAE config with defaults (plus ``k``) and ``SAETrainer`` with
  its defaults (plus the budget and batch size), fed the same raw rows in batches.

``--tuned`` adds, for mitk, the best of a small learning-rate grid with the default
sparsity settings: a point where even that stays below 0.9 is one where the budget, not
the defaults, is the limit. Reported per run: mean max cosine between the decoder rows and
the true features (1.0 = every feature found), FVU and L0 on held-out rows (each SAE in
its inference form), and the mean max cosine ratio mitk / SAELens.

Run::

    python bench/sae_defaults.py                  # the grid, mitk and SAELens (~10 min)
    python bench/sae_defaults.py --quick          # one small point, a smoke run
    python bench/sae_defaults.py --tuned --json defaults.json
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from importlib.metadata import version
import json
import os
import tempfile
import time
from typing import Any

os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

import torch
from torch import Tensor

from mitk.sae import (
    ReconstructionStats,
    SAEConfig,
    SparseAutoencoder,
    SparseDictionaryData,
    TensorActivations,
    mean_max_cosine_similarity,
    train,
)

ARCHITECTURES = ("relu", "topk", "batchtopk", "jumprelu")
SAELENS_CLASSES = {
    "relu": ("StandardTrainingSAE", "StandardTrainingSAEConfig"),
    "topk": ("TopKTrainingSAE", "TopKTrainingSAEConfig"),
    "batchtopk": ("BatchTopKTrainingSAE", "BatchTopKTrainingSAEConfig"),
    "jumprelu": ("JumpReLUTrainingSAE", "JumpReLUTrainingSAEConfig"),
    "gated": ("GatedTrainingSAE", "GatedTrainingSAEConfig"),
    "matryoshka_batchtopk": (
        "MatryoshkaBatchTopKTrainingSAE",
        "MatryoshkaBatchTopKTrainingSAEConfig",
    ),
}
TUNED_LRS = (3e-4, 1e-3, 3e-3, 1e-2)


@dataclass(frozen=True)
class Point:
    """One grid point: the dictionary, its sparsity, and the training budget."""

    d_in: int
    n_features: int
    mean_active: float
    total_tokens: int
    batch_size: int = 1024
    seed: int = 3

    @property
    def k(self) -> int:
        return max(1, round(self.mean_active))


GRID = (
    Point(d_in=48, n_features=192, mean_active=4, total_tokens=400_000),
    Point(d_in=48, n_features=192, mean_active=4, total_tokens=1_500_000),
    Point(d_in=96, n_features=512, mean_active=8, total_tokens=600_000),
    Point(d_in=96, n_features=512, mean_active=8, total_tokens=2_000_000),
    Point(d_in=24, n_features=160, mean_active=2, total_tokens=500_000),
)
QUICK = (Point(d_in=24, n_features=64, mean_active=3, total_tokens=60_000, batch_size=512),)


def training_rows(point: Point) -> tuple[SparseDictionaryData, Tensor, Tensor]:
    """The dictionary, up to 1M training rows (epochs repeat them) and 8192 held-out rows."""
    data = SparseDictionaryData(point.d_in, point.n_features, point.mean_active, point.seed)
    rows = data.sample(min(point.total_tokens, 1_000_000), seed=point.seed + 1)
    return data, rows, data.sample(8192, seed=point.seed + 2)


def mitk_run(point: Point, arch: str, x: Tensor, **overrides: Any) -> SparseAutoencoder:
    cfg = SAEConfig(
        d_in=point.d_in,
        d_sae=point.n_features,
        architecture=arch,  # type: ignore[arg-type]
        k=point.k,
        batch_size=point.batch_size,
        total_tokens=point.total_tokens,
        **overrides,
    )
    return train(cfg, x, progress=False).sae


def raw_batches(point: Point, x: Tensor) -> Iterator[Tensor]:
    source = TensorActivations(x, point.batch_size, seed=point.seed, normalize=False)
    for step in range(point.total_tokens // point.batch_size):
        yield source.batch(step)[source.hook_names[0]]


def saelens_run(point: Point, arch: str, x: Tensor) -> SparseAutoencoder:
    """SAELens with its defaults; returned as mitk reads its saved inference SAE."""
    import sae_lens
    from sae_lens import SAETrainer
    from sae_lens.config import LoggingConfig, SAETrainerConfig

    model_name, config_name = SAELENS_CLASSES[arch]
    shape: dict[str, Any] = {"d_in": point.d_in, "d_sae": point.n_features}
    if arch in ("topk", "batchtopk", "matryoshka_batchtopk"):
        shape["k"] = point.k
    if arch == "matryoshka_batchtopk":  # SAELens has no default: mitk's default widths
        mitk_cfg = SAEConfig(d_in=point.d_in, d_sae=point.n_features, architecture=arch)
        shape["matryoshka_widths"] = list(mitk_cfg.matryoshka_widths)
    torch.manual_seed(point.seed)
    sae = getattr(sae_lens, model_name)(getattr(sae_lens, config_name)(**shape))
    cfg = SAETrainerConfig(
        total_training_samples=point.total_tokens // point.batch_size * point.batch_size,
        train_batch_size_samples=point.batch_size,
        lr_end=SAETrainerConfig.lr / 10,  # what SAELens's runner config fills in
        logger=LoggingConfig(log_to_wandb=False),
    )
    trained = SAETrainer(cfg=cfg, sae=sae, data_provider=raw_batches(point, x)).fit()
    with tempfile.TemporaryDirectory(prefix="mitk-bench-defaults-") as tmp:
        trained.save_inference_model(tmp)
        return SparseAutoencoder.load(tmp)


def score(sae: SparseAutoencoder, data: SparseDictionaryData, held_out: Tensor) -> dict:
    stats = ReconstructionStats(sae.cfg.d_in, sae.cfg.d_sae)
    with torch.no_grad():
        out = sae.eval()(held_out)
        stats.update(held_out, out.reconstruction, latents=out.latents)
    cosine = mean_max_cosine_similarity(sae.W_dec.detach(), data.features)
    return {"mmcs": round(cosine, 4), "fvu": round(stats.fvu, 4), "l0": round(stats.l0, 2)}


def run_point(point: Point, archs: tuple[str, ...], tuned: bool, peers: bool) -> list[dict]:
    data, x, held_out = training_rows(point)
    rows = []
    for arch in archs:
        row: dict[str, Any] = {"point": asdict(point), "arch": arch}
        start = time.perf_counter()
        row["mitk"] = score(mitk_run(point, arch, x), data, held_out)
        row["mitk_seconds"] = round(time.perf_counter() - start, 1)
        if peers and arch in SAELENS_CLASSES:
            row["saelens"] = score(saelens_run(point, arch, x), data, held_out)
        if tuned:
            trials = {lr: score(mitk_run(point, arch, x, lr=lr), data, held_out)
                      for lr in TUNED_LRS}  # fmt: skip
            best = max(trials, key=lambda lr: trials[lr]["mmcs"])
            row["tuned"] = {"lr": best, **trials[best]}
        rows.append(row)
        print_row(row)
    return rows


def print_row(row: dict[str, Any]) -> None:
    p = row["point"]
    where = (
        f"d_in={p['d_in']:>3} n={p['n_features']:>4} active={p['mean_active']:<3} "
        f"tokens={p['total_tokens'] / 1e6:.1f}M"
    )
    mitk, lens, tuned = row["mitk"], row.get("saelens"), row.get("tuned")
    parts = [f"{where}  {row['arch']:<9} mitk mmcs {mitk['mmcs']:.3f} fvu {mitk['fvu']:.3f} "
             f"l0 {mitk['l0']:5.1f}"]  # fmt: skip
    if lens:
        ratio = mitk["mmcs"] / max(lens["mmcs"], 1e-9)
        parts.append(f"| SAELens mmcs {lens['mmcs']:.3f} fvu {lens['fvu']:.3f} "
                     f"l0 {lens['l0']:6.1f} | ratio {ratio:.2f}")  # fmt: skip
    if tuned:
        parts.append(f"| tuned lr {tuned['lr']:.0e} mmcs {tuned['mmcs']:.3f}")
    print(" ".join(parts), flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one small grid point")
    parser.add_argument("--tuned", action="store_true", help="also mitk's best of a small lr grid")
    parser.add_argument("--no-peers", action="store_true", help="skip SAELens")
    parser.add_argument("--arch", action="append", choices=[*ARCHITECTURES, "gated",
                        "matryoshka_batchtopk"], help="only these (repeatable)")  # fmt: skip
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", help="write the rows to this file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    archs = tuple(args.arch or ARCHITECTURES)
    print(f"torch {torch.__version__}, sae-lens {version('sae-lens')}, threads {args.threads}, "
          f"load average {os.getloadavg()}")  # fmt: skip
    rows = []
    for point in QUICK if args.quick else GRID:
        rows += run_point(point, archs, args.tuned, not args.no_peers)
    print(f"load average at the end {os.getloadavg()}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
