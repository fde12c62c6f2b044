"""Which attention kernels a forward ran (from ``torch.profiler``) and its low-precision error.

Shared by ``tests/gpu/test_cuda_paths.py`` and ``bench/gpu_check.py``. The profiler records
every aten op on the CPU side and, with ``ProfilerActivity.CUDA``, every kernel launched
on the GPU. ``F.scaled_dot_product_attention`` shows up as ``aten::scaled_dot_product_attention``
followed by the backend it picked: a fused op (FlashAttention, memory-efficient, cuDNN; on
the CPU, ``_scaled_dot_product_flash_attention_for_cpu``) or the unfused math fallback. mitk's
explicit path calls ``torch.softmax`` once per layer; nothing else in a forward does, so
``aten::softmax`` counts explicit layers (the math fallback also calls it, and is counted
apart).

The precision bound is the one ``tests/parity/test_precision.py`` applies: mitk's error
against its own fp64 run is at most ``SLACK`` times Hugging Face's error against HF's fp64
run, plus ``FLOOR_EPS`` units of the dtype's epsilon times the log-probs' magnitude.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from mitk import HookedTransformer
from tests.parity.test_precision import FLOOR_EPS, SLACK

# aten ops SDPA dispatches to when it runs a fused kernel, by backend
FUSED_OPS = {
    "aten::_scaled_dot_product_flash_attention": "flash",
    "aten::_scaled_dot_product_flash_attention_for_cpu": "flash (CPU)",
    "aten::_scaled_dot_product_efficient_attention": "mem-efficient",
    "aten::_scaled_dot_product_cudnn_attention": "cudnn",
}
MATH_OP = "aten::_scaled_dot_product_attention_math"  # SDPA's unfused fallback
SOFTMAX_OP = "aten::softmax"
# GPU kernel kinds, by substrings of the (lower-cased) kernel name, first match wins:
# cuDNN's "cudnn_generated_fort_native_sdpa_..._flash_fprop..." before FlashAttention's
# "pytorch_flash::flash_fwd_kernel", then the memory-efficient "fmha_cutlassF_..."
# ("PyTorchMemEffAttention::AttentionKernel"), then softmax ("softmax_warp_forward",
# "cunn_SoftMaxForward").
KERNEL_KINDS = (
    ("cudnn", ("cudnn", "fort_native_sdpa")),
    ("flash", ("flash",)),
    ("mem-efficient", ("fmha", "memeff", "efficient_attention")),
    ("softmax", ("softmax",)),
)
FUSED_KERNELS = ("cudnn", "flash", "mem-efficient")


def kernel_kind(name: str) -> str | None:
    """``"flash"``, ``"mem-efficient"``, ``"cudnn"``, ``"softmax"`` or None for a GPU kernel."""
    low = name.lower()
    for kind, markers in KERNEL_KINDS:
        if any(marker in low for marker in markers):
            return kind
    return None


@dataclass(frozen=True)
class AttentionRun:
    """What one profiled call ran: aten op calls (CPU side) and GPU kernel launches."""

    ops: Counter[str]
    kernels: Counter[str]  # empty unless profiled on CUDA

    @property
    def fused(self) -> Counter[str]:
        """Fused SDPA calls by backend (``"flash"``, ``"mem-efficient"``, ...)."""
        return Counter({FUSED_OPS[op]: n for op, n in self.ops.items() if op in FUSED_OPS})

    @property
    def math(self) -> int:
        """SDPA calls that fell back to the unfused math kernel."""
        return self.ops[MATH_OP]

    @property
    def explicit(self) -> int:
        """Softmax calls outside SDPA's math fallback: mitk's explicit attention layers."""
        return self.ops[SOFTMAX_OP] - self.math

    def kernels_of(self, *kinds: str) -> Counter[str]:
        """GPU kernel launches whose kind is one of ``kinds``, by kernel name."""
        return Counter({k: n for k, n in self.kernels.items() if kernel_kind(k) in kinds})


def profile_attention(run: Callable[[], Any], device: torch.device | str) -> AttentionRun:
    """Run ``run()`` once under ``torch.profiler`` (CPU ops; CUDA kernels on a CUDA device)."""
    cuda = torch.device(device).type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    if cuda:
        torch.cuda.synchronize()
    with profile(activities=activities) as prof, torch.inference_mode():
        run()
        if cuda:
            torch.cuda.synchronize()
    ops: Counter[str] = Counter()
    kernels: Counter[str] = Counter()
    for event in prof.key_averages():
        target = kernels if event.device_type == DeviceType.CUDA else ops
        target[event.key] += event.count
    return AttentionRun(ops, kernels)


# --- precision ----------------------------------------------------------------------------
def precision_bound(hf_error: float, dtype: torch.dtype, scale: float) -> float:
    """The most error ``tests/parity/test_precision.py`` allows mitk, given HF's own error."""
    return SLACK * hf_error + FLOOR_EPS * torch.finfo(dtype).eps * scale


@dataclass(frozen=True)
class Precision:
    """Log-prob error of one low-precision run against fp64, mitk's and Hugging Face's."""

    dtype: str
    backend: str  # mitk's attention backend: "auto" (fused) or "eager"
    mitk_error: float  # max |mitk low - mitk fp64|
    hf_error: float  # max |HF low - HF fp64|
    fp64_gap: float  # max |mitk fp64 - HF fp64|: the two references agree
    bound: float

    @property
    def ok(self) -> bool:
        return self.fp64_gap < 1e-6 and self.mitk_error <= self.bound


def _hf_log_probs(
    directory: Path, tokens: torch.Tensor, dtype: torch.dtype, device: torch.device | str
) -> torch.Tensor:
    """HF's log-probs in fp64; eager attention, as the precision tests run it."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(directory, attn_implementation="eager", dtype=dtype)
    hf = hf.to(device).eval()
    with torch.inference_mode():
        logits = hf(tokens.to(device), use_cache=False).logits
    return logits.double().log_softmax(-1)


def _mitk_log_probs(model: HookedTransformer, tokens: torch.Tensor, backend: str) -> torch.Tensor:
    with torch.inference_mode(), model.backend(backend):  # type: ignore[arg-type]
        return model(tokens).double().log_softmax(-1)


def log_prob_precision(
    directory: Path,
    tokens: torch.Tensor,
    dtype: torch.dtype,
    device: torch.device | str,
    backends: Sequence[str] = ("auto", "eager"),
) -> list[Precision]:
    """mitk's ``dtype`` log-probs against its fp64 run, bounded by HF's error, per backend."""
    hf_ref = _hf_log_probs(directory, tokens, torch.float64, device)
    hf_error = float((_hf_log_probs(directory, tokens, dtype, device) - hf_ref).abs().max())
    scale = float(hf_ref.abs().max())
    reference = HookedTransformer.from_pretrained(directory, dtype=torch.float64, device=device)
    model = HookedTransformer.from_pretrained(directory, dtype=dtype, device=device)
    results = []
    for backend in backends:
        ours_ref = _mitk_log_probs(reference, tokens, backend)
        ours = _mitk_log_probs(model, tokens, backend)
        results.append(
            Precision(
                dtype=str(dtype).removeprefix("torch."),
                backend=backend,
                mitk_error=float((ours - ours_ref).abs().max()),
                hf_error=hf_error,
                fp64_gap=float((ours_ref - hf_ref).abs().max()),
                bound=precision_bound(hf_error, dtype, scale),
            )
        )
    return results
