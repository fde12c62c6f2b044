"""Matryoshka BatchTopK and transcoder training: mitk against SAELens on the same activations.

The shapes, data, settings and timing rules are ``bench/sae.py``'s (its ``Case``, read its
docstring): the same rows in the same order, constant learning rate, no warm-ups, zero
initial ``b_dec``, contenders interleaved round by round after a two-step warm-up, best
time per contender compared. Rows:

- ``matryoshka_batchtopk`` (prefix widths ``d_sae/8, /4, /2, d_sae``, k as TopK):
  ``mitk.sae.train`` against SAELens's ``MatryoshkaBatchTopKTrainingSAE`` (its default
  whole-dictionary AuxK, which is mitk's too). FVU and L0 on held-out rows, each SAE in its
  inference form (SAELens's saved by ``save_inference_model``, read by mitk).
- ``transcoder (topk)``: a TopK transcoder from ``x = c D_in`` to ``y = c D_out`` (the same
  sparse codes ``c``, a second dictionary of the same width). SAELens 6.54 has transcoder
  classes for inference only (no training class is registered), so there is nothing of
  SAELens's to time: the row compares mitk's transcoder with mitk's TopK SAE of the same
  shapes on ``x`` (what reading a second hook costs) and reports its FVU on ``y``.

Run::

    python bench/sae_dictionaries.py            # full case (bench/sae.py's), 3 rounds
    python bench/sae_dictionaries.py --quick    # tiny shapes, a smoke run in seconds
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import replace
import json
from pathlib import Path
import random
import statistics
from typing import Any

from sae import (  # bench/sae.py: one set of shapes, data and timing rules
    FULL,
    QUICK,
    SEED,
    Case,
    FixedBatches,
    fit_saelens,
    loadavg,
    make_data,
    mitk_config,
    print_header,
    quality,
    saelens_inference,
    time_once,
)
import torch
from torch import Tensor

from mitk.sae import ReconstructionStats, SAEConfig, SparseAutoencoder, SparseDictionaryData, train
from mitk.sae.sources import norm_scale

IN, OUT = "in", "out"


def widths(case: Case) -> tuple[int, ...]:
    return tuple(case.d_sae // d for d in (8, 4, 2, 1))


# --- contenders -------------------------------------------------------------------------------
def matryoshka_config(case: Case, steps: int) -> SAEConfig:
    topk = mitk_config(case, "topk", steps)
    return replace(topk, architecture="matryoshka_batchtopk", matryoshka_widths=widths(case))


def mitk_matryoshka(case: Case, batches: list[Tensor]) -> SparseAutoencoder:
    return train(matryoshka_config(case, len(batches)), FixedBatches(batches), progress=False).sae


def saelens_matryoshka(case: Case, batches: list[Tensor]) -> Any:
    from sae_lens import MatryoshkaBatchTopKTrainingSAE, MatryoshkaBatchTopKTrainingSAEConfig

    torch.manual_seed(SEED)  # SAELens initialises from the global generator
    cfg = MatryoshkaBatchTopKTrainingSAEConfig(
        d_in=case.d_in, d_sae=case.d_sae, k=case.k, matryoshka_widths=list(widths(case)),
        device="cpu", dtype="float32",
    )  # fmt: skip
    return fit_saelens(case, MatryoshkaBatchTopKTrainingSAE(cfg), case.lr_topk, batches)


class PairedBatches(FixedBatches):
    """Prepared batches of a transcoder's two hooks, rows aligned."""

    def __init__(self, inputs: list[Tensor], targets: list[Tensor]) -> None:
        super().__init__(inputs)
        self.targets = targets
        self.hook_names = (IN, OUT)
        self.d_in = {IN: inputs[0].shape[1], OUT: targets[0].shape[1]}

    def batch(self, step: int) -> dict[str, Tensor]:
        return {IN: self.batches[step], OUT: self.targets[step]}


def transcoder_data(case: Case) -> tuple[list[Tensor], list[Tensor], Tensor, Tensor]:
    """Training batches of ``x`` and ``y``, and held-out ``x``, ``y``; each scaled to sqrt(d)."""
    source = SparseDictionaryData(case.d_in, case.n_features, case.mean_active, seed=SEED)
    out = SparseDictionaryData(case.d_in, case.n_features, seed=SEED + 1).features
    codes, held = (
        source.coefficients(case.steps * case.batch, seed=1),
        source.coefficients(case.eval_rows, seed=2),
    )
    x, y = codes @ source.features, codes @ out
    sx, sy = norm_scale(x), norm_scale(y)
    return (list((x * sx).split(case.batch)), list((y * sy).split(case.batch)),
            held @ source.features * sx, held @ out * sy)  # fmt: skip


def transcoder_config(case: Case, steps: int) -> SAEConfig:
    topk = mitk_config(case, "topk", steps)
    return replace(topk, hook_name=IN, target_hook_name=OUT)


def mitk_transcoder(case: Case, x: list[Tensor], y: list[Tensor]) -> SparseAutoencoder:
    return train(transcoder_config(case, len(x)), PairedBatches(x, y), progress=False).sae


def mitk_topk(case: Case, x: list[Tensor]) -> SparseAutoencoder:
    return train(mitk_config(case, "topk", len(x)), FixedBatches(x), progress=False).sae


# --- measuring ----------------------------------------------------------------------------------
def time_contenders(
    runs: dict[str, Callable[[int | None], Any]], rounds: int
) -> tuple[dict[str, list[float]], dict[str, Any]]:
    """Seconds per run of each contender (``run(None)`` is the full run, ``run(2)`` a warm-up)."""
    for run in runs.values():
        run(2)
    order = random.Random(SEED)
    times: dict[str, list[float]] = {name: [] for name in runs}
    trained: dict[str, Any] = {}
    for _ in range(rounds):
        for name in order.sample(list(runs), len(runs)):
            seconds, trained[name] = time_once(lambda n=name: runs[n](None))
            times[name].append(seconds)
    return times, trained


def row(case: Case, label: str, times: dict[str, list[float]], fvu: dict, l0: dict) -> dict:
    best = {name: min(t) for name, t in times.items()}
    tokens = case.batch * case.steps
    names = list(times)
    return {
        "arch": label,
        "best_s": best,
        "median_s": {n: statistics.median(t) for n, t in times.items()},
        "tokens_per_s": {n: tokens / best[n] for n in names},
        "fvu": fvu,
        "l0": l0,
        "ratio": best[names[1]] / best[names[0]],
    }


def matryoshka_row(case: Case, rounds: int) -> dict[str, Any]:
    data = make_data(case)
    batches = data.batches

    runs = {
        "mitk": lambda n: mitk_matryoshka(case, batches[:n] if n else batches),
        "SAELens": lambda n: saelens_matryoshka(case, batches[:n] if n else batches),
    }
    times, trained = time_contenders(runs, rounds)
    lens, own_fvu = saelens_inference(trained["SAELens"], data.held_out)
    stats = {
        "mitk": quality(trained["mitk"], data.held_out),
        "SAELens": quality(lens, data.held_out),
    }
    out = row(case, "matryoshka_batchtopk", times, {t: s.fvu for t, s in stats.items()},
              {t: s.l0 for t, s in stats.items()})  # fmt: skip
    out["saelens_own_inference_fvu"] = own_fvu
    return out


def transcoder_row(case: Case, rounds: int) -> dict[str, Any]:
    x, y, held_x, held_y = transcoder_data(case)
    runs = {
        "mitk transcoder": lambda n: mitk_transcoder(case, x[:n] if n else x, y[:n] if n else y),
        "mitk topk SAE": lambda n: mitk_topk(case, x[:n] if n else x),
    }
    times, trained = time_contenders(runs, rounds)
    sae: SparseAutoencoder = trained["mitk transcoder"]
    stats = ReconstructionStats(case.d_in, case.d_sae)
    with torch.no_grad():
        for rows_x, rows_y in zip(held_x.split(4096), held_y.split(4096), strict=True):
            out = sae.eval()(rows_x)
            stats.update(rows_y, out.reconstruction, latents=out.latents)
    sae_stats = quality(trained["mitk topk SAE"], held_x)
    return row(case, "transcoder (topk)", times,
               {"mitk transcoder": stats.fvu, "mitk topk SAE": sae_stats.fvu},
               {"mitk transcoder": stats.l0, "mitk topk SAE": sae_stats.l0})  # fmt: skip


def print_row(case: Case, result: dict[str, Any]) -> None:
    print(f"\n{result['arch']}  ({case.steps} steps x {case.batch} rows, lr {case.lr_topk:g})")
    print(f"{'contender':<16} {'best s':>8} {'median s':>9} {'tokens/s':>9} {'FVU':>7} {'L0':>7}")
    for name in result["best_s"]:
        print(
            f"{name:<16} {result['best_s'][name]:>8.2f} {result['median_s'][name]:>9.2f} "
            f"{result['tokens_per_s'][name]:>9.0f} {result['fvu'][name]:>7.4f} "
            f"{result['l0'][name]:>7.1f}"
        )
    first, second = list(result["best_s"])
    print(f"{first} / {second} throughput: {result['ratio']:.2f}x")
    if "saelens_own_inference_fvu" in result:
        print(
            f"(SAELens FVU with its own inference code: {result['saelens_own_inference_fvu']:.4f})"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=None, help="timed runs per contender")
    parser.add_argument("--steps", type=int, default=None, help="optimiser steps per run")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="tiny shapes, for a smoke run")
    parser.add_argument("--json", type=Path, default=None, help="also write results here")
    args = parser.parse_args(argv)
    case = QUICK if args.quick else FULL
    if args.steps is not None:
        case = replace(case, steps=args.steps)
    rounds = args.rounds if args.rounds is not None else (1 if args.quick else 3)
    torch.set_num_threads(args.threads)
    print_header(case, rounds)
    results, loads = [], [loadavg()]
    print(f"loadavg before: {loads[0]}")
    for build in (matryoshka_row, transcoder_row):
        results.append(build(case, rounds))
        loads.append(loadavg())
        print_row(case, results[-1])
        print(f"loadavg after: {loads[-1]}")
    if args.json is not None:
        args.json.write_text(json.dumps({"rounds": rounds, "loadavg": loads, "results": results},
                                        indent=2))  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
