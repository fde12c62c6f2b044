"""Activation-patching benchmark: mitk's batched sweeps against hand loops and TransformerLens.

What it measures, on a random-weight GPT-2-small-shaped model (12 layers, d_model 768,
12 heads, vocab 50257; fp32, CPU) and one 20-token prompt pair (clean: random tokens;
corrupted: the same tokens with one position changed), denoising (clean activations patched
into the corrupted run), metric = logit[answer] - logit[wrong] at the last position:

- sweep ``resid_pre x pos``: ``hook_resid_pre`` patched at every (layer, position), 240 patches;
- sweep ``z x head``: ``attn.hook_z`` patched at every (layer, head) over all positions, 144.

Contenders, per sweep (each timed call is the whole sweep, clean cache included):

- ``mitk batched``: ``mitk.analysis.patching.activation_patch`` (the batched engine);
- ``mitk naive loop``: one ``run_with_cache(clean)``, then one ``run_with_hooks(corrupted)``
  per patch on the same mitk model, what a user writes by hand;
- ``TL HookedTransformer``: ``transformer_lens.patching.get_act_patch_resid_pre`` /
  ``get_act_patch_attn_head_out_all_pos`` on TL's legacy model, no weight processing;
- ``TL bridge``: the same TL functions on ``TransformerBridge.boot_transformers``.

Every contender loads the same checkpoint (``bench/forward.py`` saves it, with a trivial
tokenizer, to a temporary directory; no network), and its grid of patched metrics is checked
against mitk batched's before anything is timed. The machine is shared and its speed swings
with load, so calls are interleaved in a shuffled order each round and best times are compared.
One round is one call of every slow contender and ``--batched-calls`` calls of mitk batched.

The targets are meant for the full case; ``--quick`` only checks that everything runs and
agrees (tiny models are dominated by per-call overhead). On a shared machine ``--threads 1``
is steadier: when other processes keep the cores busy, multi-threaded torch can slow down
several-fold. A corruption at an earlier position (``--corrupt-pos``) leaves mitk's engine
less to reuse; TransformerLens's time does not depend on it.

Run::

    python bench/patching.py                  # full case, 2 rounds (about 15 minutes)
    python bench/patching.py --quick          # tiny shapes, a smoke run (about 20 seconds)
    python bench/patching.py --rounds 3 --threads 2 --corrupt-pos 1 --json results.json
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, replace
import json
import os
from pathlib import Path
import random
import statistics
import sys
import tempfile
from typing import Any
from unittest import mock

import torch
from torch import Tensor

# forward.py sets the hub-offline environment before anything imports transformers
sys.path.insert(0, str(Path(__file__).resolve().parent))
from forward import (
    PARITY_ATOL,
    SEED,
    loadavg,
    no_network,
    print_header,
    save_checkpoint,
    time_once,
    tl_hooked_contender,
)
from forward import Case as ModelCase

REFERENCE = "mitk batched"
BATCHED_CALLS = 5  # mitk batched calls per round (it is fast, so it can afford more samples)


@dataclass(frozen=True)
class Case:
    """One benchmark shape: model and prompt length (forward.py's Case, batch 1) and corruption."""

    model: ModelCase
    corrupt_pos: int  # the one position where the corrupted prompt differs from the clean one
    answer: int  # metric: logit[answer] - logit[wrong] at the last position
    wrong: int

    @property
    def name(self) -> str:
        return self.model.name


FULL = Case(
    ModelCase("gpt2-small 1x20", "gpt2", 12, 768, 12, 50257, 1024, batch=1, seq=20),
    corrupt_pos=10,
    answer=1000,
    wrong=2000,
)
QUICK = Case(
    ModelCase("gpt2-tiny 1x6", "gpt2", 2, 128, 2, 50257, 1024, batch=1, seq=6),
    corrupt_pos=3,
    answer=1000,
    wrong=2000,
)


@dataclass(frozen=True)
class Sweep:
    """One patching sweep: the site (mitk site = TL activation name) and what it iterates over."""

    name: str
    site: str
    per: str  # mitk granularity: "pos" or "head"
    tl_function: str  # the matching function in transformer_lens.patching

    def cells(self, case: Case) -> int:
        """Patches per layer."""
        return case.model.seq if self.per == "pos" else case.model.n_heads

    def region(self, cell: int) -> tuple[Any, ...]:
        """Index of one patch in the ``[batch, pos, ...]`` / ``[batch, pos, head, d_head]`` act."""
        return (slice(None), cell) if self.per == "pos" else (slice(None), slice(None), cell)


SWEEPS = (
    Sweep("resid_pre x pos", "resid_pre", "pos", "get_act_patch_resid_pre"),
    Sweep("z x head", "z", "head", "get_act_patch_attn_head_out_all_pos"),
)


@dataclass(frozen=True)
class Contender:
    """One way to run one sweep: ``run()`` returns the metric grid ``[layer, pos | head]``."""

    sweep: str
    engine: str
    run: Callable[[], Tensor]
    calls_per_round: int = 1

    @property
    def key(self) -> str:
        return f"{self.sweep} | {self.engine}"


@dataclass(frozen=True)
class Target:
    """``slower / faster`` (best times, same sweep) should be at least ``minimum``.

    ``minimum`` None: the ratio is reported for information only.
    """

    slower: str
    faster: str
    minimum: float | None


TARGETS = (
    Target("TL HookedTransformer", "mitk batched", 10.0),
    Target("TL bridge", "mitk batched", 10.0),
    Target("mitk naive loop", "mitk batched", None),
)

Metric = Callable[[Tensor], Tensor]


# --- contenders ---------------------------------------------------------------------------
def scalar_metric(case: Case) -> Metric:
    """Logits ``[1, pos, d_vocab]`` -> the logit difference at the last position (a scalar)."""

    def metric(logits: Tensor) -> Tensor:
        return logits[0, -1, case.answer] - logits[0, -1, case.wrong]

    return metric


def mitk_contenders(
    directory: Path, case: Case, clean: Tensor, corrupted: Tensor, batched_calls: int
) -> list[Contender]:
    import mitk
    from mitk.analysis.patching import activation_patch, logit_diff
    from mitk.hooks import name

    model = mitk.HookedTransformer.from_pretrained(directory).eval()
    metric = scalar_metric(case)
    contenders = []
    for sweep in SWEEPS:

        def batched(sweep: Sweep = sweep) -> Tensor:
            ld = logit_diff(case.answer, case.wrong)
            result = activation_patch(model, clean, corrupted, ld, sweep.site, sweep.per)
            return result.per_prompt[0]

        def naive(sweep: Sweep = sweep) -> Tensor:
            _, cache = model.run_with_cache(clean)
            out = torch.empty(case.model.n_layers, sweep.cells(case))
            for layer in range(case.model.n_layers):
                hook_name = name(sweep.site, layer)
                source = cache[hook_name]
                for cell in range(sweep.cells(case)):
                    region = sweep.region(cell)

                    def patch(
                        act: Tensor, hook: Any, region: Any = region, source: Tensor = source
                    ) -> Tensor:
                        act[region] = source[region]
                        return act

                    logits = model.run_with_hooks(corrupted, fwd_hooks=[(hook_name, patch)])
                    out[layer, cell] = metric(logits)
            return out

        contenders.append(Contender(sweep.name, "mitk batched", batched, batched_calls))
        contenders.append(Contender(sweep.name, "mitk naive loop", naive))
    return contenders


def no_progress_bar(items: Iterable[Any], *args: Any, **kwargs: Any) -> Iterable[Any]:
    return items


def tl_contenders(
    engine: str, model: Any, case: Case, clean: Tensor, corrupted: Tensor
) -> list[Contender]:
    """TL's own sweep functions on ``model`` (a HookedTransformer or a TransformerBridge)."""
    from transformer_lens import patching as tl_patching

    metric = scalar_metric(case)
    contenders = []
    for sweep in SWEEPS:
        function = getattr(tl_patching, sweep.tl_function)

        def run(function: Callable[..., Tensor] = function) -> Tensor:
            _, cache = model.run_with_cache(clean)
            # TL wraps the loop in tqdm; a bar per sweep would bury the results
            with mock.patch.object(tl_patching, "tqdm", no_progress_bar):
                return function(model, corrupted, cache, metric)

        contenders.append(Contender(sweep.name, engine, run))
    return contenders


def model_behind(run: Callable[[], Any]) -> torch.nn.Module:
    """The model a forward.py contender's call closes over (it returns only the call)."""
    for cell in run.__closure__ or ():
        if isinstance(cell.cell_contents, torch.nn.Module):
            return cell.cell_contents
    raise TypeError("the contender's call does not close over a model")


def build_contenders(
    directory: Path, case: Case, clean: Tensor, corrupted: Tensor, batched_calls: int
) -> list[Contender]:
    from transformer_lens.model_bridge import TransformerBridge

    with no_network():
        hooked = model_behind(tl_hooked_contender(directory, clean)[1])
        bridge = TransformerBridge.boot_transformers(str(directory), device="cpu").eval()
        return [
            *mitk_contenders(directory, case, clean, corrupted, batched_calls),
            *tl_contenders("TL HookedTransformer", hooked, case, clean, corrupted),
            *tl_contenders("TL bridge", bridge, case, clean, corrupted),
        ]


# --- measuring ----------------------------------------------------------------------------
def warm_up_and_check(contenders: list[Contender], atol: float) -> dict[str, float]:
    """One call per contender (the warm-up), its grid compared with its sweep's ``REFERENCE``.

    Exits if any contender computes different numbers: timing it would be meaningless.
    """
    grids = {}
    for contender in contenders:
        with torch.inference_mode():
            grids[contender.key] = contender.run().float()
    diffs: dict[str, float] = {}
    for contender in contenders:
        out = grids[contender.key]
        reference = grids[f"{contender.sweep} | {REFERENCE}"]
        if out.shape != reference.shape:
            raise SystemExit(f"{contender.key}: grid shape {tuple(out.shape)} != {REFERENCE}'s")
        diffs[contender.key] = (out - reference).abs().max().item()
        if diffs[contender.key] > atol:
            raise SystemExit(
                f"{contender.key}: patched metrics differ from {REFERENCE}'s by "
                f"{diffs[contender.key]:.2e}"
            )
    return diffs


def time_rounds(contenders: list[Contender], rounds: int) -> dict[str, list[float]]:
    """Seconds per sweep; each round runs every call once, in a fresh shuffled order."""
    order = random.Random(SEED)
    times: dict[str, list[float]] = {c.key: [] for c in contenders}
    for _ in range(rounds):
        calls = [c for c in contenders for _ in range(c.calls_per_round)]
        for contender in order.sample(calls, len(calls)):
            times[contender.key].append(time_once(contender.run))
    return times


def ratio_rows(best: dict[str, float]) -> list[dict[str, Any]]:
    rows = []
    for sweep in SWEEPS:
        for target in TARGETS:
            value = (
                best[f"{sweep.name} | {target.slower}"] / best[f"{sweep.name} | {target.faster}"]
            )
            rows.append(
                {
                    "sweep": sweep.name,
                    "ratio": f"{target.slower} / {target.faster}",
                    "value": value,
                    "target": target.minimum,
                    "met": None if target.minimum is None else value >= target.minimum,
                }
            )
    return rows


# --- reporting ----------------------------------------------------------------------------
def print_results(
    contenders: list[Contender],
    times: dict[str, list[float]],
    diffs: dict[str, float],
    ratios: list[dict[str, Any]],
) -> None:
    header = f"{'calls':>5} {'best s':>9} {'median s':>9} {'max|Δ|':>8}"
    print(f"\n{'sweep':<16} {'contender':<21} {header}")
    for c in contenders:
        samples = times[c.key]
        print(
            f"{c.sweep:<16} {c.engine:<21} {len(samples):>5} {min(samples):>9.4f} "
            f"{statistics.median(samples):>9.4f} {diffs[c.key]:>8.1e}"
        )
    print(f"\n{'sweep':<16} {'ratio (best times)':<39} {'value':>8} {'target':>8}  status")
    for row in ratios:
        if row["target"] is None:
            target, status = "-", "info"
        else:
            target, status = f">={row['target']:.0f}x", "met" if row["met"] else "MISSED"
        print(f"{row['sweep']:<16} {row['ratio']:<39} {row['value']:>7.2f}x {target:>8}  {status}")


def prompt_pair(case: Case) -> tuple[Tensor, Tensor]:
    """Random clean tokens, and a copy with the token at ``corrupt_pos`` replaced."""
    generator = torch.Generator().manual_seed(SEED)
    clean = torch.randint(0, case.model.d_vocab, (1, case.model.seq), generator=generator)
    corrupted = clean.clone()
    corrupted[0, case.corrupt_pos] = (clean[0, case.corrupt_pos] + 1) % case.model.d_vocab
    return clean, corrupted


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2, help="calls per slow contender")
    parser.add_argument(
        "--batched-calls", type=int, default=BATCHED_CALLS, help="mitk batched calls per round"
    )
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--quick", action="store_true", help="tiny shapes, for a smoke run")
    parser.add_argument(
        "--corrupt-pos", type=int, default=None, help="position the corruption changes"
    )
    parser.add_argument("--json", type=Path, default=None, help="also write results here")
    args = parser.parse_args(argv)

    case = QUICK if args.quick else FULL
    if args.corrupt_pos is not None:
        if not 0 <= args.corrupt_pos < case.model.seq:
            parser.error(f"--corrupt-pos must lie in [0, {case.model.seq})")
        case = replace(case, corrupt_pos=args.corrupt_pos)
    torch.set_num_threads(args.threads)
    print_header(case.model, args.rounds)
    print(
        f"corrupt_pos: {case.corrupt_pos}  metric: logit[{case.answer}] - logit[{case.wrong}] "
        f"at the last position  mitk batched calls per round: {args.batched_calls}"
    )

    clean, corrupted = prompt_pair(case)
    with tempfile.TemporaryDirectory(prefix="mitk-bench-") as tmp:
        save_checkpoint(case.model, Path(tmp))
        contenders = build_contenders(Path(tmp), case, clean, corrupted, args.batched_calls)
        diffs = warm_up_and_check(contenders, PARITY_ATOL)

        load_before = loadavg()
        print(f"loadavg before: {load_before}")
        times = time_rounds(contenders, args.rounds)
        load_after = loadavg()
        print(f"loadavg after:  {load_after}")

    best = {key: min(samples) for key, samples in times.items()}
    ratios = ratio_rows(best)
    print_results(contenders, times, diffs, ratios)
    if args.json is not None:
        result = {
            "case": asdict(case),
            "threads": torch.get_num_threads(),
            "rounds": args.rounds,
            "batched_calls_per_round": args.batched_calls,
            "loadavg_before": load_before,
            "loadavg_after": load_after,
            "max_abs_metric_diff": diffs,
            "times_s": times,
            "best_s": best,
            "median_s": {key: statistics.median(s) for key, s in times.items()},
            "ratios": ratios,
        }
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
