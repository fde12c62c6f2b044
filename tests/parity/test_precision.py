"""Low precision against an fp64 reference, judged by Hugging Face's own low-precision error.

One tiny random checkpoint per family is loaded into mitk and into HF in fp64
(the reference) and in a low precision. mitk's error against its fp64 run may
be at most ``SLACK`` times HF's error against HF's fp64 run, plus a floor of a
few units of the dtype's rounding (``FLOOR_EPS`` times its epsilon) for
quantities HF happens to get almost exactly right. Log-probs and the final
(normed) hidden state are compared at real tokens of a left-padded batch, on
the fused and the explicit attention path. HF runs eagerly (its SDPA path drops
Gemma-2's attention soft-cap). CPU kernels exist for every op here in
bfloat16 and float16, so both are tested.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from mitk import HookedTransformer
from tests.parity.hf_compare import token_batch
from tests.parity.test_hf_families import (
    VOCAB,
    _bloom,
    _gemma2,
    _llama,
    _randomised,
)

SLACK = 2.0
FLOOR_EPS = 0.05
LOW = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=VOCAB,
                                      n_positions=64))  # fmt: skip


FAMILIES: dict[str, Any] = {
    "gpt2": _gpt2,
    "llama-gqa": _llama,
    "gemma2-softcaps": lambda: _gemma2(attn_logit_softcapping=5.0, final_logit_softcapping=3.0),
    "bloom-alibi": lambda: _bloom(n_head=8),
}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def checkpoint(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """(saved directory, HF model in fp32 with eager attention)."""
    torch.manual_seed(0)
    hf = _randomised(FAMILIES[request.param](), seed=1)
    directory = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(directory, safe_serialization=True)
    hf.config._attn_implementation = "eager"
    return directory, hf


def _hf_run(hf: nn.Module, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-probs, final hidden) of HF at ``dtype`` in the padded layout, both in fp64.

    Each row runs alone, unpadded: in fp64 HF's eager padding mask leaves
    padded queries NaN, which then leak into real ones through zero weights.
    """
    tokens, mask = token_batch(VOCAB, padded=True)
    assert mask is not None
    model = copy.deepcopy(hf).to(dtype)
    log_probs = torch.zeros(*tokens.shape, VOCAB, dtype=torch.float64)
    hidden = torch.zeros(*tokens.shape, model.config.hidden_size, dtype=torch.float64)
    for row, keep in enumerate(mask.bool()):
        with torch.no_grad():
            out = model(tokens[row, keep][None], output_hidden_states=True)
        log_probs[row, keep] = out.logits[0].double().log_softmax(-1)
        hidden[row, keep] = out.hidden_states[-1][0].double()
    return log_probs, hidden


def _mitk_run(model: HookedTransformer, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    tokens, mask = token_batch(VOCAB, padded=True)
    with torch.no_grad(), model.backend(backend):  # type: ignore[arg-type]
        logits = model(tokens, attention_mask=mask)
        hidden = model(tokens, attention_mask=mask, return_type="hidden")
    return logits.double().log_softmax(-1), hidden.double()


def _error(low: torch.Tensor, ref: torch.Tensor, real: torch.Tensor) -> float:
    return float((low - ref)[real].abs().max())


@pytest.mark.parametrize("low", sorted(LOW))
@pytest.mark.parametrize("backend", ["auto", "eager"])
def test_low_precision_error_is_within_hf_own(checkpoint: Any, low: str, backend: str) -> None:
    directory, hf = checkpoint
    dtype = LOW[low]
    _, mask = token_batch(VOCAB, padded=True)
    assert mask is not None
    real = mask.bool()
    hf_ref, hf_low = _hf_run(hf, torch.float64), _hf_run(hf, dtype)
    reference = HookedTransformer.from_pretrained(directory, dtype=torch.float64)
    model = HookedTransformer.from_pretrained(directory, dtype=dtype)
    assert model.W_E.dtype == dtype and model.cfg.dtype == low
    ours_ref, ours_low = _mitk_run(reference, backend), _mitk_run(model, backend)
    eps = torch.finfo(dtype).eps
    for what, ours, theirs, mitk_ref, hf_fp64 in zip(
        ("log-probs", "hidden"), ours_low, hf_low, ours_ref, hf_ref, strict=True
    ):
        # the two fp64 runs agree far below any low-precision error
        assert _error(mitk_ref, hf_fp64, real) < 1e-6, what
        ours_err, hf_err = _error(ours, mitk_ref, real), _error(theirs, hf_fp64, real)
        scale = float(hf_fp64[real].abs().max())  # the floor is relative to the output's size
        assert ours_err <= SLACK * hf_err + FLOOR_EPS * eps * scale, (what, ours_err, hf_err)


@pytest.mark.parametrize("low", ["bfloat16", "float16"])
def test_to_dtype_updates_config_and_keeps_hooks(checkpoint: Any, low: str, tmp_path: Path) -> None:
    directory, _ = checkpoint
    dtype = LOW[low]
    model = HookedTransformer.from_pretrained(directory).to(dtype)
    assert model.cfg.dtype == low
    assert all(block.attn.cfg is model.cfg for block in model.blocks)  # one config, replaced
    assert {p.dtype for p in model.parameters()} == {dtype}
    tokens, mask = token_batch(VOCAB, padded=True)
    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens, attention_mask=mask)
    assert logits.dtype == dtype
    assert {act.dtype for act in cache.values()} == {dtype}
    # casting after loading equals loading at the dtype, and the saved config says so
    direct = HookedTransformer.from_pretrained(directory, dtype=dtype).state_dict()
    for key, value in model.state_dict().items():
        if key == "embed.W_E":  # Gemma bakes in sqrt(d_model) at the load dtype: rounded twice
            torch.testing.assert_close(direct[key], value)
        else:
            assert torch.equal(direct[key], value), key
    assert HookedTransformer.from_pretrained(model.save(tmp_path / "saved")).cfg.dtype == low
    assert model.double().cfg.dtype == "float64"
