"""Patching-sweep benchmark: ``mitk patch`` against a TransformerLens loop, and 1 vs 2 processes.

What it measures, on the embedded ``toy-induction`` model (2 attention-only layers, d_model 64,
4 heads, vocab 256; fp32, CPU) and 200 prompt pairs (clean: BOS + a random 10-token segment
repeated; corrupted: a different first copy; metric: logit[answer] - logit[wrong] at the last
position), denoising every head's ``hook_z`` (``z`` per ``head``) and the residual stream at
every position (``resid_pre`` per ``pos``), 20 pairs per unit:

- ``mitk units``: the sweep's units run in this process (``mitk.sweeps.runner.run_unit``:
  the batched engine, and the long table each unit writes);
- ``TL loop``: TransformerLens's ``HookedTransformer`` on the same weights, per batch of 20
  pairs one ``run_with_cache(clean)`` then one ``run_with_hooks(corrupted)`` per patch;
- ``mitk patch 1 proc`` / ``mitk patch 2 procs``: the command line end to end (``python -m mitk
  patch`` and ``torchrun --nproc-per-node 2 -m mitk patch``), process start-up, chunk files,
  merge and sidecar included, one thread per process.

The TL loop's grid is checked against mitk's before anything is timed. The machine is shared
and its speed swings with load, so contenders are interleaved in a shuffled order each round
and the best times are compared; the load average is printed before and after.

Run::

    python bench/sweep.py              # 200 pairs, 3 rounds (a few minutes)
    python bench/sweep.py --quick      # 20 pairs, 1 round, a smoke run
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
import json
import os
from pathlib import Path
import random
import subprocess
import sys
import tempfile
from typing import Any
import warnings

import pandas as pd
import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))
from forward import PARITY_ATOL, SEED, loadavg, time_once

BATCH = 20  # pairs per unit, and per TL batch
HALF = 10  # length of the repeated random segment


def induction_pairs(n: int, d_vocab: int) -> list[dict[str, Any]]:
    """Clean: BOS + segment + segment; corrupted: another first copy; answer: the next token."""
    gen = torch.Generator().manual_seed(SEED)
    pairs = []
    for _ in range(n):
        segment = torch.randint(1, d_vocab, (HALF,), generator=gen).tolist()
        other = torch.randint(1, d_vocab, (HALF,), generator=gen).tolist()
        clean, corrupted = [0, *segment, *segment], [0, *other, *segment]
        pairs.append(
            {
                "clean": clean[:-1],
                "corrupted": corrupted[:-1],
                "answer": clean[-1],
                "wrong_answer": other[-1],
            }
        )
    return pairs


def tl_model(model: Any) -> Any:
    """TransformerLens's HookedTransformer holding mitk's weights (attention-only, LayerNorm)."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = model.cfg
    tl_cfg = HookedTransformerConfig(
        n_layers=cfg.n_layers,
        d_model=cfg.d_model,
        n_heads=cfg.n_heads,
        d_head=cfg.d_head,
        d_vocab=cfg.d_vocab,
        n_ctx=cfg.n_ctx,
        attn_only=True,
        normalization_type="LN",
        eps=cfg.norm_eps,
        act_fn="gelu",
        default_prepend_bos=False,
    )
    state = {
        "embed.W_E": model.W_E,
        "pos_embed.W_pos": model.W_pos,
        "unembed.W_U": model.W_U,
        "unembed.b_U": model.b_U,
        "ln_final.w": model.ln_final.w,
        "ln_final.b": model.ln_final.b,
    }
    for layer in range(cfg.n_layers):
        for weight in ("W_Q", "W_K", "W_V", "W_O", "b_Q", "b_K", "b_V", "b_O"):
            state[f"blocks.{layer}.attn.{weight}"] = getattr(model, weight)[layer]
        state[f"blocks.{layer}.ln1.w"] = model.blocks[layer].ln1.w
        state[f"blocks.{layer}.ln1.b"] = model.blocks[layer].ln1.b
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TL 3 deprecates the classic model
        tl = HookedTransformer(tl_cfg)
    tl.load_state_dict({k: v.detach().clone() for k, v in state.items()}, strict=False)
    return tl.eval()


# (mitk site:per, TL hook kind, which axis of the activation one patch indexes)
SITES = (("z:head", "attn.hook_z", 2), ("resid_pre:pos", "hook_resid_pre", 1))


def tl_loop(tl: Any, pairs: list[dict[str, Any]]) -> Tensor:
    """What a user writes with TransformerLens: per batch and site, one forward per patch.

    Returns every patched metric, ordered (site, pair, layer, head or position).
    """
    out = []
    for _, kind, axis in SITES:
        for start in range(0, len(pairs), BATCH):
            batch = pairs[start : start + BATCH]
            clean = torch.tensor([p["clean"] for p in batch])
            corrupted = torch.tensor([p["corrupted"] for p in batch])
            answer = torch.tensor([p["answer"] for p in batch])
            wrong = torch.tensor([p["wrong_answer"] for p in batch])
            rows = torch.arange(len(batch))
            _, cache = tl.run_with_cache(clean, names_filter=lambda n, k=kind: n.endswith(k))
            cells = cache[f"blocks.0.{kind}"].shape[axis]
            grid = torch.empty(len(batch), tl.cfg.n_layers, cells)
            for layer in range(tl.cfg.n_layers):
                hook = f"blocks.{layer}.{kind}"
                for cell in range(cells):
                    index = (slice(None),) * axis + (cell,)

                    def patch(
                        act: Tensor, hook: Any, index: Any = index, source: Tensor = cache[hook]
                    ) -> Tensor:
                        act[index] = source[index]
                        return act

                    last = tl.run_with_hooks(corrupted, fwd_hooks=[(hook, patch)])[:, -1]
                    grid[:, layer, cell] = last[rows, answer] - last[rows, wrong]
            out.append(grid.reshape(-1))
    return torch.cat(out)


def mitk_units(sweep: Any) -> Tensor:
    """Every unit of the sweep in this process; patched metrics in ``tl_loop``'s order."""
    from mitk.sweeps.runner import run_unit

    frame = pd.concat([run_unit(sweep, unit) for unit in sweep.units])
    frame = frame.sort_values(["unit", "pair", "layer", "head", "pos"])
    return torch.tensor(frame["value"].to_numpy()).float()


def cli_run(spec: Path, processes: int) -> Callable[[], None]:
    """One end-to-end ``mitk patch`` run into a fresh folder, in ``processes`` processes."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    launcher = (
        [sys.executable, "-m", "mitk"]
        if processes == 1
        else [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            str(processes),
            "-m",
            "mitk",
        ]
    )

    def run() -> None:
        with tempfile.TemporaryDirectory(prefix="mitk-sweep-") as out:
            subprocess.run(
                [*launcher, "patch", "--spec", str(spec), "--out", out, "-q"],
                check=True,
                env=env,
                capture_output=True,
            )

    return run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads in this process")
    parser.add_argument("--quick", action="store_true", help="20 pairs, 1 round: a smoke run")
    parser.add_argument("--json", type=Path, default=None, help="also write results here")
    args = parser.parse_args(argv)
    n_pairs, rounds = (20, 1) if args.quick else (args.pairs, args.rounds)
    torch.set_num_threads(args.threads)

    from mitk.sweeps import SweepSpec, prepare

    with tempfile.TemporaryDirectory(prefix="mitk-bench-") as tmp:
        pairs = induction_pairs(n_pairs, 256)
        spec_dict = {
            "model": "toy-induction",
            "sites": [site for site, _, _ in SITES],
            "batch_size": BATCH,
        }
        sweep = prepare(SweepSpec.from_dict({**spec_dict, "pairs": pairs}))
        (Path(tmp) / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
        (Path(tmp) / "spec.json").write_text(json.dumps({**spec_dict, "pairs_file": "pairs.jsonl"}))
        tl = tl_model(sweep.model)
        contenders: dict[str, Callable[[], Any]] = {
            "mitk units": lambda: mitk_units(sweep),
            "TL loop": lambda: tl_loop(tl, pairs),
            "mitk patch 1 proc": cli_run(Path(tmp) / "spec.json", 1),
            "mitk patch 2 procs": cli_run(Path(tmp) / "spec.json", 2),
        }
        with torch.inference_mode():
            diff = (contenders["TL loop"]() - contenders["mitk units"]()).abs().max().item()
        if diff > PARITY_ATOL:
            raise SystemExit(f"TL loop and mitk disagree by {diff:.2e}")
        for run in list(contenders.values())[2:]:
            run()  # warm-up: file caches, compiled bytecode
        print(
            f"sweep: {n_pairs} pairs of {len(pairs[0]['clean'])} tokens, toy-induction, "
            f"z per head and resid_pre per pos, {BATCH} pairs per unit; "
            f"threads {args.threads}; rounds {rounds}; "
            f"max|Δ| TL vs mitk {diff:.1e}"
        )
        load_before = loadavg()
        print(f"loadavg before: {load_before}")
        times: dict[str, list[float]] = {name: [] for name in contenders}
        order = random.Random(SEED)
        for _ in range(rounds):
            for name in order.sample(list(contenders), len(contenders)):
                times[name].append(time_once(contenders[name]))
        load_after = loadavg()
        print(f"loadavg after:  {load_after}")

    best = {name: min(samples) for name, samples in times.items()}
    print(f"\n{'contender':<20} {'best s':>8} {'pairs/s':>9}")
    for name, seconds in best.items():
        print(f"{name:<20} {seconds:>8.3f} {n_pairs / seconds:>9.1f}")
    ratios = {
        "TL loop / mitk units": best["TL loop"] / best["mitk units"],
        "1 proc / 2 procs": best["mitk patch 1 proc"] / best["mitk patch 2 procs"],
    }
    print()
    for label, value in ratios.items():
        print(f"{label:<22} {value:>6.2f}x  (best times)")
    if args.json is not None:
        args.json.write_text(
            json.dumps(
                {
                    "pairs": n_pairs,
                    "times_s": times,
                    "best_s": best,
                    "ratios": ratios,
                    "loadavg_before": load_before,
                    "loadavg_after": load_after,
                },
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
