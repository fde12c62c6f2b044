"""SAE training benchmark: mitk's trainer against SAELens's on the same activations.

What it measures, per architecture (TopK with k=32, the L1 ReLU SAE, and Matryoshka
BatchTopK with k=32 over mitk's default prefixes 512/1024/2048/4096, which SAELens is given
too since it has no default), with d_in 512, d_sae 4096, batch 4096 and 60 optimiser steps
(fp32, CPU):

- ``mitk``: ``mitk.sae.train(SAEConfig(...), source, progress=False)``;
- ``SAELens``: ``SAETrainer(cfg, TopKTrainingSAE | StandardTrainingSAE |
  MatryoshkaBatchTopKTrainingSAE, iterator).fit()``.

SAELens 6.54 has no transcoder trainer (its ``Transcoder`` classes load and run trained
ones), so there is no transcoder row to compare; mitk's transcoders train through the same
loss code as its SAEs.

Both read identical tensors in identical order: rows of ``SparseDictionaryData`` (4096
unit-norm ground-truth features in 512 dimensions, about 32 active per row with uniform
[0, 1) coefficients), scaled once to a mean norm of ``sqrt(d_in)`` and split into batches
that both tools are handed as they are (no normalisation inside either). Such data has a
real sparse structure, so an L1 SAE does become sparse as it trains, unlike Gaussian noise.

Settings are matched: the same Adam betas, constant learning rate (no warm-up or decay on
either side), the same L1 coefficient with no warm-up (both define the penalty as
``l1 * mean_rows sum_i f_i ||W_dec[i]||``), gradient norms clipped at 1, zero initial
``b_dec``, decoder rows initialised at norm 0.1 for ReLU, no resampling of silent latents
(mitk's default for ReLU; SAELens has none). Method differences that stay:
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

ReLU is timed twice. The cold start above leaves a fresh ReLU SAE with ~7.6% of its latents
active after 60 steps, where mitk's loss runs dense (it gathers the non-zero entries only at
<= ``SPARSE_DENSITY`` = 5%). A trained one on this data fires ~1-2%, the regime real training
spends nearly all its steps in, so a steady-state row starts both tools from one SAE that
mitk pre-trained for ``pretrain_steps`` on fresh batches (the pre-training run is the first
part of the timed runs' config and is stopped there; each timed mitk run resumes a copy of
its checkpoint). SAELens gets the same weights from that SAE's ``sae.save`` folder in a fresh
``StandardTrainingSAE``; both start with fresh Adam (the moments in mitk's checkpoint are
zeroed, which is exactly the state of an Adam that has not stepped). mitk's clock includes
reading that checkpoint and writing its final one.

A last table (``--ground-truth``, in ``sae_ground_truth.py``) trains each of mitk's four
architectures on a small known dictionary and reports how well the decoder recovers it.

Run::

    python bench/sae.py                      # full case, 3 rounds (ten minutes or more)
    python bench/sae.py --quick              # tiny shapes, a smoke run in seconds
    python bench/sae.py --rounds 5 --steps 100 --threads 2 --json results.json
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
import contextlib
from dataclasses import asdict, dataclass, replace
import gc
from importlib.metadata import version
import json
import os
from pathlib import Path
import random
import shutil
import statistics
import tempfile
import time
from typing import Any

os.environ.setdefault("TQDM_DISABLE", "1")  # SAELens's fit() always opens a progress bar
os.environ.setdefault("WANDB_MODE", "disabled")

from sae_ground_truth import ground_truth_rows, print_ground_truth
from safetensors.torch import load_file, save_file
import torch
from torch import Tensor

from mitk.checkpoint import reseal_checkpoint
from mitk.sae import (
    ReconstructionStats,
    SAEConfig,
    SparseAutoencoder,
    SparseDictionaryData,
    train,
)
from mitk.sae.losses import SPARSE_DENSITY
from mitk.sae.sources import norm_scale

SEED = 0
# the targets: TopK >= 3x, ReLU-L1 >= 1.5x; Matryoshka is held to at least parity
TARGET_SPEEDUP = {"topk": 3.0, "relu": 1.5, "matryoshka_batchtopk": 1.0}
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
    pretrain_steps: int  # ReLU steady state: mitk's steps before the timed ones


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
    pretrain_steps=200,
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
    pretrain_steps=40,
)
ARCHS = ("topk", "relu", "matryoshka_batchtopk")
TOPK_FAMILY = ("topk", "matryoshka_batchtopk")  # these use lr_topk and k
TOOLS = ("mitk", "SAELens")


# --- data ---------------------------------------------------------------------------------
@dataclass
class Data:
    batches: list[Tensor]  # training batches, in the order both tools see them
    held_out: Tensor
    source: SparseDictionaryData
    scale: float

    def pretrain_batch(self, step: int) -> Tensor:
        """Steady-state pre-training rows: fresh draws, never among the timed batches."""
        rows = self.batches[0].shape[0]
        return self.source.sample(rows, seed=1000 + step) * self.scale


def make_data(case: Case) -> Data:
    """Training rows and held-out rows, all scaled by the training rows' norm factor."""
    source = SparseDictionaryData(case.d_in, case.n_features, case.mean_active, seed=SEED)
    rows = source.sample(case.steps * case.batch, seed=1)
    scale = norm_scale(rows)
    held_out = source.sample(case.eval_rows, seed=2) * scale
    return Data(list((rows * scale).split(case.batch)), held_out, source, scale)


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
        lr=case.lr_topk if arch in TOPK_FAMILY else case.lr_relu,
        lr_warmup_fraction=0.0,
        lr_decay_fraction=0.0,
        sparsity_warmup_fraction=0.0,
        batch_size=case.batch,
        total_tokens=case.batch * steps,
        b_dec_init="zeros",
        resample_every=0.0,  # SAELens does not resample silent latents
        log_every=10**9,
        checkpoint_every=10**9,
        seed=SEED,
    )


def train_mitk(case: Case, arch: str, batches: list[Tensor]) -> SparseAutoencoder:
    cfg = mitk_config(case, arch, len(batches))
    return train(cfg, FixedBatches(batches), progress=False).sae


def saelens_sae(case: Case, arch: str) -> Any:
    """A fresh SAELens training SAE, initialised from the reseeded global generator."""
    from sae_lens import (
        MatryoshkaBatchTopKTrainingSAE,
        MatryoshkaBatchTopKTrainingSAEConfig,
        StandardTrainingSAE,
        StandardTrainingSAEConfig,
        TopKTrainingSAE,
        TopKTrainingSAEConfig,
    )

    torch.manual_seed(SEED)  # SAELens initialises from the global generator
    shape = {"d_in": case.d_in, "d_sae": case.d_sae, "device": "cpu", "dtype": "float32"}
    if arch == "topk":
        return TopKTrainingSAE(TopKTrainingSAEConfig(k=case.k, **shape))
    if arch == "matryoshka_batchtopk":
        widths = list(mitk_config(case, arch, 1).matryoshka_widths)
        return MatryoshkaBatchTopKTrainingSAE(
            MatryoshkaBatchTopKTrainingSAEConfig(k=case.k, matryoshka_widths=widths, **shape)
        )
    return StandardTrainingSAE(
        StandardTrainingSAEConfig(l1_coefficient=case.l1_coefficient, l1_warm_up_steps=0, **shape)
    )


def fit_saelens(case: Case, sae: Any, lr: float, batches: list[Tensor]) -> Any:
    """SAELens's in-memory trainer with wandb, checkpoints and evals all off."""
    from sae_lens import SAETrainer
    from sae_lens.config import LoggingConfig, SAETrainerConfig

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


def train_saelens(case: Case, arch: str, batches: list[Tensor]) -> Any:
    lr = case.lr_topk if arch in TOPK_FAMILY else case.lr_relu
    return fit_saelens(case, saelens_sae(case, arch), lr, batches)


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


def target_speedup(label: str) -> float:
    """The throughput ratio a row must reach (the steady-state ReLU row is a ReLU row)."""
    return TARGET_SPEEDUP[label.split(",")[0]]


def compare(
    case: Case, data: Data, label: str, times: dict[str, list[float]], trained: dict[str, Any]
) -> dict[str, Any]:
    """One table row: both tools' throughput (by tool name), their ratio, FVU and L0."""
    tokens = case.batch * case.steps
    lens_sae, own_fvu = saelens_inference(trained["SAELens"], data.held_out)
    stats = {
        "mitk": quality(trained["mitk"], data.held_out),
        "SAELens": quality(lens_sae, data.held_out),
    }
    best = {tool: min(times[tool]) for tool in TOOLS}
    ratio = best["SAELens"] / best["mitk"]
    return {
        "arch": label,
        "best_s": best,
        "median_s": {t: statistics.median(times[t]) for t in TOOLS},
        "tokens_per_s": {t: tokens / best[t] for t in TOOLS},
        "fvu": {t: stats[t].fvu for t in TOOLS},
        "l0": {t: stats[t].l0 for t in TOOLS},
        "ratio": ratio,
        "speedup_met": ratio >= target_speedup(label),
        "fvu_equal_or_better": stats["mitk"].fvu <= stats["SAELens"].fvu * (1 + FVU_TOLERANCE),
        "saelens_own_inference_fvu": own_fvu,
    }


def summarise(case: Case, data: Data, times: dict, trained: dict) -> list[dict[str, Any]]:
    """One row per architecture, from the cold-start rounds."""
    return [
        compare(
            case,
            data,
            arch,
            {t: times[f"{t} {arch}"] for t in TOOLS},
            {t: trained[f"{t} {arch}"] for t in TOOLS},
        )
        for arch in ARCHS
    ]


# --- ReLU steady state ----------------------------------------------------------------------
# A fresh ReLU SAE fires on far more latents than a trained one (here ~7.6% after 60 steps,
# against ~1-2% once trained), so a cold start times a regime that real training leaves early.
# mitk pre-trains one SAE; both tools then train 60 steps from its weights with fresh Adam.
STEADY = "relu, steady state"


class PretrainDoneError(Exception):
    """Raised by ``WarmBatches`` at the first timed step: the pre-training run stops there."""


class WarmBatches(FixedBatches):
    """Steps ``[0, P)`` are pre-training batches (sampled on demand), then the timed ones.

    The pre-training run and the timed resumptions share one config and one fingerprint,
    as ``train(..., resume=True)`` requires; ``stop`` ends the pre-training run at step P.
    """

    def __init__(self, data: Data, pretrain_steps: int, stop: bool) -> None:
        super().__init__(data.batches)
        self.data, self.pretrain_steps, self.stop = data, pretrain_steps, stop

    def batch(self, step: int) -> dict[str, Tensor]:
        if step < self.pretrain_steps:
            return {HOOK: self.data.pretrain_batch(step)}
        if self.stop:
            raise PretrainDoneError
        return super().batch(step - self.pretrain_steps)

    def fingerprint(self) -> dict[str, Any]:
        return {**super().fingerprint(), "pretrain_steps": self.pretrain_steps}


@dataclass
class WarmStart:
    checkpoint: Path  # mitk's checkpoint directory at step P, Adam moments zeroed
    folder: Path  # the same SAE saved by ``sae.save``: what SAELens starts from
    seconds: float  # pre-training time
    start: ReconstructionStats  # held-out quality of the starting SAE


def warm_config(case: Case) -> SAEConfig:
    steps = case.pretrain_steps + case.steps
    return replace(mitk_config(case, "relu", steps), checkpoint_every=case.pretrain_steps)


def pretrain(case: Case, data: Data, root: Path) -> WarmStart:
    """Train mitk's ReLU SAE for P steps, leaving a checkpoint there and a saved SAE."""
    cfg, checkpoint = warm_config(case), root / "pretrained"
    start = time.perf_counter()
    with contextlib.suppress(PretrainDoneError):
        train(cfg, WarmBatches(data, case.pretrain_steps, stop=True),
              checkpoint_dir=checkpoint, progress=False)  # fmt: skip
    seconds = time.perf_counter() - start
    latest = checkpoint / "latest"
    state = json.loads((latest / "state.json").read_text())
    assert state["meta"]["step"] == case.pretrain_steps, state["meta"]["step"]
    reset_adam(latest / "optimizer.safetensors", state)
    sae = SparseAutoencoder(cfg)
    prefix = "saes.0."
    weights = load_file(latest / "model.safetensors")
    sae.load_state_dict(
        {k.removeprefix(prefix): v for k, v in weights.items() if k.startswith(prefix)}
    )
    folder = sae.save(root / "pretrained-sae")
    return WarmStart(checkpoint, folder, seconds, quality(sae, data.held_out))


def reset_adam(path: Path, state: dict[str, Any]) -> None:
    """Zero Adam's moments and step count: what a fresh Adam holds before its first step.

    SAELens's trainer has no way to take optimiser state, so both tools start the timed
    steps with fresh Adam from the same weights.
    """
    assert not any(state["optimizer"]["scalars"].values()), state["optimizer"]["scalars"]
    save_file({k: torch.zeros_like(v) for k, v in load_file(path).items()}, str(path))
    reseal_checkpoint(path.parent)  # an edit on purpose: record its hashes, or resume refuses


def warm_mitk(case: Case, data: Data, run_dir: Path) -> SparseAutoencoder:
    """Resume the copied checkpoint and train the timed steps."""
    source = WarmBatches(data, case.pretrain_steps, stop=False)
    return train(warm_config(case), source, checkpoint_dir=run_dir, resume=True,
                 progress=False).sae  # fmt: skip


def warm_saelens(case: Case, data: Data, folder: Path) -> Any:
    """A fresh ``StandardTrainingSAE`` given the saved weights, trained the timed steps."""
    sae = saelens_sae(case, "relu")
    sae.load_state_dict(load_file(folder / "sae_weights.safetensors"))
    return fit_saelens(case, sae, case.lr_relu, data.batches)


def time_warm_rounds(
    case: Case, data: Data, warm: WarmStart, rounds: int, root: Path
) -> tuple[dict[str, list[float]], dict[str, Any]]:
    """Like ``time_rounds``, from the pre-trained SAE; copying the checkpoint is off the clock."""
    order = random.Random(SEED + 1)
    times: dict[str, list[float]] = {tool: [] for tool in TOOLS}
    trained: dict[str, Any] = {}
    for r in range(rounds):
        for tool in order.sample(TOOLS, len(TOOLS)):
            if tool == "mitk":
                run_dir = shutil.copytree(warm.checkpoint, root / f"run-{r}")
                seconds, sae = time_once(lambda d=run_dir: warm_mitk(case, data, d))
                shutil.rmtree(run_dir)
            else:
                seconds, sae = time_once(lambda: warm_saelens(case, data, warm.folder))
            times[tool].append(seconds)
            trained[tool] = sae
    return times, trained


def steady_state(case: Case, data: Data, rounds: int) -> dict[str, Any]:
    """The steady-state row, with the starting SAE's quality and pre-training time."""
    with tempfile.TemporaryDirectory(prefix="mitk-bench-warm-") as tmp:
        warm = pretrain(case, data, Path(tmp))
        times, trained = time_warm_rounds(case, data, warm, rounds, Path(tmp))
    row = compare(case, data, STEADY, times, trained)
    row["start"] = {
        "pretrain_steps": case.pretrain_steps,
        "pretrain_s": warm.seconds,
        "fvu": warm.start.fvu,
        "l0": warm.start.l0,
    }
    row["times_s"] = times
    return row


# --- reporting ----------------------------------------------------------------------------
def print_header(case: Case, rounds: int) -> None:
    packages = ("torch", "sae-lens", "mitk")
    print(" ".join(f"{p} {version(p)}" for p in packages))
    print(f"case: {case.name} {asdict(case)}")
    print(f"threads: {torch.get_num_threads()}  rounds: {rounds}  cpu_count: {os.cpu_count()}")


def print_results(case: Case, rows: list[dict[str, Any]]) -> None:
    for row in rows:
        arch = row["arch"]
        lr = case.lr_topk if arch in TOPK_FAMILY else case.lr_relu
        print(f"\n{arch}  ({case.steps} steps x {case.batch} rows, lr {lr:g})")
        if "start" in row:
            print_start(case, row["start"])
        print(
            f"{'contender':<10} {'best s':>8} {'median s':>9} {'tokens/s':>9} {'FVU':>7} "
            f"{'L0':>7} {'active':>7}"
        )
        for tool in TOOLS:
            print(
                f"{tool:<10} {row['best_s'][tool]:>8.2f} {row['median_s'][tool]:>9.2f} "
                f"{row['tokens_per_s'][tool]:>9.0f} {row['fvu'][tool]:>7.4f} "
                f"{row['l0'][tool]:>7.1f} {row['l0'][tool] / case.d_sae:>7.2%}"
            )
        status = "met" if row["speedup_met"] else "NOT MET"
        print(
            f"mitk / SAELens throughput ({arch}): {row['ratio']:.2f}x  "
            f"(target >= {target_speedup(arch)}x: {status})"
        )
        print(
            f"FVU equal or better (within {FVU_TOLERANCE:.0%}): "
            f"{'yes' if row['fvu_equal_or_better'] else 'no'}  "
            f"(SAELens FVU with SAELens's own inference code: "
            f"{row['saelens_own_inference_fvu']:.4f})"
        )


def print_start(case: Case, start: dict[str, Any]) -> None:
    print(
        f"start: mitk ReLU SAE after {start['pretrain_steps']} steps "
        f"({start['pretrain_s']:.0f} s, fresh batches): held-out FVU {start['fvu']:.4f}, "
        f"L0 {start['l0']:.1f} ({start['l0'] / case.d_sae:.2%} of latents active; mitk "
        f"gathers at <= {SPARSE_DENSITY:.0%})"
    )
    print(
        "both tools: same weights, fresh Adam (mitk's moments zeroed in its checkpoint); "
        "mitk's clock includes resuming from and writing its checkpoint"
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
    print_results(case, rows)  # before the steady state, so a cut-off run still shows them
    rows.append(steady_state(case, data, rounds))
    load_steady = loadavg()
    print(f"\nloadavg after steady state: {load_steady}")
    print_results(case, rows[-1:])

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
            "loadavg_after_steady_state": load_steady,
            "times_s": times,
            "results": rows,
            "ground_truth": truth,
        }
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
