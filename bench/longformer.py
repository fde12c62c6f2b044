"""Longformer encoder benchmark on a CPU: mitk's banded attention against Hugging Face's.

A random-weight ``LongformerModel`` with longformer-base's layer shape (d_model 768, 12
heads, MLP 3072, ``attention_window`` 512) but 2 layers and a 1000-token vocabulary; fp32,
one sequence of ``--tokens`` tokens (4096 by default, longformer-base's context) with
4 global tokens. Contenders:

- ``mitk banded``: ``model(tokens, global_attention_mask=..., return_type="hidden")``,
  the fused path: chunks of queries, each one SDPA call over the keys around it and the
  global keys, the global rows one more (``mitk.model.banded_attention``);
- ``HF``: ``LongformerModel(tokens, global_attention_mask=...)``, its chunked
  sliding-window matmuls (``_sliding_chunks_query_key_matmul``);
- ``mitk eager`` (for information, ``--eager``): the explicit path that a pattern hook
  forces, which builds ``[batch, head, pos, pos]`` scores and pattern.

Hidden states are checked against HF's first; contenders are interleaved in a shuffled
order each round and the best of ``--rounds`` is compared (timing helpers shared with
``bench/forward.py``). Memory: the peak resident memory a call adds over what the process
held before it (as ``bench/ssm_scan.py`` measures it, glibc's mmap threshold pinned).

Run::

    python bench/longformer.py --threads 1
    python bench/longformer.py --tokens 16384 --threads 1 --rounds 2
    python bench/longformer.py --quick      # a tiny model, for a smoke run
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

# bench/ is the script's directory, so its siblings import as modules; forward sets the
# offline environment variables before transformers is imported
from forward import Contender, loadavg, no_network, time_rounds
from ssm_scan import MMAP_THRESHOLD, added_peak_bytes
import torch

from mitk import HookedTransformer

PARITY_ATOL = 1e-3
GLOBALS = 4


def build(quick: bool, tokens: int) -> Any:
    """The random Hugging Face model (longformer-base's layer shape unless ``quick``)."""
    from transformers import LongformerConfig, LongformerModel

    torch.manual_seed(0)
    width, heads, window = (64, 4, 16) if quick else (768, 12, 512)
    config = LongformerConfig(
        vocab_size=1000,
        hidden_size=width,
        num_hidden_layers=2,
        num_attention_heads=heads,
        intermediate_size=4 * width,
        max_position_embeddings=tokens + 2,  # RoBERTa's positions start at pad_token_id + 1
        attention_window=window,
    )
    return LongformerModel(config).eval()


def contenders_for(hf: Any, tokens: torch.Tensor, eager: bool) -> list[Contender]:
    model = HookedTransformer.from_pretrained(hf)
    glob = torch.zeros_like(tokens)
    glob[:, :GLOBALS] = 1

    def banded() -> torch.Tensor:
        return model(tokens, global_attention_mask=glob, return_type="hidden")

    def explicit() -> torch.Tensor:
        with model.backend("eager"):
            return model(tokens, global_attention_mask=glob, return_type="hidden")

    def reference() -> torch.Tensor:
        return hf(tokens, global_attention_mask=glob).last_hidden_state

    found = [("mitk banded", banded), ("HF", reference)]
    return [*found, ("mitk eager", explicit)] if eager else found


def check(contenders: list[Contender]) -> dict[str, float]:
    """Max |difference| of each contender's hidden states from HF's; exits past the tolerance."""
    with torch.inference_mode():
        outputs = {name: run() for name, run in contenders}
    diffs = {name: float((out - outputs["HF"]).abs().max()) for name, out in outputs.items()}
    for name, diff in diffs.items():
        if diff > PARITY_ATOL:
            raise SystemExit(f"{name}: hidden states differ from HF's by {diff:.2e}")
    return diffs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--rounds", type=int, default=3, help="timed calls per contender")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--quick", action="store_true", help="a tiny model, for a smoke run")
    parser.add_argument("--eager", action="store_true", help="also time the dense explicit path")
    args = parser.parse_args(argv)
    n = 256 if args.quick else args.tokens
    torch.set_num_threads(args.threads)
    print(f"tokens: {n}; rounds: {args.rounds}; threads: {args.threads}; torch {torch.__version__}")
    with no_network():
        tokens = torch.randint(3, 1000, (1, n), generator=torch.Generator().manual_seed(1))
        contenders = contenders_for(build(args.quick, n), tokens, args.eager)
        diffs = check(contenders)
        print(f"loadavg before: {loadavg()}")
        start = time.perf_counter()
        times = time_rounds(contenders, args.rounds)
        memory = {name: added_peak_bytes(run) for name, run in contenders}
        print(f"loadavg after: {loadavg()} ({time.perf_counter() - start:.0f} s)")
    print(f"\n{'contender':<14} {'best s':>8} {'worst s':>8} {'added peak MiB':>15} {'max|Δ|':>9}")
    for name, samples in times.items():
        print(f"{name:<14} {min(samples):>8.3f} {max(samples):>8.3f} "
              f"{memory[name] / 2**20:>15.1f} {diffs[name]:>9.1e}")  # fmt: skip
    ratio = min(times["mitk banded"]) / min(times["HF"])
    print(f"\nmitk banded / HF (best time): {ratio:.3f}x; (added peak memory): "
          f"{memory['mitk banded'] / max(memory['HF'], 1):.3f}x")  # fmt: skip
    return 0


if __name__ == "__main__":
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") != MMAP_THRESHOLD:  # before any allocation
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": MMAP_THRESHOLD}
        os.execve(sys.executable, [sys.executable, *sys.argv], env)
    raise SystemExit(main())
