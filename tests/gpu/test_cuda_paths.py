"""On CUDA: fused kernels in half precision, one explicit layer per pattern hook, bf16 bound.

Skipped without CUDA (``-m "not cuda"`` deselects them). Random GPT-2- and LLaMA-GQA-shaped
checkpoints from the precision tests; kernels are read from ``torch.profiler``
(see ``tests/gpu/readiness.py``).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from mitk import HookedTransformer
from tests.gpu.readiness import FUSED_KERNELS, log_prob_precision, profile_attention
from tests.parity.test_hf_families import VOCAB, _randomised
from tests.parity.test_precision import FAMILIES

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

DEVICE = "cuda"
HALF = {"float16": torch.float16, "bfloat16": torch.bfloat16}
PATTERN_HOOK = "blocks.0.attn.hook_pattern"


@pytest.fixture(scope="module", params=["gpt2", "llama-gqa"])
def checkpoint(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    hf = _randomised(FAMILIES[request.param](), seed=1)
    directory = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(directory, safe_serialization=True)
    return directory


def _tokens() -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randint(1, VOCAB, (2, 64), generator=generator).to(DEVICE)


@pytest.mark.parametrize("dtype", sorted(HALF))
def test_unhooked_half_forward_runs_a_fused_kernel(checkpoint: Path, dtype: str) -> None:
    model = HookedTransformer.from_pretrained(checkpoint, dtype=HALF[dtype], device=DEVICE)
    n_layers, tokens = model.cfg.n_layers, _tokens()
    run = profile_attention(lambda: model(tokens), DEVICE)
    assert model.attention_paths() == ["sdpa"] * n_layers
    assert sum(run.fused.values()) == n_layers and run.math == 0 and run.explicit == 0, run.ops
    assert sum(run.kernels_of(*FUSED_KERNELS).values()) >= n_layers, run.kernels
    # whatever SDPA prefers on this card, mitk's inputs qualify for FlashAttention or the
    # memory-efficient kernel: restricted to those two, the forward still runs fused
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]):
        run = profile_attention(lambda: model(tokens), DEVICE)
    assert set(run.fused) <= {"flash", "mem-efficient"} and sum(run.fused.values()) == n_layers
    assert sum(run.kernels_of("flash", "mem-efficient").values()) >= n_layers, run.kernels


def test_hooking_layer_0_pattern_runs_only_layer_0_explicitly(checkpoint: Path) -> None:
    model = HookedTransformer.from_pretrained(checkpoint, dtype=torch.bfloat16, device=DEVICE)
    n_layers, tokens = model.cfg.n_layers, _tokens()
    with model.hooks(fwd_hooks=[(PATTERN_HOOK, lambda pattern, hook: None)]):
        run = profile_attention(lambda: model(tokens), DEVICE)
    paths = model.attention_paths()
    assert paths[0].startswith(f"eager: hooked {PATTERN_HOOK}") and paths[1:] == ["sdpa"] * (
        n_layers - 1
    )
    assert sum(run.fused.values()) == n_layers - 1 and run.math == 0 and run.explicit == 1
    assert sum(run.kernels_of(*FUSED_KERNELS).values()) >= n_layers - 1, run.kernels
    assert run.kernels_of("softmax"), run.kernels


def test_bf16_log_probs_are_within_the_precision_bound(checkpoint: Path) -> None:
    results = log_prob_precision(checkpoint, _tokens(), torch.bfloat16, DEVICE)
    assert [r.backend for r in results] == ["auto", "eager"]
    for result in results:
        assert result.ok, result
