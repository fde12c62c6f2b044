"""GPU-readiness check: fused attention kernels, one explicit layer per hook, bf16 error, timings.

On two random-weight models, each saved once as a Hugging Face checkpoint (the builders
of ``bench/long_context.py``): GPT-2-small-shaped (12 layers, d_model 768, 12 heads,
vocab 50257) and LLaMA-shaped (8 layers, d_model 1024, 16 query heads over 4 key-value
heads, SwiGLU 2816, vocab 32000, RMSNorm, rotary). Per model:

1. paths, at each half/low precision the device runs (CUDA: float16 and bfloat16; CPU:
   float32 and bfloat16), read from ``model.attention_paths()`` and ``torch.profiler``:
   - unhooked: every layer ``"sdpa"``, one fused SDPA op per layer (FlashAttention,
     memory-efficient or cuDNN; no math fallback, no softmax) and, on CUDA, fused kernels;
   - restricted with ``torch.nn.attention.sdpa_kernel`` to FlashAttention and
     memory-efficient: still fused in every layer (mitk's inputs qualify for them);
   - ``blocks.0.attn.hook_pattern`` hooked: layer 0 alone ``"eager: ..."``, one softmax,
     one fused op per other layer (CUDA: a softmax kernel too);
2. precision: bfloat16 log-probs against fp64, fused and explicit path, within the
   bound of ``tests/parity/test_precision.py`` (at most ``SLACK`` times Hugging Face's
   own bf16 error plus a floor of ``FLOOR_EPS`` epsilons; ``tests/gpu/readiness.py``);
3. timing: ``mitk fused``, ``mitk eager`` (every layer explicit), ``HF sdpa``
   (``AutoModelForCausalLM``, ``use_cache=False``) and ``TL HookedTransformer``
   (skipped if transformer-lens is not installed), batch 8 x 1024 in bfloat16 on CUDA.
   Outputs are checked against ``mitk fused``'s first; then contenders are interleaved
   round by round in shuffled order and the best time of ``--rounds`` is compared (as in
   ``bench/forward.py``), with ``torch.cuda.synchronize()`` closing every timed call.

Without CUDA, everything but the CUDA kernels runs on the CPU (timings in float32 at a
CPU-sized batch) and the output says the GPU part was skipped. Any failed check makes
the exit status 1; timings are reported, not judged.

Run::

    python bench/gpu_check.py               # CUDA if present: ~5 minutes on an H100
    python bench/gpu_check.py --quick       # tiny shapes: a smoke run (CPU: under 2 minutes)
    python bench/gpu_check.py --device cpu --rounds 5 --json results.json
"""

from __future__ import annotations

import argparse
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from importlib.metadata import PackageNotFoundError, version
import importlib.util
import json
import os
from pathlib import Path
import statistics
import sys
import tempfile
from typing import Any

import torch
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

# forward.py and long_context.py set the hub-offline environment before transformers loads;
# the repository root is on the path for tests.gpu.readiness (and the bound it imports)
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from forward import PARITY_ATOL, loadavg, no_network
from long_context import CASES, QUICK_CASES, Case, case_tokens, save_checkpoint, time_rounds
from long_context import tl_model as tl_cpu_model

from mitk import HookedTransformer
from tests.gpu.readiness import (
    FUSED_KERNELS,
    AttentionRun,
    log_prob_precision,
    profile_attention,
)

PATTERN_HOOK = "blocks.0.attn.hook_pattern"
REFERENCE = "mitk fused"
TL = "TL HookedTransformer"
# In low precision other implementations' logits differ from mitk's by rounding (relative
# RMS difference about 1e-2), a different function (a missing layer, a wrong weight) by
# about the logits' own size: the check is on the relative RMS difference
LOW_PRECISION_REL_RMS = 0.05
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def cases(quick: bool, cuda: bool) -> list[Case]:
    """The GPT-2-small and LLaMA shapes; batch 8 x 1024 on CUDA, CPU-sized otherwise."""
    if quick:
        return [replace(QUICK_CASES["long"], name="gpt2-tiny 2x64", seq=64, batch=2),
                replace(QUICK_CASES["llama"], name="llama-tiny 2x64", seq=64)]  # fmt: skip
    batch, seq = (8, 1024) if cuda else (2, 256)
    gpt2 = replace(CASES["long"], name=f"gpt2-small {batch}x{seq}", batch=batch, seq=seq)
    llama = replace(CASES["llama"], name=f"llama-gqa {batch}x{seq}", batch=batch, seq=seq)
    return [gpt2, llama]


@dataclass(frozen=True)
class Check:
    """One pass/fail line of the report."""

    case: str
    name: str
    ok: bool
    detail: str


# --- paths --------------------------------------------------------------------------------
def describe(run: AttentionRun) -> str:
    fused = ", ".join(f"{kind} x{n}" for kind, n in sorted(run.fused.items())) or "none"
    text = f"fused SDPA ops: {fused}; math fallback x{run.math}; explicit softmax x{run.explicit}"
    if run.kernels:
        kernels = run.kernels_of(*FUSED_KERNELS, "softmax")
        if not kernels:  # none recognised: show the busiest, so the names can be read
            text += "\n      no attention kernel recognised; most launched:"
            kernels = Counter(dict(run.kernels.most_common(5)))
        shown = "; ".join(f"{name[:70]} x{n}" for name, n in sorted(kernels.items()))
        text += f"\n      CUDA kernels: {shown}"
    return text


def path_checks(case: Case, model: Any, tokens: Tensor, dtype: str, cuda: bool) -> list[Check]:
    """Unhooked, restricted to flash/mem-efficient, and layer-0-pattern-hooked forwards."""
    n_layers, device = model.cfg.n_layers, model.W_E.device
    checks = []

    run = profile_attention(lambda: model(tokens), device)
    paths = model.attention_paths()
    ok = paths == ["sdpa"] * n_layers and sum(run.fused.values()) == n_layers
    ok = ok and run.math == 0 and run.explicit == 0
    if cuda:
        ok = ok and sum(run.kernels_of(*FUSED_KERNELS).values()) >= n_layers
    detail = f"paths: {summarise(paths)}\n      {describe(run)}"
    checks.append(Check(case.name, f"{dtype} unhooked: fused in every layer", ok, detail))

    name = f"{dtype} restricted to flash/mem-efficient: still fused"
    try:
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]):
            run = profile_attention(lambda: model(tokens), device)
    except RuntimeError as err:  # SDPA raises when no allowed kernel accepts the inputs
        checks.append(Check(case.name, name, False, f"{type(err).__name__}: {err}"[:500]))
    else:
        ok = set(run.fused) <= {"flash", "flash (CPU)", "mem-efficient"}
        ok = ok and sum(run.fused.values()) == n_layers and run.math == 0
        if cuda:
            ok = ok and sum(run.kernels_of("flash", "mem-efficient").values()) >= n_layers
        checks.append(Check(case.name, name, ok, describe(run)))

    with model.hooks(fwd_hooks=[(PATTERN_HOOK, lambda pattern, hook: None)]):
        run = profile_attention(lambda: model(tokens), device)
    paths = model.attention_paths()
    ok = paths[0].startswith(f"eager: hooked {PATTERN_HOOK}") and paths[1:] == ["sdpa"] * (
        n_layers - 1
    )
    ok = ok and sum(run.fused.values()) == n_layers - 1 and run.math == 0 and run.explicit == 1
    if cuda:
        ok = ok and sum(run.kernels_of(*FUSED_KERNELS).values()) >= n_layers - 1
        ok = ok and bool(run.kernels_of("softmax"))
    detail = f"paths: {summarise(paths)}\n      {describe(run)}"
    checks.append(Check(case.name, f"{dtype} {PATTERN_HOOK} hooked: layer 0 only", ok, detail))
    return checks


def summarise(paths: list[str]) -> str:
    """``['eager: ...', 'sdpa' x11]``: runs of equal paths collapsed."""
    runs: list[list[Any]] = []
    for path in paths:
        if runs and runs[-1][0] == path:
            runs[-1][1] += 1
        else:
            runs.append([path, 1])
    return ", ".join(f"{path!r}" + (f" x{n}" if n > 1 else "") for path, n in runs)


def precision_checks(case: Case, directory: Path, tokens: Tensor, device: str) -> list[Check]:
    checks = []
    for result in log_prob_precision(directory, tokens, torch.bfloat16, device):
        path = "fused" if result.backend == "auto" else "explicit"
        detail = (
            f"max|Δ log-prob| vs fp64: mitk {result.mitk_error:.3e}  HF {result.hf_error:.3e}"
            f"  bound {result.bound:.3e}  (mitk fp64 vs HF fp64 {result.fp64_gap:.1e})"
        )
        name = f"bfloat16 log-probs ({path} path) within the precision bound"
        checks.append(Check(case.name, name, result.ok, detail))
    return checks


# --- timing -------------------------------------------------------------------------------
def synced(run: Callable[[], Any], cuda: bool) -> Callable[[], Any]:
    """``run`` that returns only once the device has finished its work."""
    if not cuda:
        return run

    def call() -> Any:
        output = run()
        torch.cuda.synchronize()
        return output

    return call


def contenders(
    directory: Path, mitk_model: Any, tokens: Tensor, dtype: torch.dtype, device: str
) -> dict[str, Callable[[], Any]]:
    from transformers import AutoModelForCausalLM

    def eager() -> Tensor:
        with mitk_model.backend("eager"):
            return mitk_model(tokens)

    with no_network():
        hf = AutoModelForCausalLM.from_pretrained(
            directory, attn_implementation="sdpa", dtype=dtype
        )
        hf = hf.to(device).eval()
        runs = {
            REFERENCE: lambda: mitk_model(tokens),
            "mitk eager": eager,
            "HF sdpa": lambda: hf(tokens, use_cache=False).logits,
        }
        if importlib.util.find_spec("transformer_lens") is None:
            print(f"{TL}: skipped, transformer-lens is not installed")
        else:
            tl = tl_cpu_model(directory).to(torch.device(device), print_details=False)
            tl = tl.to(dtype, print_details=False)
            runs[TL] = lambda: tl(tokens)
    return {name: synced(run, device == "cuda") for name, run in runs.items()}


def check_outputs(case: Case, runs: dict[str, Callable[[], Any]], dtype: torch.dtype) -> Check:
    """Each contender's first (warm-up) call, its logits against ``mitk fused``'s."""
    max_abs, rel_rms = {}, {}
    with torch.inference_mode():
        reference = runs[REFERENCE]().float()
        for name, run in runs.items():
            delta = run().float() - reference
            max_abs[name] = float(delta.abs().max())
            rel_rms[name] = float(delta.norm() / reference.norm())
    if dtype == torch.float32:
        ok, rule = max(max_abs.values()) <= PARITY_ATOL, f"max|Δ| <= {PARITY_ATOL:.0e}"
    else:
        ok = max(rel_rms.values()) <= LOW_PRECISION_REL_RMS
        rule = f"relative RMS Δ <= {LOW_PRECISION_REL_RMS}"
    detail = "; ".join(
        f"{name}: max|Δ| {max_abs[name]:.1e}, rel. RMS {rel_rms[name]:.1e}" for name in runs
    )
    return Check(case.name, f"contenders' logits match mitk fused ({rule})", ok, detail)


def print_times(times: dict[str, list[float]]) -> list[dict[str, Any]]:
    best = {name: min(samples) for name, samples in times.items()}
    print(f"\n    {'contender':<22} {'best ms':>9} {'median ms':>10} {'vs mitk fused':>14}")
    for name, samples in times.items():
        print(
            f"    {name:<22} {best[name] * 1e3:>9.2f} {statistics.median(samples) * 1e3:>10.2f}"
            f" {best[name] / best[REFERENCE]:>13.2f}x"
        )
    rows = []
    for other in ("HF sdpa", TL, "mitk eager"):
        if other in best:
            rows.append({"ratio": f"{REFERENCE} / {other}", "value": best[REFERENCE] / best[other]})
    print(f"\n    {'ratio (best times)':<40} {'value':>7}")
    for row in rows:
        print(f"    {row['ratio']:<40} {row['value']:>6.3f}x")
    return rows


# --- one case -----------------------------------------------------------------------------
def run_case(case: Case, device: str, quick: bool, rounds: int) -> dict[str, Any]:
    cuda = device == "cuda"
    path_dtypes = ("float16", "bfloat16") if cuda else ("float32", "bfloat16")
    time_dtype = "bfloat16" if cuda else "float32"
    tokens = case_tokens(case).to(device)
    profile_tokens = tokens[:2]
    precision_tokens = tokens[:2, : (32 if quick else 128)]
    print(f"\n=== case: {case.name} {asdict(case)}")
    checks: list[Check] = []
    # the directory name must not contain "llama": TL would then skip reading its config
    with tempfile.TemporaryDirectory(prefix="mitk-bench-") as tmp:
        directory = Path(tmp)
        save_checkpoint(case, directory)
        models = {}
        for dtype in dict.fromkeys((*path_dtypes, time_dtype)):
            models[dtype] = HookedTransformer.from_pretrained(
                directory, dtype=DTYPES[dtype], device=device
            )
        for dtype in path_dtypes:
            checks += report(path_checks(case, models[dtype], profile_tokens, dtype, cuda))
        checks += report(precision_checks(case, directory, precision_tokens, device))

        print(f"\n  timing ({time_dtype}, {device}, batch {case.batch} x {case.seq}):")
        runs = contenders(directory, models[time_dtype], tokens, DTYPES[time_dtype], device)
        checks += report([check_outputs(case, runs, DTYPES[time_dtype])])
        load_before = loadavg()
        print(f"    loadavg before timing: {load_before}")
        times = time_rounds(runs, rounds)
        load_after = loadavg()
        print(f"    loadavg after timing:  {load_after}")
    ratios = print_times(times)
    return {
        "case": asdict(case),
        "checks": [asdict(check) for check in checks],
        "timing_dtype": time_dtype,
        "loadavg_before": load_before,
        "loadavg_after": load_after,
        "times_s": times,
        "ratios": ratios,
    }


def report(checks: list[Check]) -> list[Check]:
    for check in checks:
        print(f"  [{'PASS' if check.ok else 'FAIL'}] {check.name}\n      {check.detail}")
    return checks


def print_header(device: str, rounds: int) -> None:
    names = []
    for package in ("torch", "transformers", "transformer-lens", "mitk"):
        try:
            names.append(f"{package} {version(package)}")
        except PackageNotFoundError:
            names.append(f"{package} (not installed)")
    print(" ".join(names))
    if device == "cuda":
        properties = torch.cuda.get_device_properties(0)
        print(f"device: {properties.name} (sm_{properties.major}{properties.minor}), CUDA")
    else:
        print(f"device: CPU, threads {torch.get_num_threads()}, cpu_count {os.cpu_count()}")
    print(f"rounds: {rounds}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    parser.add_argument("--device", choices=["cuda", "cpu"], default=default_device)
    parser.add_argument("--quick", action="store_true", help="tiny shapes, for a smoke run")
    parser.add_argument("--rounds", type=int, default=None, help="timed calls per contender")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--json", type=Path, default=None, help="also write results here")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")

    cuda = args.device == "cuda"
    rounds = args.rounds if args.rounds is not None else (2 if args.quick else 10 if cuda else 3)
    torch.set_num_threads(args.threads)
    print_header(args.device, rounds)
    skipped = None
    if not cuda:
        why = "no CUDA device" if not torch.cuda.is_available() else "--device cpu"
        skipped = f"GPU part skipped: {why}"
        print(f"{skipped} (CUDA kernel names, float16 paths and batch 8 x 1024 timings)")
    results = [run_case(case, args.device, args.quick, rounds) for case in cases(args.quick, cuda)]

    checks = [check for result in results for check in result["checks"]]
    failed = [f"{c['case']}: {c['name']}" for c in checks if not c["ok"]]
    print(f"\n{len(checks) - len(failed)}/{len(checks)} checks passed on {args.device}")
    for line in failed:
        print(f"  FAILED {line}")
    if skipped:
        print(skipped)
    if args.json is not None:
        args.json.write_text(json.dumps({"device": args.device, "cases": results}, indent=2))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
