"""Gemma and Gemma-2 specifics against Hugging Face: soft-capped attention, norms, embeddings.

Tiny random models (fp32, CPU). Gemma-2 here keeps its attention soft-capping,
so every layer falls back to the explicit path with a recorded reason;
``test_hf_families`` covers both families on the fused path.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from mitk import HookedTransformer
from mitk.analysis.dla import logit_attribution
from mitk.errors import ConfigError, UnsupportedModelError
from tests.parity.hf_compare import assert_matches_hf, hf_forward, token_batch
from tests.parity.test_hf_families import TOL, VOCAB, _gemma, _gemma2, _randomised


def _load(hf: nn.Module, directory: Path) -> tuple[nn.Module, HookedTransformer]:
    hf = _randomised(hf, seed=1)
    hf.save_pretrained(directory, safe_serialization=True)
    hf.config._attn_implementation = "eager"  # the reference computes attention explicitly
    return hf, HookedTransformer.from_pretrained(directory)


@pytest.fixture(scope="module")
def capped(tmp_path_factory: pytest.TempPathFactory) -> tuple[nn.Module, HookedTransformer]:
    """Gemma-2 with (small, so they bite) attention and final-logit soft-caps."""
    torch.manual_seed(0)
    hf = _gemma2(attn_logit_softcapping=2.0, final_logit_softcapping=3.0)
    return _load(hf, tmp_path_factory.mktemp("gemma2-capped"))


@pytest.fixture(scope="module")
def gemma(tmp_path_factory: pytest.TempPathFactory) -> tuple[nn.Module, HookedTransformer]:
    torch.manual_seed(0)
    return _load(_gemma(), tmp_path_factory.mktemp("gemma"))


@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "left-padded"])
def test_soft_capped_gemma2_matches_and_records_the_fallback(capped: Any, padded: bool) -> None:
    hf, model = capped
    tokens, mask = token_batch(VOCAB, padded)
    logits = assert_matches_hf(hf, model, tokens, mask, TOL).logits
    assert model.attention_paths() == ["eager: soft-capping"] * model.cfg.n_layers
    assert logits.abs().max() < 3.0  # the final soft-cap bounds every logit


def test_soft_capping_cannot_be_forced_through_sdpa(capped: Any) -> None:
    _, model = capped
    tokens, _ = token_batch(VOCAB, padded=False)
    with model.backend("sdpa"), pytest.raises(ConfigError, match="soft-capping"):
        model(tokens)


def test_hooked_scores_are_capped_and_the_hook_is_the_recorded_reason(capped: Any) -> None:
    _, model = capped
    tokens, _ = token_batch(VOCAB, padded=False)
    _, cache = model.run_with_cache(tokens, names_filter="blocks.0.attn.hook_attn_scores")
    scores = cache["blocks.0.attn.hook_attn_scores"]
    assert scores[scores.isfinite()].abs().max() <= 2.0
    assert model.attention_paths()[0] == "eager: hooked blocks.0.attn.hook_attn_scores"


def test_sandwich_norms_are_hooked_and_fold_ln_refuses_them(capped: Any) -> None:
    _, model = capped
    tokens, _ = token_batch(VOCAB, padded=False)
    names = ["blocks.0.ln1_post.hook_scale", "blocks.1.ln2_post.hook_normalized"]
    _, cache = model.run_with_cache(tokens, names_filter=names)
    assert cache[names[0]].shape == (3, 12, 1)
    with pytest.raises(UnsupportedModelError, match="ln1_post"):
        model.process_weights(fold_ln=True)
    assert "processing" not in model.cfg.extra  # a refusal leaves the model untouched


def test_weights_absorb_the_norm_offset_and_embedding_scale(gemma: Any) -> None:
    hf, model = gemma
    d_model = model.cfg.d_model
    hf_norm = hf.model.layers[0].input_layernorm.weight
    torch.testing.assert_close(model.blocks[0].ln1.w, 1.0 + hf_norm, atol=0, rtol=0)
    tokens, _ = token_batch(VOCAB, padded=False)
    _, cache = model.run_with_cache(tokens, names_filter="hook_embed")
    expected = hf.model.embed_tokens(tokens)  # HF's embedding applies the sqrt(d_model) scale
    torch.testing.assert_close(cache["hook_embed"], expected, atol=1e-6, rtol=0)
    # tied weights: the unembedding is the unscaled embedding
    torch.testing.assert_close(model.W_U, hf.lm_head.weight.T, atol=0, rtol=0)
    assert model.cfg.act_fn == "gelu_tanh" and model.cfg.d_head * model.cfg.n_heads != d_model


def test_fold_ln_keeps_gemma_log_probs(gemma: Any, tmp_path: Path) -> None:
    hf, _ = gemma
    hf.save_pretrained(tmp_path, safe_serialization=True)
    tokens, mask = token_batch(VOCAB, padded=True)
    folded = HookedTransformer.from_pretrained(tmp_path, fold_ln=True)
    expected = hf_forward(hf, tokens, mask)
    with torch.no_grad():
        logits = folded(tokens, attention_mask=mask)
    real = mask.bool()
    assert bool((folded.blocks[0].ln1.w == 1).all())
    torch.testing.assert_close(
        logits.log_softmax(-1)[real], expected.logits.log_softmax(-1)[real], atol=TOL, rtol=0
    )


def test_per_head_writes_are_refused_under_sandwich_norms(capped: Any) -> None:
    _, model = capped
    tokens, _ = token_batch(VOCAB, padded=False)
    _, cache = model.run_with_cache(tokens)
    with pytest.raises(UnsupportedModelError, match="sandwich norms"):
        cache.stack_head_results()
    # DLA by head or neuron reads the same writes, so it is refused the same way
    for by in ("head", "neuron"):
        with pytest.raises(UnsupportedModelError, match="sandwich norms"):
            logit_attribution(model, cache, answer_tokens=1, by=by)
    # the stream itself stays additive: embeddings plus every (normed) sublayer write
    stack = cache.decompose_resid()
    torch.testing.assert_close(stack.sum(0), cache["blocks.1.hook_resid_post"], atol=1e-4, rtol=0)
