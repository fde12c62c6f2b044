"""Forward benchmark at long context and on a LLaMA-shaped (GQA) model: time and peak memory.

Two cases (random weights, fp32, CPU), each saved once as a Hugging Face checkpoint that
every contender loads:

- ``llama``: LLaMA-shaped, 8 layers, d_model 1024, 16 query heads, 4 key-value heads (GQA),
  d_mlp 2816 (SwiGLU), vocab 32000, RMSNorm, rotary; a 2 x 256 batch;
- ``long``: GPT-2-small-shaped (12 layers, d_model 768, 12 heads, vocab 50257); 1 x 2048.

Contenders: ``mitk fused`` (logits), ``mitk cached-all`` (``run_with_cache`` keeping every
hook), ``mitk loss`` (``return_type="loss"``, logits built in position chunks),
``HF sdpa`` / ``HF eager`` (``AutoModelForCausalLM``, ``use_cache=False``) and
``TL HookedTransformer`` (TransformerLens's legacy model through its local-path loaders,
LLaMA included, no weight processing). Logits (for ``mitk loss``: the loss) are checked
against ``mitk fused``'s before anything is timed.

Time: all contenders in this process, interleaved round by round in shuffled order, best
of ``--rounds`` (as in ``bench/forward.py``).

Memory: each contender in its own process (``--child``), with ``MALLOC_MMAP_THRESHOLD_=65536``
so large blocks go back to the OS when freed. The child loads the weights, runs a warm-up
forward on the first 16 tokens, then reads ``VmRSS`` (``rss_before``), writes ``5`` to
``/proc/self/clear_refs`` (resets the kernel's peak-RSS mark to the current RSS), runs the
forward and reads ``VmHWM``. Reported::

    added = VmHWM - rss_before - output_bytes

where ``output_bytes`` is the returned logits tensor (4 bytes for the scalar loss). For
``mitk cached-all`` the cache is reported separately and not subtracted; its targets are
on ``mitk fused``. Targets (the long case): time ``mitk fused / TL HookedTransformer`` <= 0.6,
added memory ``mitk fused / TL HookedTransformer`` <= 0.5, and ``mitk loss`` adds less than
one full logits tensor.

Run::

    python bench/long_context.py                 # both cases (several minutes)
    python bench/long_context.py --case long     # one case
    python bench/long_context.py --quick         # tiny shapes, a smoke run
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial
import gc
from importlib.metadata import version
import json
import os
from pathlib import Path
import random
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

from forward import tl_hooked_model  # bench/forward.py: one way to load TL offline
import torch
from torch import Tensor
import torch.nn.functional as F

# before transformers / huggingface_hub are imported: every model here is built locally
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

SEED = 0
PARITY_ATOL = 1e-3
LOSS_ATOL = 1e-4
WARMUP_POS = 16
REFERENCE = "mitk fused"
BASELINE = "TL HookedTransformer"
CHILD_TAG = "CHILD-RESULT "
CONTENDERS = (
    "mitk fused",
    "mitk cached-all",
    "mitk loss",
    "HF sdpa",
    "HF eager",
    "TL HookedTransformer",
)
MB = 1e6


@dataclass(frozen=True)
class Case:
    name: str
    arch: str  # "gpt2" or "llama"
    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    d_mlp: int
    d_vocab: int
    batch: int
    seq: int
    targets: bool  # whether the long-context targets apply


CASES = {
    "llama": Case("llama-gqa 2x256", "llama", 8, 1024, 16, 4, 2816, 32000, 2, 256, False),
    "long": Case("gpt2-small 1x2048", "gpt2", 12, 768, 12, 12, 3072, 50257, 1, 2048, True),
}
QUICK_CASES = {
    "llama": Case("llama-tiny 2x32", "llama", 2, 64, 4, 2, 176, 1000, 2, 32, False),
    "long": Case("gpt2-tiny 1x1024", "gpt2", 2, 128, 2, 2, 512, 50257, 1, 1024, True),
}


@dataclass(frozen=True)
class Target:
    """``numerator / denominator`` of ``metric`` should be at most ``limit``."""

    metric: str  # "time" or "added memory"
    numerator: str
    denominator: str
    limit: float


TARGETS = (
    Target("time", "mitk fused", BASELINE, 0.6),
    Target("added memory", "mitk fused", BASELINE, 0.5),
    Target("added memory", "mitk loss", "one logits tensor", 1.0),
)


# --- checkpoint and models ----------------------------------------------------------------
def hf_config(case: Case) -> Any:
    if case.arch == "gpt2":
        from transformers import GPT2Config

        # n_ctx: TL's config converter reads it (real GPT-2 config.json files carry it)
        return GPT2Config(
            n_layer=case.n_layers,
            n_embd=case.d_model,
            n_head=case.n_heads,
            n_inner=case.d_mlp,
            vocab_size=case.d_vocab,
            n_positions=case.seq,
            n_ctx=case.seq,
        )
    from transformers import LlamaConfig

    return LlamaConfig(
        num_hidden_layers=case.n_layers,
        hidden_size=case.d_model,
        num_attention_heads=case.n_heads,
        num_key_value_heads=case.n_kv_heads,
        intermediate_size=case.d_mlp,
        vocab_size=case.d_vocab,
        max_position_embeddings=max(case.seq, 2048),
        tie_word_embeddings=False,
    )


def save_checkpoint(case: Case, directory: Path) -> None:
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    torch.manual_seed(SEED)
    AutoModelForCausalLM.from_config(hf_config(case)).save_pretrained(directory)


def case_tokens(case: Case) -> Tensor:
    generator = torch.Generator().manual_seed(SEED)
    return torch.randint(0, case.d_vocab, (case.batch, case.seq), generator=generator)


def tl_model(directory: Path) -> Any:
    """TL's HookedTransformer from a local HF directory, unprocessed (bench/forward.py)."""
    return tl_hooked_model(directory)


def build(name: str, directory: Path, shared: dict[str, Any]) -> Callable[[Tensor], Any]:
    """One contender as ``run(tokens)``; models in ``shared`` are reused across contenders."""
    if name.startswith("mitk"):
        import mitk

        if "mitk" not in shared:
            shared["mitk"] = mitk.HookedTransformer.from_pretrained(directory).eval()
        model = shared["mitk"]
        if name == "mitk cached-all":
            return lambda tokens: model.run_with_cache(tokens)
        if name == "mitk loss":
            return lambda tokens: model(tokens, return_type="loss")
        return lambda tokens: model(tokens)
    if name.startswith("HF"):
        from transformers import AutoModelForCausalLM

        attn = name.split()[1]
        hf = AutoModelForCausalLM.from_pretrained(directory, attn_implementation=attn).eval()
        return lambda tokens: hf(tokens, use_cache=False)
    if name == BASELINE:
        tl = tl_model(directory)
        return lambda tokens: tl(tokens)
    raise ValueError(f"unknown contender {name!r}")


def logits_of(output: Any) -> Tensor:
    if isinstance(output, Tensor):
        return output
    if isinstance(output, tuple):
        return output[0]
    return output.logits


def tensors_bytes(tensors: Any) -> int:
    """Bytes of the distinct storages behind ``tensors`` (views counted once)."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


# --- memory: one process per contender ----------------------------------------------------
def proc_status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def child(name: str, case: Case, directory: Path, threads: int) -> None:
    """Runs in its own process: prints ``CHILD_TAG`` and a JSON record of the forward's memory."""
    torch.set_num_threads(threads)
    run = build(name, directory, {})
    tokens = case_tokens(case)
    with torch.inference_mode():
        warm = run(tokens[:, :WARMUP_POS])
    del warm
    gc.collect()
    rss_before = proc_status_kb("VmRSS") * 1024
    Path("/proc/self/clear_refs").write_text("5")
    start = time.perf_counter()
    with torch.inference_mode():
        output = run(tokens)
    seconds = time.perf_counter() - start
    hwm = proc_status_kb("VmHWM") * 1024
    if name == "mitk loss":
        output_bytes, cache_bytes = output.numel() * output.element_size(), 0
    else:
        logits = logits_of(output)
        output_bytes = logits.numel() * logits.element_size()
        cache_bytes = tensors_bytes(output[1].values()) if name == "mitk cached-all" else 0
    record = {
        "rss_before": rss_before,
        "hwm": hwm,
        "output_bytes": output_bytes,
        "cache_bytes": cache_bytes,
        "added": hwm - rss_before - output_bytes,
        "seconds": seconds,
    }
    print(CHILD_TAG + json.dumps(record), flush=True)


def measure_memory(
    case_key: str, quick: bool, directory: Path, threads: int
) -> dict[str, dict[str, Any]]:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    results = {}
    for name in CONTENDERS:
        command = [sys.executable, __file__, "--child", name, "--case", case_key]
        command += ["--dir", str(directory), "--threads", str(threads)]
        command += ["--quick"] if quick else []
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
        lines = [line for line in done.stdout.splitlines() if line.startswith(CHILD_TAG)]
        if done.returncode != 0 or not lines:
            raise SystemExit(f"memory child {name!r} failed:\n{done.stderr[-3000:]}")
        results[name] = json.loads(lines[-1][len(CHILD_TAG) :])
    return results


# --- time and parity (this process) -------------------------------------------------------
def check_parity(runs: dict[str, Callable[[], Any]], tokens: Tensor) -> dict[str, float]:
    """The warm-up call of each contender, its output compared with ``REFERENCE``'s."""
    with torch.inference_mode():
        reference = logits_of(runs[REFERENCE]()).float()
        expected_loss = F.cross_entropy(
            reference[:, :-1].flatten(0, 1), tokens[:, 1:].flatten()
        ).item()
        diffs: dict[str, float] = {}
        for name, run in runs.items():
            if name == "mitk loss":
                diffs[name] = abs(run().item() - expected_loss)
                atol = LOSS_ATOL
            else:
                out = reference if name == REFERENCE else logits_of(run()).float()
                if out.shape != reference.shape:
                    raise SystemExit(f"{name}: logits shape {tuple(out.shape)} != reference's")
                diffs[name] = (out - reference).abs().max().item()
                atol = PARITY_ATOL
            if diffs[name] > atol:
                raise SystemExit(f"{name}: output differs from {REFERENCE}'s by {diffs[name]:.2e}")
    return diffs


def time_rounds(runs: dict[str, Callable[[], Any]], rounds: int) -> dict[str, list[float]]:
    """Seconds per call, interleaved in a fresh shuffled order each round."""
    order = random.Random(SEED)
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(rounds):
        for name in order.sample(list(runs), len(runs)):
            gc.collect()
            with torch.inference_mode():
                start = time.perf_counter()
                output = runs[name]()
                times[name].append(time.perf_counter() - start)
            del output
    return times


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


# --- reporting ----------------------------------------------------------------------------
def target_rows(case: Case, best: dict[str, float], memory: dict[str, Any]) -> list[dict]:
    logits_bytes = memory[REFERENCE]["output_bytes"]
    rows = []
    for target in TARGETS:
        if target.metric == "time":
            value = best[target.numerator] / best[target.denominator]
        elif target.denominator == "one logits tensor":
            value = memory[target.numerator]["added"] / logits_bytes
        else:
            value = memory[target.numerator]["added"] / memory[target.denominator]["added"]
        applies = case.targets
        rows.append(
            {
                "ratio": f"{target.numerator} / {target.denominator} ({target.metric})",
                "value": value,
                "target": target.limit if applies else None,
                "met": (value <= target.limit) if applies else None,
            }
        )
    return rows


def print_case(
    case: Case,
    times: dict[str, list[float]],
    diffs: dict[str, float],
    memory: dict[str, Any],
    rows: list[dict],
) -> None:
    best = {name: min(samples) for name, samples in times.items()}
    tl_added = memory[BASELINE]["added"]
    print(
        f"\n{'contender':<21} {'best s':>8} {'median s':>8} {'t/TL':>6} {'max|Δ|':>8}"
        f" {'added MB':>9} {'mem/TL':>7} {'out MB':>7} {'cache MB':>9} {'rss0 MB':>8}"
    )
    for name in CONTENDERS:
        m = memory[name]
        cache = f"{m['cache_bytes'] / MB:>9.0f}" if m["cache_bytes"] else f"{'-':>9}"
        print(
            f"{name:<21} {best[name]:>8.3f} {statistics.median(times[name]):>8.3f}"
            f" {best[name] / best[BASELINE]:>5.2f}x {diffs[name]:>8.1e}"
            f" {m['added'] / MB:>9.1f} {m['added'] / tl_added:>6.2f}x"
            f" {m['output_bytes'] / MB:>7.1f} {cache} {m['rss_before'] / MB:>8.0f}"
        )
    print("added = VmHWM - RSS before forward - returned tensor (logits; cache not subtracted)")
    print(f"\n{'ratio':<58} {'value':>7} {'target':>8}  status")
    for row in rows:
        if row["target"] is None:
            print(f"{row['ratio']:<58} {row['value']:>6.3f}x {'-':>8}  (no target at this case)")
        else:
            status = "met" if row["met"] else "MISSED"
            print(f"{row['ratio']:<58} {row['value']:>6.3f}x {row['target']:>6.2f}x  {status}")


def run_case(case_key: str, quick: bool, rounds: int, threads: int) -> dict[str, Any]:
    case = (QUICK_CASES if quick else CASES)[case_key]
    print(f"\n=== case: {case.name} {asdict(case)}")
    tokens = case_tokens(case)
    # the directory name must not contain "llama": TL would then skip reading its config
    with tempfile.TemporaryDirectory(prefix="mitk-bench-") as tmp:
        directory = Path(tmp)
        save_checkpoint(case, directory)
        print(f"loadavg before memory children: {loadavg()}")
        memory = measure_memory(case_key, quick, directory, threads)
        shared: dict[str, Any] = {}
        runs = {name: partial(build(name, directory, shared), tokens) for name in CONTENDERS}
        diffs = check_parity(runs, tokens)
        load_before = loadavg()
        print(f"loadavg before timing: {load_before}")
        times = time_rounds(runs, rounds)
        load_after = loadavg()
        print(f"loadavg after timing:  {load_after}")
    best = {name: min(samples) for name, samples in times.items()}
    rows = target_rows(case, best, memory)
    print_case(case, times, diffs, memory, rows)
    return {
        "case": asdict(case),
        "loadavg_before": load_before,
        "loadavg_after": load_after,
        "max_abs_diff": diffs,
        "times_s": times,
        "memory": memory,
        "ratios": rows,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", choices=["all", *CASES], default="all")
    parser.add_argument("--rounds", type=int, default=None, help="timed calls per contender")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--quick", action="store_true", help="tiny shapes, for a smoke run")
    parser.add_argument("--json", type=Path, default=None, help="also write results here")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--dir", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child is not None:
        case = (QUICK_CASES if args.quick else CASES)[args.case]
        child(args.child, case, args.dir, args.threads)
        return 0

    rounds = args.rounds if args.rounds is not None else (1 if args.quick else 3)
    torch.set_num_threads(args.threads)
    packages = ("torch", "transformers", "transformer-lens", "mitk")
    print(" ".join(f"{p} {version(p)}" for p in packages))
    print(f"threads: {args.threads}  rounds: {rounds}  cpu_count: {os.cpu_count()}  fp32 CPU")
    keys = list(CASES) if args.case == "all" else [args.case]
    results = {key: run_case(key, args.quick, rounds, args.threads) for key in keys}
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
