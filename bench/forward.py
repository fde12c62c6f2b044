"""Forward-pass benchmark: mitk against Hugging Face and TransformerLens on one random model.

What it measures, on a random-weight GPT-2-small-shaped model (12 layers, d_model 768,
12 heads, vocab 50257; fp32, CPU) and a 4 x 256 batch of random tokens:

- ``mitk fused``: ``mitk.HookedTransformer(tokens)`` (fused SDPA attention);
- ``mitk cached-resid``: ``run_with_cache`` keeping every ``hook_resid_*`` activation;
- ``HF sdpa`` / ``HF eager``: ``GPT2LMHeadModel`` with each ``attn_implementation``;
- ``TL HookedTransformer``: TransformerLens's legacy model, no weight processing;
- ``TL bridge``: TransformerLens's ``TransformerBridge`` over the HF model.

Every contender loads the same checkpoint, saved once to a temporary directory, and its
logits are checked against mitk's before anything is timed. The machine is shared and its
speed swings several-fold with load, so contenders are interleaved round by round (one
warm-up call each first) and the best time per contender is what the ratios compare.

Run::

    python bench/forward.py                  # full case, 5 rounds (several minutes)
    python bench/forward.py --quick          # tiny shapes, a smoke run in seconds
    python bench/forward.py --rounds 9 --threads 2 --json results.json
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
import gc
from importlib.metadata import version
import json
import os
from pathlib import Path
import random
import socket
import statistics
import tempfile
import time
from typing import Any
from unittest import mock
import warnings

import torch
from torch import Tensor

# Set before transformers / huggingface_hub are imported (they read it at import time):
# every model here is built locally, and a hub lookup would only hang or fail.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

SEED = 0
PARITY_ATOL = 1e-3
REFERENCE = "mitk fused"


@dataclass(frozen=True)
class Case:
    """One benchmark shape: the model (as an HF config) and the input batch."""

    name: str
    arch: str  # key into HF_CONFIGS
    n_layers: int
    d_model: int
    n_heads: int
    d_vocab: int
    n_ctx: int
    batch: int
    seq: int


FULL = Case("gpt2-small 4x256", "gpt2", 12, 768, 12, 50257, 1024, batch=4, seq=256)
QUICK = Case("gpt2-tiny 2x32", "gpt2", 2, 128, 2, 50257, 1024, batch=2, seq=32)


@dataclass(frozen=True)
class Target:
    """``numerator / denominator`` (best times) should be at most ``limit``."""

    numerator: str
    denominator: str
    limit: float


TARGETS = (
    Target("mitk fused", "HF sdpa", 1.0),
    Target("mitk fused", "TL HookedTransformer", 0.85),
    Target("mitk fused", "TL bridge", 1.0),
    Target("mitk cached-resid", "mitk fused", 1.10),
)

# A contender is a name and a zero-argument call running one forward on the case's tokens.
Contender = tuple[str, Callable[[], Any]]


# --- checkpoint ---------------------------------------------------------------------------
def gpt2_config(case: Case) -> Any:
    from transformers import GPT2Config

    # n_ctx is not a GPT2Config field in transformers 5, but real GPT-2 config.json files
    # carry it and TransformerLens's config converter reads it
    return GPT2Config(
        n_layer=case.n_layers,
        n_embd=case.d_model,
        n_head=case.n_heads,
        vocab_size=case.d_vocab,
        n_positions=case.n_ctx,
        n_ctx=case.n_ctx,
    )


# arch -> HF config builder; a LLaMA-shaped case adds an entry here
HF_CONFIGS: dict[str, Callable[[Case], Any]] = {"gpt2": gpt2_config}


def save_trivial_tokenizer(directory: Path) -> None:
    """A two-word offline tokenizer: TransformerBridge refuses to boot without one."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    eot = "<|endoftext|>"
    backend = Tokenizer(models.WordLevel(vocab={eot: 0, "a": 1}, unk_token=eot))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=eot, eos_token=eot, unk_token=eot, pad_token=eot
    )
    tokenizer.save_pretrained(directory)


def save_checkpoint(case: Case, directory: Path) -> None:
    """Random-weight HF causal LM (seeded) plus a trivial tokenizer, written to ``directory``."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # save/load bars would bury the results

    torch.manual_seed(SEED)
    model = AutoModelForCausalLM.from_config(HF_CONFIGS[case.arch](case))
    model.save_pretrained(directory)
    save_trivial_tokenizer(directory)


@contextmanager
def no_network() -> Iterator[None]:
    """Make any socket connection fail loudly, so a hidden hub lookup cannot slip through."""

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("benchmark tried to open a network connection")

    with mock.patch.object(socket.socket, "connect", refuse):
        yield


# --- contenders ---------------------------------------------------------------------------
def mitk_contenders(directory: Path, tokens: Tensor) -> list[Contender]:
    import mitk

    model = mitk.HookedTransformer.from_pretrained(directory).eval()

    def cached() -> Any:
        return model.run_with_cache(tokens, names_filter=lambda name: "resid" in name)

    return [("mitk fused", lambda: model(tokens)), ("mitk cached-resid", cached)]


def hf_contenders(directory: Path, tokens: Tensor) -> list[Contender]:
    from transformers import AutoModelForCausalLM

    contenders: list[Contender] = []
    for attn in ("sdpa", "eager"):
        model = AutoModelForCausalLM.from_pretrained(directory, attn_implementation=attn).eval()
        # use_cache=False: the others return logits only, without building a KV cache
        contenders.append((f"HF {attn}", lambda m=model: m(tokens, use_cache=False)))
    return contenders


def tl_hooked_model(directory: Path) -> Any:
    """TL's legacy HookedTransformer on a local HF checkpoint, unprocessed, in eval mode.

    ``HookedTransformer.from_pretrained`` needs an official model name and then fetches that
    name's config from the hub, so it cannot run offline; the loaders it calls accept a
    local directory instead. The other benches load TL through this too.
    """
    from transformer_lens import HookedTransformer
    from transformer_lens import loading_from_pretrained as loading
    from transformers import AutoModelForCausalLM

    hf_model = AutoModelForCausalLM.from_pretrained(directory)
    cfg = loading.get_pretrained_model_config(
        str(directory), hf_cfg=hf_model.config.to_dict(), fold_ln=False, device="cpu"
    )
    cfg.tokenizer_name = None  # otherwise the constructor loads a tokenizer it never uses
    state = loading.get_pretrained_state_dict(str(directory), cfg, hf_model)
    del hf_model
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # "use TransformerBridge"
        model = HookedTransformer(cfg, tokenizer=None, move_to_device=False)
    # no processing at all, so it computes exactly the function the others compute
    model.load_and_process_state_dict(
        state,
        fold_ln=False,
        center_writing_weights=False,
        center_unembed=False,
        fold_value_biases=False,
    )
    return model.eval()


def tl_hooked_contender(directory: Path, tokens: Tensor) -> Contender:
    """Legacy HookedTransformer (``tl_hooked_model``)."""
    model = tl_hooked_model(directory)
    return "TL HookedTransformer", lambda: model(tokens)


def tl_bridge_contender(directory: Path, tokens: Tensor) -> Contender:
    from transformer_lens.model_bridge import TransformerBridge

    # the bridge forces HF's eager attention so that pattern hooks can fire
    bridge = TransformerBridge.boot_transformers(str(directory), device="cpu")
    bridge.eval()
    return "TL bridge", lambda: bridge(tokens)


def build_contenders(directory: Path, tokens: Tensor) -> list[Contender]:
    with no_network():
        return [
            *mitk_contenders(directory, tokens),
            *hf_contenders(directory, tokens),
            tl_hooked_contender(directory, tokens),
            tl_bridge_contender(directory, tokens),
        ]


# --- measuring ----------------------------------------------------------------------------
def logits_of(output: Any) -> Tensor:
    """Logits from any contender's return value (tensor, (logits, cache) or HF output)."""
    if isinstance(output, Tensor):
        return output
    if isinstance(output, tuple):
        return output[0]
    return output.logits


def warm_up_and_check(contenders: list[Contender], atol: float) -> dict[str, float]:
    """One call per contender (the warm-up), its logits compared with ``REFERENCE``'s.

    Exits if any contender computes a different function: timing it would be meaningless.
    """

    def logits(run: Callable[[], Any]) -> Tensor:
        with torch.inference_mode():
            return logits_of(run()).float()

    reference = logits(dict(contenders)[REFERENCE])
    diffs: dict[str, float] = {}
    for name, run in contenders:
        out = reference if name == REFERENCE else logits(run)
        if out.shape != reference.shape:
            raise SystemExit(f"{name}: logits shape {tuple(out.shape)} != {REFERENCE}'s")
        diffs[name] = (out - reference).abs().max().item()
        if diffs[name] > atol:
            raise SystemExit(f"{name}: logits differ from {REFERENCE}'s by {diffs[name]:.2e}")
    return diffs


def time_once(run: Callable[[], Any]) -> float:
    gc.collect()  # so one contender's garbage is not collected on another's clock
    with torch.inference_mode():
        start = time.perf_counter()
        output = run()
        elapsed = time.perf_counter() - start
    del output
    return elapsed


def time_rounds(contenders: list[Contender], rounds: int) -> dict[str, list[float]]:
    """Seconds per call, ``rounds`` calls each, interleaved in a fresh shuffled order per round.

    Interleaving spreads load spikes over all contenders instead of penalising whichever
    ran during one; shuffling keeps any one from always following the same neighbour.
    """
    order = random.Random(SEED)
    times: dict[str, list[float]] = {name: [] for name, _ in contenders}
    for _ in range(rounds):
        for name, run in order.sample(contenders, len(contenders)):
            times[name].append(time_once(run))
    return times


def ratio_rows(best: dict[str, float]) -> list[dict[str, Any]]:
    rows = []
    for target in TARGETS:
        value = best[target.numerator] / best[target.denominator]
        rows.append(
            {
                "ratio": f"{target.numerator} / {target.denominator}",
                "value": value,
                "target": target.limit,
                "met": value <= target.limit,
            }
        )
    return rows


# --- reporting ----------------------------------------------------------------------------
def print_header(case: Case, rounds: int) -> None:
    packages = ("torch", "transformers", "transformer-lens", "mitk")
    print(" ".join(f"{p} {version(p)}" for p in packages))
    print(f"case: {case.name} {asdict(case)}")
    print(f"threads: {torch.get_num_threads()}  rounds: {rounds}  cpu_count: {os.cpu_count()}")


def print_results(
    times: dict[str, list[float]], diffs: dict[str, float], ratios: list[dict[str, Any]]
) -> None:
    print(f"\n{'contender':<22} {'best s':>9} {'median s':>9} {'max|Δlogit|':>12}")
    for name, samples in times.items():
        print(
            f"{name:<22} {min(samples):>9.4f} {statistics.median(samples):>9.4f} "
            f"{diffs[name]:>12.1e}"
        )
    print(f"\n{'ratio (best times)':<44} {'value':>7} {'target':>8}  status")
    for row in ratios:  # rows without a target are shown for information
        target = "" if row["target"] is None else f"{row['target']:.2f}x"
        status = "" if row["met"] is None else ("met" if row["met"] else "MISSED")
        print(f"{row['ratio']:<44} {row['value']:>6.3f}x {target:>8}  {status}")


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=None, help="timed calls per contender")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--quick", action="store_true", help="tiny shapes, for a smoke run")
    parser.add_argument("--json", type=Path, default=None, help="also write results here")
    args = parser.parse_args(argv)

    case = QUICK if args.quick else FULL
    rounds = args.rounds if args.rounds is not None else (2 if args.quick else 5)
    torch.set_num_threads(args.threads)
    print_header(case, rounds)

    generator = torch.Generator().manual_seed(SEED)
    tokens = torch.randint(0, case.d_vocab, (case.batch, case.seq), generator=generator)
    with tempfile.TemporaryDirectory(prefix="mitk-bench-") as tmp:
        save_checkpoint(case, Path(tmp))
        contenders = build_contenders(Path(tmp), tokens)
        diffs = warm_up_and_check(contenders, PARITY_ATOL)

        load_before = loadavg()
        print(f"loadavg before: {load_before}")
        times = time_rounds(contenders, rounds)
        load_after = loadavg()
        print(f"loadavg after:  {load_after}")

    best = {name: min(samples) for name, samples in times.items()}
    ratios = ratio_rows(best)
    print_results(times, diffs, ratios)
    if args.json is not None:
        result = {
            "case": asdict(case),
            "threads": torch.get_num_threads(),
            "rounds": rounds,
            "loadavg_before": load_before,
            "loadavg_after": load_after,
            "max_abs_logit_diff": diffs,
            "times_s": times,
            "best_s": best,
            "median_s": {name: statistics.median(s) for name, s in times.items()},
            "ratios": ratios,
        }
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
