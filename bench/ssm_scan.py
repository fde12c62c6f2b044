"""Mamba and RWKV forward benchmark on a CPU: mitk's chunked scans against Hugging Face's CPU path.

``--family mamba2`` runs the same comparison on a Mamba-2 model of the same width (24
heads of 64 channels, d_state 128, one group), whose HF CPU path is its own chunked
(state-space-duality) PyTorch scan, ``mamba2_chunk_scan`` in chunks of the config's 256
positions; mitk's is ``mitk.model.ssm.ssd.ssd_scan`` (chunks of 64). Two more contenders
time that scan alone on layer 0's ``x``, ``dt``, ``B`` and ``C``: ``mitk ssd scan`` and
``HF ssd scan`` (outputs checked against each other).

The model is a random-weight ``MambaForCausalLM`` with mamba-130m's layer shape (d_model
768, d_inner 1536, d_state 16, conv 4, dt rank 48) but 4 layers and a 4096-token
vocabulary, so the time goes to the mixers rather than the unembedding; fp32, one
sequence of 2048 tokens. Contenders:

- ``mitk chunked``: ``HookedTransformer.from_pretrained(hf_model)(tokens)`` (the chunked
  scan: per chunk of positions, cumulative sums; no per-token Python loop);
- ``mitk state-hooked``: ``run_with_cache`` of every layer's ``hook_ssm_state`` (the
  sequential path that keeps ``[batch, pos, d_inner, d_state]`` states; for information);
- ``HF``: ``MambaForCausalLM(tokens, use_cache=False)``. Without the CUDA kernels
  (``mamba_ssm``, ``causal_conv1d``) transformers runs its PyTorch fallback: the decays and
  inputs of every position at once, then a Python loop over positions.

``--family rwkv`` runs it on an RWKV-4 model with rwkv-4-169m's layer shape (d_model 768,
time mixing 768, channel mixing 3072) but 4 layers; HF's CPU path (``RwkvForCausalLM(tokens,
use_cache=False)``, no CUDA kernel) runs its WKV recurrence as ``rwkv_linear_attention_cpu``,
a loop over positions, and mitk's as ``mitk.model.rwkv.wkv`` (chunks of about ``sqrt(pos)``
positions). Two more contenders time the WKV recurrence alone on layer 0's keys and values:
``mitk wkv scan`` (``chunked_wkv``) and ``HF wkv scan``
(``rwkv_linear_attention_cpu``); their outputs are checked against each other.

Logits are checked against ``mitk chunked``'s first; contenders are interleaved in a
shuffled order each round and the best of ``--rounds`` is compared (timing helpers shared
with ``bench/forward.py``). Memory: the peak resident memory a call adds over what the
process held before it (``/proc/self/clear_refs`` resets the kernel's peak mark; glibc's
mmap threshold is pinned, by re-executing with ``MALLOC_MMAP_THRESHOLD_``, so freed
tensors go back to the system between calls). Target: ``mitk chunked / HF`` time <= 1.0x.

Run::

    python bench/ssm_scan.py                  # 2048 tokens, 3 rounds (a minute or two)
    python bench/ssm_scan.py --quick          # a tiny model, for a smoke run
    python bench/ssm_scan.py --rounds 5 --threads 2
    python bench/ssm_scan.py --family rwkv --threads 1
    python bench/ssm_scan.py --family mamba2 --threads 1 --rounds 5 --no-state-hooked
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
import gc
import os
from pathlib import Path
import sys
import time
from typing import Any

# bench/ is the script's directory, so its sibling imports as a module; it also sets the
# offline environment variables before transformers is imported
from forward import Contender, loadavg, logits_of, no_network, time_rounds
import torch

SEED = 0
PARITY_ATOL = 1e-3
TARGET = 1.0  # mitk chunked / HF, best times
MMAP_THRESHOLD = "65536"


@dataclass(frozen=True)
class Case:
    name: str
    n_layers: int
    d_model: int
    d_state: int
    d_vocab: int
    seq: int


FULL = Case("mamba-130m layers x4, 1x2048", 4, 768, 16, 4096, 2048)
QUICK = Case("tiny 1x256", 2, 64, 8, 256, 256)
FULL2 = Case("mamba2 d768 x4 (24 heads x 64, d_state 128), 1x2048", 4, 768, 128, 4096, 2048)
QUICK2 = Case("mamba2 tiny 1x256", 2, 64, 16, 256, 256)
FULL_RWKV = Case("rwkv-4-169m layers x4, 1x2048", 4, 768, 0, 4096, 2048)
QUICK_RWKV = Case("rwkv tiny 1x256", 2, 64, 0, 256, 256)
SCAN_PAIRS = {"rwkv": ("mitk wkv scan", "HF wkv scan"), "mamba2": ("mitk ssd scan", "HF ssd scan")}
"""Per family, the contenders that time the recurrence alone: mitk's (the reference its
peer's output is checked against) and Hugging Face's."""


def hf_model(case: Case, family: str) -> Any:
    from transformers import Mamba2Config, Mamba2ForCausalLM, MambaConfig, MambaForCausalLM

    torch.manual_seed(SEED)
    if family == "rwkv":
        from transformers import RwkvConfig, RwkvForCausalLM

        config = RwkvConfig(
            vocab_size=case.d_vocab, hidden_size=case.d_model, num_hidden_layers=case.n_layers,
            context_length=case.seq,
        )  # fmt: skip
        return RwkvForCausalLM(config).eval()
    sizes = {
        "vocab_size": case.d_vocab,
        "hidden_size": case.d_model,
        "state_size": case.d_state,
        "num_hidden_layers": case.n_layers,
    }
    if family == "mamba2":
        heads = 2 * case.d_model // 64
        config = Mamba2Config(**sizes, num_heads=heads, head_dim=64, n_groups=1)
        return Mamba2ForCausalLM(config).eval()
    return MambaForCausalLM(MambaConfig(**sizes)).eval()


def contenders_for(case: Case, family: str, with_states: bool = True) -> list[Contender]:
    import mitk

    hf = hf_model(case, family)
    model = mitk.HookedTransformer.from_pretrained(hf).eval()
    tokens = torch.randint(
        0, case.d_vocab, (1, case.seq), generator=torch.Generator().manual_seed(SEED)
    )

    state = "hook_wkv_state" if family == "rwkv" else "hook_ssm_state"

    def state_hooked() -> Any:
        return model.run_with_cache(tokens, names_filter=lambda n: n.endswith(state))

    contenders: list[Contender] = [
        ("mitk chunked", lambda: model(tokens)),
        *([("mitk state-hooked", state_hooked)] if with_states else []),
        ("HF", lambda: hf(tokens, use_cache=False)),
    ]
    if family == "rwkv":
        contenders += wkv_contenders(hf, model, tokens)
    elif family == "mamba2":
        contenders += ssd_contenders(hf, model, tokens)
    return contenders


def wkv_contenders(hf: Any, model: Any, tokens: torch.Tensor) -> list[Contender]:
    """The WKV recurrence alone, mitk's and HF's, on layer 0's keys and values."""
    from transformers.models.rwkv.modeling_rwkv import rwkv_linear_attention_cpu

    from mitk.model.rwkv import chunked_wkv

    with torch.inference_mode():
        _, cache = model.run_with_cache(tokens, names_filter=["blocks.0.mixer.hook_k",
                                                              "blocks.0.mixer.hook_v"])  # fmt: skip
    k, v = cache["blocks.0.mixer.hook_k"].clone(), cache["blocks.0.mixer.hook_v"].clone()
    attention = hf.rwkv.blocks[0].attention
    decay, first = attention.time_decay.detach(), attention.time_first.detach()
    w = decay.exp()

    def mitk_scan() -> torch.Tensor:
        return chunked_wkv(k, v, w, first)[0]

    return [
        (SCAN_PAIRS["rwkv"][0], mitk_scan),
        (SCAN_PAIRS["rwkv"][1], lambda: rwkv_linear_attention_cpu(decay, first, k, v)[0]),
    ]


def ssd_contenders(hf: Any, model: Any, tokens: torch.Tensor) -> list[Contender]:
    """The Mamba-2 scan alone, mitk's and HF's, on layer 0's ``x``, ``dt``, ``B`` and ``C``
    (no initial state; the last state returned by both)."""
    from transformers.models.mamba2.modeling_mamba2 import mamba2_chunk_scan

    from mitk.model.ssm.ssd import ssd_scan

    ssm = model.cfg.ssm
    names = [f"blocks.0.mixer.hook_{site}" for site in ("conv", "dt", "B", "C")]
    with torch.inference_mode():
        _, cache = model.run_with_cache(tokens, names_filter=names)
    conv, dt, B, C = (cache[name].clone() for name in names)
    x = conv[..., : ssm.d_inner].unflatten(-1, (ssm.n_heads, -1)).contiguous()
    mixer = hf.backbone.layers[0].mixer
    A, chunk = -mixer.A_log.detach().exp(), mixer.chunk_size

    def hf_scan() -> torch.Tensor:
        return mamba2_chunk_scan(x, dt, A, B, C, chunk, return_final_states=True)[0]

    return [
        (SCAN_PAIRS["mamba2"][0], lambda: ssd_scan(x, dt, A, B, C, None)[0]),
        (SCAN_PAIRS["mamba2"][1], hf_scan),
    ]


def check_logits(contenders: list[Contender]) -> dict[str, float]:
    """One (warm-up) call each; exits if any logits differ from ``mitk chunked``'s by more
    than ``PARITY_ATOL``. A scan's outputs are compared with the mitk scan's of its pair in
    ``SCAN_PAIRS``, relative to their largest magnitude (Mamba-2's run to ~1e3)."""
    with torch.inference_mode():
        outputs = {name: logits_of(run()).float() for name, run in contenders}
    scans = {name: mine for mine, peer in SCAN_PAIRS.values() for name in (mine, peer)}

    def diff(name: str, out: torch.Tensor) -> float:
        reference = outputs[scans.get(name, "mitk chunked")]
        scale = reference.abs().max().item() if name in scans else 1.0
        return (out - reference).abs().max().item() / max(scale, 1.0)

    diffs = {name: diff(name, out) for name, out in outputs.items()}
    for name, d in diffs.items():
        if d > PARITY_ATOL:
            raise SystemExit(f"{name}: outputs differ from the reference's by {d:.2e}")
    return diffs


def _status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def added_peak_bytes(run: Any) -> int:
    """Peak resident memory one call adds over what the process held before it."""
    gc.collect()
    before = _status_bytes("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # the peak mark := the current RSS
    with torch.inference_mode():
        out = run()
    peak = _status_bytes("VmHWM")
    del out
    return peak - before


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=None, help="timed calls per contender")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--quick", action="store_true", help="a tiny model, for a smoke run")
    parser.add_argument("--family", choices=("mamba", "mamba2", "rwkv"), default="mamba")
    parser.add_argument(
        "--no-state-hooked",
        action="store_true",
        help="leave out 'mitk state-hooked' (Mamba-2's every-position states: ~9 GiB, ~30 s)",
    )
    args = parser.parse_args(argv)
    cases = {"mamba": (QUICK, FULL), "mamba2": (QUICK2, FULL2), "rwkv": (QUICK_RWKV, FULL_RWKV)}
    case = cases[args.family][0 if args.quick else 1]
    rounds = args.rounds if args.rounds is not None else (2 if args.quick else 3)
    torch.set_num_threads(args.threads)
    print(f"case: {case.name}; rounds: {rounds}; threads: {args.threads}; "
          f"torch {torch.__version__}")  # fmt: skip
    with no_network():
        contenders = contenders_for(case, args.family, not args.no_state_hooked)
        diffs = check_logits(contenders)
        print(f"loadavg before: {loadavg()}")
        start = time.perf_counter()
        times = time_rounds(contenders, rounds)
        memory = {name: added_peak_bytes(run) for name, run in contenders}
        print(f"loadavg after: {loadavg()} ({time.perf_counter() - start:.0f} s)")
    header = f"{'contender':<20} {'best s':>8} {'worst s':>8} {'added peak MiB':>15}"
    print(f"\n{header} {'max|Δlogit|':>12}")
    for name, samples in times.items():
        print(f"{name:<20} {min(samples):>8.3f} {max(samples):>8.3f} "
              f"{memory[name] / 2**20:>15.1f} {diffs[name]:>12.1e}")  # fmt: skip
    ratio = min(times["mitk chunked"]) / min(times["HF"])
    status = "met" if ratio <= TARGET else "MISSED"
    print(f"\nmitk chunked / HF (time): {ratio:.3f}x  target <= {TARGET:.2f}x  {status}")
    memory_ratio = memory["mitk chunked"] / max(memory["HF"], 1)
    print(f"mitk chunked / HF (added peak memory): {memory_ratio:.3f}x")
    mine, peer = SCAN_PAIRS.get(args.family, ("", ""))
    if mine in times:
        scan = min(times[mine]) / min(times[peer])
        print(f"{mine} / {peer} (time): {scan:.3f}x  target <= {TARGET:.2f}x  "
              f"{'met' if scan <= TARGET else 'MISSED'}")  # fmt: skip
        scan_memory = memory[mine] / max(memory[peer], 1)
        print(f"{mine} / {peer} (added peak memory): {scan_memory:.3f}x")
    return 0


if __name__ == "__main__":
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") != MMAP_THRESHOLD:  # before any allocation
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": MMAP_THRESHOLD}
        os.execve(sys.executable, [sys.executable, *sys.argv], env)
    raise SystemExit(main())
