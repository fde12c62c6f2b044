"""Mixture-of-experts forward benchmark: mitk against Hugging Face on a Mixtral-shaped model.

The model is a random-weight ``MixtralForCausalLM`` scaled down to run on a small CPU
(6 layers, d_model 512, 8 query / 2 key-value heads (GQA), 8 SwiGLU experts of width 1536,
top-2 routing, vocab 32000; fp32), saved once to a temporary directory. Shapes: a
prefill-like 4 x 256 batch and a small 1 x 32 one. Contenders, per shape:

- ``mitk fused``: ``HookedTransformer.from_pretrained(hf_model)(tokens)`` (fused SDPA
  attention, experts run on the tokens routed to them);
- ``mitk cached-moe``: ``run_with_cache`` keeping every layer's router logits, expert
  indices and expert weights (for information: the price of reading the routing);
- ``HF <experts>``: ``AutoModelForCausalLM`` with ``attn_implementation="sdpa"`` (HF's
  default) and each ``experts_implementation`` transformers offers: ``eager`` (a Python
  loop over the experts that were hit), ``grouped_mm`` (the default; one
  ``torch.nn.functional.grouped_mm`` per projection) and ``batched_mm`` (gathers one
  weight copy per (token, expert) pair: 18 GiB at 4 x 256 here, so it only runs where that
  copy stays under ``BATCHED_MM_BUDGET``). ``use_cache=False``, as the others build no cache.

The target ratio is ``mitk fused`` over the fastest HF contender of the same shape (named in
the table), at most 1.0x. Logits of every contender are checked against ``mitk fused``'s
before anything is timed; contenders are interleaved in a shuffled order each round and
the best of ``--rounds`` is compared (timing helpers shared with ``bench/forward.py``).

Run::

    python bench/moe_forward.py                  # full case, 5 rounds (a few minutes)
    python bench/moe_forward.py --quick          # tiny model and shapes, a smoke run
    python bench/moe_forward.py --rounds 9 --threads 2 --json results.json
"""

from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass
from importlib.metadata import version
import json
import os
from pathlib import Path
import statistics
import tempfile
from typing import Any

# bench/ is the script's directory, so its sibling imports as a module; it also sets the
# offline environment variables before transformers is imported
from forward import (
    Contender,
    loadavg,
    no_network,
    print_results,
    time_rounds,
    warm_up_and_check,
)
import torch
from torch import Tensor

SEED = 0
PARITY_ATOL = 1e-3
TARGET = 1.0  # mitk fused / fastest HF, per shape
BATCHED_MM_BUDGET = 2 * 2**30  # bytes of gathered expert weights batched_mm may allocate
CPU_EXPERTS = ("grouped_mm", "batched_mm")  # beside "eager"; see experts_implementations()
MOE_HOOKS = ("hook_router_logits", "hook_expert_indices", "hook_expert_weights")


@dataclass(frozen=True)
class MoEModel:
    """A Mixtral-shaped model's dimensions."""

    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    d_expert: int
    n_experts: int
    top_k: int
    d_vocab: int


@dataclass(frozen=True)
class Shape:
    """One input batch: ``batch`` sequences of ``seq`` random tokens."""

    name: str
    batch: int
    seq: int


FULL = MoEModel(6, 512, 8, 2, 1536, n_experts=8, top_k=2, d_vocab=32000)
FULL_SHAPES = (Shape("prefill 4x256", 4, 256), Shape("small 1x32", 1, 32))
QUICK = MoEModel(2, 64, 4, 2, 128, n_experts=8, top_k=2, d_vocab=1000)
QUICK_SHAPES = (Shape("quick 2x16", 2, 16), Shape("quick 1x8", 1, 8))


# --- checkpoint ---------------------------------------------------------------------------
def save_checkpoint(model: MoEModel, directory: Path) -> None:
    """Random-weight (seeded) ``MixtralForCausalLM`` written to ``directory``."""
    from transformers import AutoModelForCausalLM, MixtralConfig
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # save/load bars would bury the results
    config = MixtralConfig(
        num_hidden_layers=model.n_layers,
        hidden_size=model.d_model,
        num_attention_heads=model.n_heads,
        num_key_value_heads=model.n_kv_heads,
        intermediate_size=model.d_expert,
        num_local_experts=model.n_experts,
        num_experts_per_tok=model.top_k,
        vocab_size=model.d_vocab,
        max_position_embeddings=4096,
    )
    torch.manual_seed(SEED)
    AutoModelForCausalLM.from_config(config).save_pretrained(directory)


# --- contenders ---------------------------------------------------------------------------
def experts_implementations() -> list[str]:
    """The experts implementations transformers registers that run on a CPU in fp32.

    The others (``deepgemm``, ``sonicmoe``) are CUDA kernels for bf16 and refuse fp32.
    """
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    return ["eager", *(impl for impl in CPU_EXPERTS if impl in ALL_EXPERTS_FUNCTIONS)]


def grouped_mm_kernel() -> str:
    """The kernel HF's grouped_mm reaches on this torch (it loops over experts without one)."""
    if hasattr(torch.nn.functional, "grouped_mm"):
        return "torch.nn.functional.grouped_mm"
    return "torch._grouped_mm" if hasattr(torch, "_grouped_mm") else "per-expert fallback"


def load_models(directory: Path) -> tuple[Any, dict[str, Any], str]:
    """The mitk model (converted from the in-memory HF model), one HF model per experts
    implementation (all in eval mode) and the implementation HF picks when none is asked."""
    from transformers import AutoModelForCausalLM

    import mitk

    def hf_model(**kwargs: Any) -> Any:
        return AutoModelForCausalLM.from_pretrained(
            directory, attn_implementation="sdpa", **kwargs
        ).eval()

    default_model = hf_model()
    default = str(default_model.config._experts_implementation)
    hf = {
        impl: default_model if impl == default else hf_model(experts_implementation=impl)
        for impl in experts_implementations()
    }
    model = mitk.HookedTransformer.from_pretrained(default_model).eval()
    return model, hf, default


def batched_mm_bytes(model: MoEModel, shape: Shape) -> int:
    """What batched_mm gathers: gate, up and down weights per (token, expert) pair (fp32)."""
    pairs = shape.batch * shape.seq * model.top_k
    return pairs * 3 * model.d_model * model.d_expert * 4


def contenders_for(
    mitk_model: Any, hf: dict[str, Any], tokens: Tensor, skip: set[str]
) -> list[Contender]:
    def cached() -> Any:
        return mitk_model.run_with_cache(tokens, names_filter=lambda n: n.endswith(MOE_HOOKS))

    contenders: list[Contender] = [
        ("mitk fused", lambda: mitk_model(tokens)),
        ("mitk cached-moe", cached),
    ]
    for impl, model in hf.items():
        if impl not in skip:
            contenders.append((f"HF {impl}", lambda m=model: m(tokens, use_cache=False)))
    return contenders


# --- reporting ----------------------------------------------------------------------------
def ratio_rows(best: dict[str, float]) -> list[dict[str, Any]]:
    """``mitk fused`` over each HF contender (the fastest carries the target) and
    ``mitk cached-moe`` over ``mitk fused``."""
    hf_names = sorted((n for n in best if n.startswith("HF ")), key=best.__getitem__)
    rows = []
    for i, name in enumerate(hf_names):
        value = best["mitk fused"] / best[name]
        target = TARGET if i == 0 else None
        label = f"mitk fused / {name}" + (" (fastest HF)" if i == 0 else "")
        rows.append({"ratio": label, "value": value, "target": target})
    rows.append(
        {
            "ratio": "mitk cached-moe / mitk fused",
            "value": best["mitk cached-moe"] / best["mitk fused"],
            "target": None,
        }
    )
    for row in rows:
        row["met"] = None if row["target"] is None else row["value"] <= row["target"]
    return rows


def print_shape(
    shape: Shape,
    times: dict[str, list[float]],
    diffs: dict[str, float],
    ratios: list[dict[str, Any]],
    load: tuple[list[float], list[float]],
) -> None:
    print(f"\n== {shape.name}   loadavg before {load[0]}  after {load[1]}", end="")
    print_results(times, diffs, ratios)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=None, help="timed calls per contender")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--quick", action="store_true", help="tiny model and shapes")
    parser.add_argument("--json", type=Path, default=None, help="also write results here")
    args = parser.parse_args(argv)

    model, shapes = (QUICK, QUICK_SHAPES) if args.quick else (FULL, FULL_SHAPES)
    rounds = args.rounds if args.rounds is not None else (2 if args.quick else 5)
    torch.set_num_threads(args.threads)
    packages = ("torch", "transformers", "mitk")
    print(" ".join(f"{p} {version(p)}" for p in packages))
    print(f"model: Mixtral-shaped {asdict(model)}")
    print(f"threads: {torch.get_num_threads()}  rounds: {rounds}  cpu_count: {os.cpu_count()}")
    generator = torch.Generator().manual_seed(SEED)
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="mitk-bench-moe-") as tmp, no_network():
        save_checkpoint(model, Path(tmp))
        mitk_model, hf, default = load_models(Path(tmp))
        print(f"HF experts implementations: {list(hf)}, default {default!r}")
        print(f"HF grouped_mm runs {grouped_mm_kernel()}")
        for shape in shapes:
            tokens = torch.randint(0, model.d_vocab, (shape.batch, shape.seq), generator=generator)
            skip = set()
            if batched_mm_bytes(model, shape) > BATCHED_MM_BUDGET:
                skip.add("batched_mm")
                gib = batched_mm_bytes(model, shape) / 2**30
                print(f"\n{shape.name}: HF batched_mm skipped (would gather {gib:.1f} GiB)")
            contenders = contenders_for(mitk_model, hf, tokens, skip)
            diffs = warm_up_and_check(contenders, PARITY_ATOL)
            load_before = loadavg()
            times = time_rounds(contenders, rounds)
            load_after = loadavg()
            best = {name: min(samples) for name, samples in times.items()}
            ratios = ratio_rows(best)
            print_shape(shape, times, diffs, ratios, (load_before, load_after))
            results.append(
                {
                    "shape": asdict(shape),
                    "loadavg_before": load_before,
                    "loadavg_after": load_after,
                    "max_abs_logit_diff": diffs,
                    "times_s": times,
                    "best_s": best,
                    "median_s": {name: statistics.median(s) for name, s in times.items()},
                    "ratios": ratios,
                }
            )
    if args.json is not None:
        result = {
            "model": asdict(model),
            "threads": torch.get_num_threads(),
            "rounds": rounds,
            "hf_default_experts_implementation": default,
            "shapes": results,
        }
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
