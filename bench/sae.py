"""SAE training benchmark: mitk's trainer against SAELens's on the same activations.

What it measures, per architecture (TopK with k=32, and the L1 ReLU SAE), with d_in 512,
d_sae 4096, batch 4096 and 60 optimiser steps (fp32, CPU):

- ``mitk``: ``mitk.sae.train(SAEConfig(...), source, progress=False)``;
- ``SAELens``: ``SAETrainer(cfg, TopKTrainingSAE | StandardTrainingSAE, iterator).fit()``.

Both read identical tensors in identical order: rows of ``SparseDictionaryData`` (4096
unit-norm ground-truth features in 512 dimensions, about 32 active per row with uniform
[0, 1) coefficients), scaled once to a mean norm of ``sqrt(d_in)`` and split into batches
that both tools are handed as they are (no normalisation inside either). Such data has a
real sparse structure, so an L1 SAE does become sparse as it trains, unlike Gaussian noise.

Settings are matched: the same Adam betas, constant learning rate (no warm-up or decay on
either side), the same L1 coefficient with no warm-up (both define the penalty as
``l1 * mean_rows sum_i f_i ||W_dec[i]||``), gradient norms clipped at 1, zero initial
``b_dec``, decoder rows initialised at norm 0.1 for ReLU. Method differences that stay:
mitk keeps TopK decoder rows unit-norm (Gao et al.); SAELens 6 instead rescales the
pre-activations by the decoder norms (``rescale_acts_by_decoder_norm``), and its AuxK
differs (neither tool sees a dead latent in 60 steps, so AuxK is inactive on both sides).

Each timed call is the whole training run (building the SAE included), so throughput is
``steps * batch / seconds``. Contenders run interleaved round by round after a two-step
warm-up each, and the best time per contender is compared, since load on the shared
machine swings timings several-fold. FVU and L0 come from ``ReconstructionStats`` (mitk's
one FVU definition) on held-out rows, with each SAE in its inference form: SAELens's is
saved with ``save_inference_model`` and read back by ``SparseAutoencoder.load``, which is
checked against SAELens's own ``SAE.load_from_disk`` on the same rows.

A second table (``--ground-truth``) trains each of mitk's four architectures on a small
known dictionary and reports how well the decoder recovers it (mean max cosine).

Run::

    python bench/sae.py                      # full case, 3 rounds (ten minutes or more)
    python bench/sae.py --quick              # tiny shapes, a smoke run in seconds
    python bench/sae.py --rounds 5 --steps 100 --threads 2 --json results.json
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
import gc
from importlib.metadata import version
import json
import os
from pathlib import Path
import random
import statistics
import tempfile
import time
from typing import Any

os.environ.setdefault("TQDM_DISABLE", "1")  # SAELens's fit() always opens a progress bar
os.environ.setdefault("WANDB_MODE", "disabled")

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
from mitk.sae.sources import norm_scale

SEED = 0
TARGET_SPEEDUP = 1.5
FVU_TOLERANCE = 0.01  # relative: the tools start from different random decoders
HOOK = "activations"


@dataclass(frozen=True)
class Case:
    """Shapes, data and the training settings both tools share."""

    name: str
    d_in: int
    d_sae: int
    batch: int
    steps: int
    k: int  # TopK
    l1_coefficient: float  # ReLU
    lr_topk: float
    lr_relu: float
    n_features: int  # ground-truth dictionary of the data
    mean_active: float
    eval_rows: int


FULL = Case(
    "d_in 512, d_sae 4096, batch 4096",
    d_in=512,
    d_sae=4096,
    batch=4096,
    steps=60,
    k=32,
    l1_coefficient=3.0,
    lr_topk=1e-3,
    lr_relu=3e-3,
    n_features=4096,
    mean_active=32,
    eval_rows=16384,
)
QUICK = Case(
    "d_in 32, d_sae 128, batch 256",
    d_in=32,
    d_sae=128,
    batch=256,
    steps=8,
    k=8,
    l1_coefficient=3.0,
    lr_topk=1e-3,
    lr_relu=3e-3,
    n_features=128,
    mean_active=4,
    eval_rows=1024,
)
ARCHS = ("topk", "relu")
TOOLS = ("mitk", "SAELens")


# --- data ---------------------------------------------------------------------------------
@dataclass
class Data:
    batches: list[Tensor]  # training batches, in the order both tools see them
    held_out: Tensor


def make_data(case: Case) -> Data:
    """Training rows and held-out rows, all scaled by the training rows' norm factor."""
    source = SparseDictionaryData(case.d_in, case.n_features, case.mean_active, seed=SEED)
    rows = source.sample(case.steps * case.batch, seed=1)
    scale = norm_scale(rows)
    held_out = source.sample(case.eval_rows, seed=2) * scale
    return Data(list((rows * scale).split(case.batch)), held_out)


class FixedBatches:
    """An ``ActivationSource`` serving prepared batches, so no sampling is on mitk's clock."""

    def __init__(self, batches: list[Tensor]) -> None:
        self.batches = batches
        self.hook_names = (HOOK,)
        self.batch_size = batches[0].shape[0]
        self.d_in = {HOOK: batches[0].shape[1]}

    def batch(self, step: int) -> dict[str, Tensor]:
        return {HOOK: self.batches[step]}

    def scale(self, hook_name: str) -> float:
        return 1.0  # already normalised for both tools

    def fingerprint(self) -> dict[str, Any]:
        return {"kind": "bench_fixed_batches", "n": len(self.batches)}


# --- contenders ---------------------------------------------------------------------------
def mitk_config(case: Case, arch: str, steps: int) -> SAEConfig:
    return SAEConfig(
        d_in=case.d_in,
        d_sae=case.d_sae,
        architecture=arch,
        k=case.k,
        l1_coefficient=case.l1_coefficient,
        lr=case.lr_topk if arch == "topk" else case.lr_relu,
        lr_warmup_fraction=0.0,
        lr_decay_fraction=0.0,
        sparsity_warmup_fraction=0.0,
        batch_size=case.batch,
        total_tokens=case.batch * steps,
        b_dec_init="zeros",
        log_every=10**9,
        checkpoint_every=10**9,
        seed=SEED,
    )


def train_mitk(case: Case, arch: str, batches: list[Tensor]) -> SparseAutoencoder:
    cfg = mitk_config(case, arch, len(batches))
    return train(cfg, FixedBatches(batches), progress=False).sae


def train_saelens(case: Case, arch: str, batches: list[Tensor]) -> Any:
    """SAELens's in-memory trainer with wandb, checkpoints and evals all off."""
    from sae_lens import (
        SAETrainer,
        StandardTrainingSAE,
        StandardTrainingSAEConfig,
        TopKTrainingSAE,
        TopKTrainingSAEConfig,
    )
    from sae_lens.config import LoggingConfig, SAETrainerConfig

    torch.manual_seed(SEED)  # SAELens initialises from the global generator
    shape = {"d_in": case.d_in, "d_sae": case.d_sae, "device": "cpu", "dtype": "float32"}
    if arch == "topk":
        sae: Any = TopKTrainingSAE(TopKTrainingSAEConfig(k=case.k, **shape))
        lr = case.lr_topk
    else:
        sae = StandardTrainingSAE(
            StandardTrainingSAEConfig(
                l1_coefficient=case.l1_coefficient, l1_warm_up_steps=0, **shape
            )
        )
        lr = case.lr_relu
    cfg = SAETrainerConfig(
        total_training_samples=case.batch * len(batches),
        train_batch_size_samples=case.batch,
        lr=lr,
        lr_end=lr,
        lr_scheduler_name="constant",
        lr_warm_up_steps=0,
        lr_decay_steps=0,
        device="cpu",
        n_checkpoints=0,
        save_final_checkpoint=False,
        logger=LoggingConfig(log_to_wandb=False),
    )
    return SAETrainer(cfg=cfg, sae=sae, data_provider=iter(batches)).fit()


TRAINERS: dict[str, Callable[[Case, str, list[Tensor]], Any]] = {
    "mitk": train_mitk,
    "SAELens": train_saelens,
}


# --- quality ------------------------------------------------------------------------------
def saelens_inference(trained: Any, x: Tensor) -> tuple[SparseAutoencoder, float]:
    """SAELens's saved inference SAE, read by mitk; and the FVU SAELens's own copy gets.

    The second number checks the first: a TopK pick can flip on a near-tie between the
    two encoders' rounding, so their reconstructions may differ on a few rows.
    """
    from sae_lens import SAE

    with tempfile.TemporaryDirectory(prefix="mitk-bench-sae-") as tmp:
        trained.save_inference_model(tmp)
        sae = SparseAutoencoder.load(tmp)
        reference = SAE.load_from_disk(tmp, device="cpu").eval()
    stats = ReconstructionStats(sae.cfg.d_in, sae.cfg.d_sae)
    with torch.no_grad():
        for rows in x.split(4096):
            latents = reference.encode(rows)
            stats.update(rows, reference.decode(latents), latents=latents)
    return sae, stats.fvu


def quality(sae: SparseAutoencoder, x: Tensor, chunk: int = 4096) -> ReconstructionStats:
    stats = ReconstructionStats(sae.cfg.d_in, sae.cfg.d_sae)
    with torch.no_grad():
        for rows in x.split(chunk):
            out = sae.eval()(rows)
            stats.update(rows, out.reconstruction, latents=out.latents)
    return stats


# --- measuring ----------------------------------------------------------------------------
def time_once(run: Callable[[], Any]) -> tuple[float, Any]:
    gc.collect()  # so one contender's garbage is not collected on another's clock
    start = time.perf_counter()
    result = run()
    return time.perf_counter() - start, result


def time_rounds(case: Case, data: Data, rounds: int) -> tuple[dict[str, list[float]], dict]:
    """Seconds per training run, interleaved in a fresh shuffled order per round.

    Returns the times and the SAEs trained in the last round (every round trains the
    same SAE: mitk seeds its initialisation, SAELens's global generator is reseeded).
    """
    order = random.Random(SEED)
    pairs = [(arch, tool) for arch in ARCHS for tool in TOOLS]
    for arch, tool in pairs:  # warm-up: first-call overheads off the clock
        TRAINERS[tool](case, arch, data.batches[:2])
    times: dict[str, list[float]] = {f"{tool} {arch}": [] for arch, tool in pairs}
    trained: dict[str, Any] = {}
    for _ in range(rounds):
        for arch, tool in order.sample(pairs, len(pairs)):
            seconds, sae = time_once(lambda a=arch, t=tool: TRAINERS[t](case, a, data.batches))
            times[f"{tool} {arch}"].append(seconds)
            trained[f"{tool} {arch}"] = sae
    return times, trained


def summarise(case: Case, data: Data, times: dict, trained: dict) -> list[dict[str, Any]]:
    """One row per architecture: throughput of both tools, their ratio, FVU and L0."""
    tokens = case.batch * case.steps
    rows = []
    for arch in ARCHS:
        mitk_sae = trained[f"mitk {arch}"]
        lens_sae, own_fvu = saelens_inference(trained[f"SAELens {arch}"], data.held_out)
        stats = {
            "mitk": quality(mitk_sae, data.held_out),
            "SAELens": quality(lens_sae, data.held_out),
        }
        best = {tool: min(times[f"{tool} {arch}"]) for tool in TOOLS}
        ratio = best["SAELens"] / best["mitk"]
        rows.append(
            {
                "arch": arch,
                "best_s": best,
                "median_s": {t: statistics.median(times[f"{t} {arch}"]) for t in TOOLS},
                "tokens_per_s": {t: tokens / best[t] for t in TOOLS},
                "fvu": {t: stats[t].fvu for t in TOOLS},
                "l0": {t: stats[t].l0 for t in TOOLS},
                "ratio": ratio,
                "speedup_met": ratio >= TARGET_SPEEDUP,
                "fvu_equal_or_better": stats["mitk"].fvu
                <= stats["SAELens"].fvu * (1 + FVU_TOLERANCE),
                "saelens_own_inference_fvu": own_fvu,
            }
        )
    return rows


# --- ground truth -------------------------------------------------------------------------
# mitk's four architectures on 64 features in 32 dimensions, ~3 active per row: the
# settings tests/unit/sae/test_ground_truth.py shows reach a mean max cosine >= 0.95
GROUND_TRUTH: dict[str, dict[str, Any]] = {
    "relu": {"l1_coefficient": 0.2, "steps": 1500},
    "topk": {"k": 3, "steps": 1500},
    "batchtopk": {"k": 3, "steps": 3000},
    "jumprelu": {
        "l0_coefficient": 0.05,
        "jumprelu_init_threshold": 0.05,
        "jumprelu_bandwidth": 0.05,
        "steps": 1500,
    },
}
GT_SHAPE = {"d_in": 32, "n_features": 64, "mean_active": 3, "batch": 256, "lr": 3e-3}


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
            lr=shape["lr"],
            log_every=steps,
            checkpoint_every=steps,
            dead_after_tokens=50_000,
            **settings,
        )
        seconds, result = time_once(lambda c=cfg: train(c, train_rows, progress=False))
        stats = quality(result.sae, held_out)
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


# --- reporting ----------------------------------------------------------------------------
def print_header(case: Case, rounds: int) -> None:
    packages = ("torch", "sae-lens", "mitk")
    print(" ".join(f"{p} {version(p)}" for p in packages))
    print(f"case: {case.name} {asdict(case)}")
    print(f"threads: {torch.get_num_threads()}  rounds: {rounds}  cpu_count: {os.cpu_count()}")


def print_results(case: Case, rows: list[dict[str, Any]]) -> None:
    for row in rows:
        arch = row["arch"]
        lr = case.lr_topk if arch == "topk" else case.lr_relu
        print(f"\n{arch}  ({case.steps} steps x {case.batch} rows, lr {lr:g})")
        print(
            f"{'contender':<10} {'best s':>8} {'median s':>9} {'tokens/s':>9} {'FVU':>7} {'L0':>7}"
        )
        for tool in TOOLS:
            print(
                f"{tool:<10} {row['best_s'][tool]:>8.2f} {row['median_s'][tool]:>9.2f} "
                f"{row['tokens_per_s'][tool]:>9.0f} {row['fvu'][tool]:>7.4f} "
                f"{row['l0'][tool]:>7.1f}"
            )
        status = "met" if row["speedup_met"] else "NOT MET"
        print(
            f"mitk / SAELens throughput ({arch}): {row['ratio']:.2f}x  "
            f"(target >= {TARGET_SPEEDUP}x: {status})"
        )
        print(
            f"FVU equal or better (within {FVU_TOLERANCE:.0%}): "
            f"{'yes' if row['fvu_equal_or_better'] else 'no'}  "
            f"(SAELens FVU with SAELens's own inference code: "
            f"{row['saelens_own_inference_fvu']:.4f})"
        )


def print_ground_truth(rows: list[dict[str, Any]]) -> None:
    shape = GT_SHAPE
    print(
        f"\nground-truth recovery: {shape['n_features']} features in {shape['d_in']} dims, "
        f"~{shape['mean_active']} active, batch {shape['batch']}, lr {shape['lr']:g}"
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


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=None, help="timed runs per contender")
    parser.add_argument("--steps", type=int, default=None, help="optimiser steps per run")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="tiny shapes, for a smoke run")
    parser.add_argument("--json", type=Path, default=None, help="also write results here")
    parser.add_argument(
        "--ground-truth",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also run the dictionary-recovery table (default: on unless --quick)",
    )
    args = parser.parse_args(argv)

    case = QUICK if args.quick else FULL
    if args.steps is not None:
        case = replace(case, steps=args.steps)
    rounds = args.rounds if args.rounds is not None else (1 if args.quick else 3)
    torch.set_num_threads(args.threads)
    print_header(case, rounds)
    data = make_data(case)

    load_before = loadavg()
    print(f"loadavg before: {load_before}")
    times, trained = time_rounds(case, data, rounds)
    load_after = loadavg()
    print(f"loadavg after:  {load_after}")
    rows = summarise(case, data, times, trained)
    print_results(case, rows)

    truth: list[dict[str, Any]] = []
    if args.ground_truth if args.ground_truth is not None else not args.quick:
        truth = ground_truth_rows(step_scale=0.05 if args.quick else 1.0)
        print_ground_truth(truth)
        print(f"loadavg after ground truth: {loadavg()}")
    if args.json is not None:
        result = {
            "case": asdict(case),
            "threads": torch.get_num_threads(),
            "rounds": rounds,
            "loadavg_before": load_before,
            "loadavg_after": load_after,
            "times_s": times,
            "results": rows,
            "ground_truth": truth,
        }
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
