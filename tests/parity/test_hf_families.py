"""mitk against Hugging Face decoder families on the same tiny random weights (fp32, CPU).

Each family is built from its ``transformers`` config class, given non-trivial
norm weights and biases, written with ``save_pretrained`` and loaded back with
``HookedTransformer.from_pretrained``. Left-padded rows get HF position ids
counted over real tokens, which is what mitk derives from the mask.

Rotary-scaled LLaMA variants set a pretraining context of 8, shorter than the
12-token batch and than generation's 14 tokens, so the scaling changes the
result; ``test_breaking_a_scaling_formula_is_caught`` checks that it does.
"""

from __future__ import annotations

from collections.abc import Callable
import copy
from functools import partial
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from mitk import HookedTransformer
from mitk.analysis.dla import logit_attribution
from mitk.errors import UnsupportedModelError
from mitk.hooks import name
from tests.parity.hf_compare import assert_matches_hf, hf_forward, token_batch
from tests.parity.hf_moe_builders import MOE_FAMILIES

TOL = 1e-4
VOCAB = 97
SHAPE: dict[str, Any] = {"vocab_size": VOCAB, "max_position_embeddings": 64}
# LLaMA, Mistral and Qwen2 share these config keys; 4 query heads over 2 key-value heads
LLAMA_LIKE: dict[str, Any] = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 96,
    **SHAPE,
}


def _llama(**kw: Any) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(**{**LLAMA_LIKE, **kw}))


def _mistral(**kw: Any) -> nn.Module:
    from transformers import MistralConfig, MistralForCausalLM

    return MistralForCausalLM(MistralConfig(**{**LLAMA_LIKE, "sliding_window": 4, **kw}))


def _qwen2(**kw: Any) -> nn.Module:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    return Qwen2ForCausalLM(Qwen2Config(**{**LLAMA_LIKE, **kw}))


def _gemma(**kw: Any) -> nn.Module:
    from transformers import GemmaConfig, GemmaForCausalLM

    return GemmaForCausalLM(GemmaConfig(**{**LLAMA_LIKE, "head_dim": 24, **kw}))


def _gemma2(**kw: Any) -> nn.Module:
    from transformers import Gemma2Config, Gemma2ForCausalLM

    # 24-wide heads (not 64 / 4), a window of 4 on layer 0, its own attention scale
    base = {**LLAMA_LIKE, "head_dim": 24, "sliding_window": 4, "query_pre_attn_scalar": 20}
    return Gemma2ForCausalLM(Gemma2Config(**{**base, **kw}))


def _qwen3(**kw: Any) -> nn.Module:
    from transformers import Qwen3Config, Qwen3ForCausalLM

    # 24-wide heads (not 64 / 4): the per-head q/k norms are d_head wide
    return Qwen3ForCausalLM(Qwen3Config(**{**LLAMA_LIKE, "head_dim": 24, **kw}))


def _olmo2(**kw: Any) -> nn.Module:
    from transformers import Olmo2Config, Olmo2ForCausalLM

    base = {**LLAMA_LIKE, "pad_token_id": 0, "eos_token_id": 0}  # HF's defaults exceed VOCAB
    return Olmo2ForCausalLM(Olmo2Config(**{**base, **kw}))


def _gemma3(**kw: Any) -> nn.Module:
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    # local, global, local layers; local bases of 100 and global 10^4 (not HF's 10^4 and 10^6,
    # too slow to tell apart in 12 positions), a linear factor 8 on the global layer only
    kinds = ["sliding_attention", "full_attention", "sliding_attention"]
    base = {**LLAMA_LIKE, "num_hidden_layers": 3, "head_dim": 24, "sliding_window": 4,
            "query_pre_attn_scalar": 20, "rope_local_base_freq": 100.0, "rope_theta": 10000.0,
            "layer_types": kinds}  # fmt: skip
    return Gemma3ForCausalLM(Gemma3TextConfig(**{**base, **kw}))


def _smollm3(**kw: Any) -> nn.Module:
    from transformers import SmolLM3Config, SmolLM3ForCausalLM

    # every 2nd layer without rotary (layer 1 of 2); HF's default token ids exceed VOCAB
    base = {**LLAMA_LIKE, "no_rope_layer_interval": 2, "pad_token_id": 0, "eos_token_id": 0,
            "bos_token_id": 0}  # fmt: skip
    return SmolLM3ForCausalLM(SmolLM3Config(**{**base, **kw}))


def _phi3(**kw: Any) -> nn.Module:
    from transformers import Phi3Config, Phi3ForCausalLM

    # packed qkv_proj (4 query heads over 2 key-value heads) and gate_up_proj
    base = {**LLAMA_LIKE, "pad_token_id": 0, "eos_token_id": 0, "bos_token_id": 0}
    return Phi3ForCausalLM(Phi3Config(**{**base, **kw}))


def _granite(**kw: Any) -> nn.Module:
    from transformers import GraniteConfig, GraniteForCausalLM

    # every multiplier away from 1 (and the attention scale from 16 ** -0.5)
    base = {**LLAMA_LIKE, "embedding_multiplier": 12.0, "residual_multiplier": 0.22,
            "attention_multiplier": 0.4, "logits_scaling": 8.0}  # fmt: skip
    return GraniteForCausalLM(GraniteConfig(**{**base, **kw}))


def _starcoder2(**kw: Any) -> nn.Module:
    from transformers import Starcoder2Config, Starcoder2ForCausalLM

    base = {**LLAMA_LIKE, "bos_token_id": 0, "eos_token_id": 0}  # HF's defaults exceed VOCAB
    return Starcoder2ForCausalLM(Starcoder2Config(**{**base, **kw}))


def _stablelm(**kw: Any) -> nn.Module:
    from transformers import StableLmConfig, StableLmForCausalLM

    # a LayerNorm epsilon that matters for the tiny random stream
    base = {**LLAMA_LIKE, "layer_norm_eps": 1e-3}
    return StableLmForCausalLM(StableLmConfig(**{**base, **kw}))


def _cohere(**kw: Any) -> nn.Module:
    from transformers import CohereConfig, CohereForCausalLM

    # HF's default token ids exceed VOCAB; a logit scale and LayerNorm epsilon that matter
    base = {**LLAMA_LIKE, "pad_token_id": 0, "bos_token_id": 0, "eos_token_id": 0,
            "logit_scale": 0.3, "layer_norm_eps": 1e-3}  # fmt: skip
    return CohereForCausalLM(CohereConfig(**{**base, **kw}))


# Pretraining context 8: the 12-token batch and generation run past it
ORIGINAL_CONTEXT = 8
# LongRoPE's per-pair divisors (16-wide heads: 8 pairs), unlike each other and across sets
SHORT_FACTOR = [1.0, 1.5, 2.0, 1.2, 3.0, 1.1, 2.5, 1.7]
LONG_FACTOR = [2.0, 3.0, 1.3, 4.0, 1.6, 5.0, 2.2, 6.0]
SCALED_ROPE: dict[str, dict[str, Any]] = {
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": ORIGINAL_CONTEXT},
    "linear": {"rope_type": "linear", "factor": 4.0},
    "yarn": {"rope_type": "yarn", "factor": 4.0,
             "original_max_position_embeddings": ORIGINAL_CONTEXT},
    "yarn-mscale-betas": {"rope_type": "yarn", "factor": 3.0, "beta_fast": 8.0, "beta_slow": 2.0,
                          "mscale": 1.0, "mscale_all_dim": 0.5,
                          "original_max_position_embeddings": ORIGINAL_CONTEXT},
    # dynamic NTK rescales past max_position_embeddings itself
    "dynamic": {"rope_type": "dynamic", "factor": 4.0},
    # attention factor from max_position_embeddings / original = 64 / 8
    "longrope": {"rope_type": "longrope", "short_factor": SHORT_FACTOR,
                 "long_factor": LONG_FACTOR, "original_max_position_embeddings": ORIGINAL_CONTEXT},
}  # fmt: skip


def _scaled_llama(variant: str, **kw: Any) -> nn.Module:
    params = SCALED_ROPE[variant]
    n_ctx = ORIGINAL_CONTEXT if variant == "dynamic" else 64
    return _llama(rope_scaling=dict(params), max_position_embeddings=n_ctx, **kw)


def _phi3_longrope(**kw: Any) -> nn.Module:
    params = {"rope_type": "longrope", "short_factor": SHORT_FACTOR[:6],
              "long_factor": LONG_FACTOR[:6]}  # fmt: skip
    return _phi3(rope_parameters=params, original_max_position_embeddings=ORIGINAL_CONTEXT,
                 partial_rotary_factor=0.75, **kw)  # fmt: skip


def _neox(**kw: Any) -> nn.Module:
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    base = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
            "intermediate_size": 96, "rotary_pct": 0.5, **SHAPE}  # fmt: skip
    return GPTNeoXForCausalLM(GPTNeoXConfig(**{**base, **kw}))


def _gptj(**kw: Any) -> nn.Module:
    from transformers import GPTJConfig, GPTJForCausalLM

    base = {"n_embd": 64, "n_layer": 2, "n_head": 4, "rotary_dim": 8, "n_inner": 96,
            "vocab_size": VOCAB, "n_positions": 64, "bos_token_id": 0,
            "eos_token_id": 0}  # fmt: skip
    return GPTJForCausalLM(GPTJConfig(**{**base, **kw}))


def _gpt_neo(**kw: Any) -> nn.Module:
    from transformers import GPTNeoConfig, GPTNeoForCausalLM

    # a window of 4 (shorter than the 12-token batch) on the local layers
    base = {"hidden_size": 64, "num_layers": 2, "num_heads": 4, "intermediate_size": 96,
            "attention_types": [[["global", "local"], 1]], "window_size": 4,
            "vocab_size": VOCAB, "max_position_embeddings": 64, "bos_token_id": 0,
            "eos_token_id": 0}  # fmt: skip
    return GPTNeoForCausalLM(GPTNeoConfig(**{**base, **kw}))


def _bloom(**kw: Any) -> nn.Module:
    from transformers import BloomConfig, BloomForCausalLM

    base = {"hidden_size": 64, "n_layer": 2, "vocab_size": VOCAB, "bos_token_id": 0,
            "eos_token_id": 0, **kw}  # fmt: skip
    return BloomForCausalLM(BloomConfig(**base))


FAMILIES: dict[str, Callable[[], nn.Module]] = {
    **MOE_FAMILIES,
    "llama-gqa": lambda: _llama(),
    "llama-mqa-tied-biased": lambda: _llama(
        num_key_value_heads=1, tie_word_embeddings=True, attention_bias=True, rope_theta=500.0
    ),
    "llama-mha-head-dim": lambda: _llama(num_key_value_heads=4, head_dim=8),
    "mistral-window-4": lambda: _mistral(),
    "qwen2": lambda: _qwen2(),
    "gemma-gqa-head-dim": lambda: _gemma(),
    # attention soft-capping runs explicitly: tests/parity/test_hf_gemma.py covers it
    "gemma2-window-logit-softcap": lambda: _gemma2(
        attn_logit_softcapping=None, final_logit_softcapping=3.0
    ),
    "gpt-neox-parallel-partial-rotary": lambda: _neox(),
    "gpt-neox-sequential": lambda: _neox(use_parallel_residual=False, rotary_pct=1.0),
    "gptj-interleaved-partial-rotary": lambda: _gptj(),
    "gpt-neo-global-local-window-4": lambda: _gpt_neo(),
    "gpt-neo-local-global-local-window-4": lambda: _gpt_neo(
        num_layers=3, attention_types=[[["local", "global"], 1], [["local"], 1]]
    ),
    # 8 heads: power-of-two ALiBi slopes; 6 heads: the interleaved non-power-of-two recipe
    "bloom-alibi-8-heads": lambda: _bloom(n_head=8),
    "bloom-alibi-6-heads": lambda: _bloom(n_head=6, hidden_size=96),
    "qwen2-window-on-layer-1": lambda: _qwen2(
        use_sliding_window=True, sliding_window=4, max_window_layers=1
    ),
    **{f"llama-rope-{variant}": partial(_scaled_llama, variant) for variant in SCALED_ROPE},
    "qwen3-head-qk-norms": lambda: _qwen3(),
    "qwen3-yarn-window-on-layer-1": lambda: _qwen3(
        rope_scaling=dict(SCALED_ROPE["yarn"]),
        use_sliding_window=True,
        sliding_window=4,
        max_window_layers=1,
        attention_bias=True,
    ),
    "olmo2-post-norms-projection-qk-norms": lambda: _olmo2(),
    # attention soft-capping runs explicitly: the fused-path check needs it off
    "gemma3-local-global-linear-8-logit-softcap": lambda: _gemma3(
        rope_scaling={"rope_type": "linear", "factor": 8.0}, final_logit_softcapping=3.0
    ),
    "granite-multipliers-gqa": lambda: _granite(),
    "granite-multipliers-tied-biased": lambda: _granite(
        tie_word_embeddings=True, attention_bias=True, num_key_value_heads=4
    ),
    "starcoder2-biased-window-4": lambda: _starcoder2(sliding_window=4, norm_epsilon=1e-3),
    "starcoder2-unbiased-untied-relu": lambda: _starcoder2(
        use_bias=False, tie_word_embeddings=False, hidden_act="relu"
    ),
    "stablelm-quarter-rotary-qkv-bias": lambda: _stablelm(use_qkv_bias=True),
    # one norm shared by both sublayers; LayerNorms with weights per query/key head
    "stablelm-parallel-head-qk-layernorms": lambda: _stablelm(
        use_parallel_residual=True, qk_layernorm=True, partial_rotary_factor=0.5
    ),
    "cohere-parallel-shared-norm-interleaved": lambda: _cohere(),
    "cohere-head-qk-layernorms-untied-biased": lambda: _cohere(
        use_qk_norm=True, tie_word_embeddings=False, attention_bias=True, rope_theta=500.0
    ),
    "smollm3-nope-on-layer-1": lambda: _smollm3(),
    # NoPE layers get HF's windows: layer 1 sees 4 positions, layer 0 rotates with YaRN
    "smollm3-yarn-window-on-nope-layer": lambda: _smollm3(
        rope_scaling=dict(SCALED_ROPE["yarn"]), use_sliding_window=True, sliding_window=4
    ),
    "phi3-packed-gqa": lambda: _phi3(),
    "phi3-partial-rotary-window-4": lambda: _phi3(partial_rotary_factor=0.5, sliding_window=4),
    # original context 8 at the top level, as Phi-3 writes it; 12-wide rotary part: 6 pairs
    "phi3-longrope-partial-rotary": lambda: _phi3_longrope(),
}
LONG_CONTEXT = sorted(
    name
    for name in FAMILIES
    if "rope-" in name
    or name.startswith(("qwen3", "olmo2", "gemma3", "smollm3", "phi3", "granite", "starcoder2",
                        "stablelm", "cohere"))
)  # fmt: skip
"""The families added with rotary scaling, q/k norms, per-layer rotary or folded multipliers,
generated past their original context and local windows."""


def _randomised(model: nn.Module, seed: int) -> nn.Module:
    """HF inits norms to 1 and biases to 0: perturb them so parity covers those terms."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name or "ln" in name or name.endswith("bias"):
                param.add_(torch.randn(param.shape, generator=gen) * 0.1)
    return model.eval()


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def pair(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """(family name, HF model in eager attention, mitk's load of its saved directory)."""
    torch.manual_seed(0)
    hf = _randomised(FAMILIES[request.param](), seed=1)
    directory = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(directory, safe_serialization=True)
    hf.config._attn_implementation = "eager"  # the reference computes attention explicitly
    return request.param, hf, HookedTransformer.from_pretrained(directory)


@pytest.mark.parametrize("padding", ["none", "left", "right"])
def test_log_probs_and_every_residual_match(pair: Any, padding: str) -> None:
    _, hf, model = pair
    tokens, mask = token_batch(VOCAB, padding != "none")
    if mask is not None and padding == "right":
        mask = mask.flip(-1)
    real, hf_out, _ = assert_matches_hf(hf, model, tokens, mask, TOL)
    with torch.no_grad():
        hidden = model(tokens, attention_mask=mask, return_type="hidden")
    # HF's last hidden_states entry is after the final norm
    torch.testing.assert_close(hidden[real], hf_out.hidden_states[-1][real], atol=TOL, rtol=0)


def test_fused_and_explicit_paths_agree(pair: Any) -> None:
    _, _, model = pair
    tokens, mask = token_batch(VOCAB, padded=True)
    with torch.no_grad():
        fused = model(tokens, attention_mask=mask)
        assert model.attention_paths() == ["sdpa"] * model.cfg.n_layers
        with model.backend("eager"):
            explicit = model(tokens, attention_mask=mask)
    real = mask.bool()
    torch.testing.assert_close(fused[real], explicit[real], atol=1e-5, rtol=0)


def test_keys_and_values_keep_the_key_value_head_count(pair: Any) -> None:
    _, hf, model = pair
    tokens, _ = token_batch(VOCAB, padded=False)
    names = [f"blocks.0.attn.hook_{kind}" for kind in ("q", "k", "v")]
    _, cache = model.run_with_cache(tokens, names_filter=names)
    n_kv = hf.config.to_dict().get("num_key_value_heads") or model.cfg.n_heads
    assert cache["blocks.0.attn.hook_k"].shape == (3, 12, n_kv, model.cfg.d_head)
    assert cache["blocks.0.attn.hook_v"].shape == (3, 12, n_kv, model.cfg.v_head_dim)
    assert cache["blocks.0.attn.hook_q"].shape == (3, 12, model.cfg.n_heads, model.cfg.d_head)


def test_unsupported_architecture_lists_the_supported_ones(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text('{"model_type": "xlnet"}')
    with pytest.raises(UnsupportedModelError, match=r"'xlnet'.*supported: .*llama.*mistral"):
        HookedTransformer.from_pretrained(tmp_path)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        # scaling reaches only the families whose scaled positions are tested
        (lambda: _mistral(rope_scaling={"rope_type": "linear", "factor": 2.0}),
         "rope scaling 'linear' is not supported for mistral"),
        # HF reads long_factor only on a pass past the original context, so it builds this
        (lambda: _llama(rope_scaling={**SCALED_ROPE["longrope"], "long_factor": [1.0] * 6}),
         r"longrope long_factor has 6 entries; .* rotary_dim / 2 = 8"),
        (lambda: _qwen3(rope_scaling={"rope_type": "linear", "factor": 2.0, "spin": 1}),
         r"rope_type 'linear' parameter\(s\) \['spin'\]"),
        (lambda: _qwen3(layer_norm_in_fp8=True), "qwen3 config field.*layer_norm_in_fp8"),
        (lambda: _llama(quantization_config={"bits": 4}), "llama config field.*quantization"),
        (lambda: _olmo2(clip_qkv=8.0), "olmo2 config field.*clip_qkv"),
        # HF's Mistral ignores layer_types (it windows every layer): ambiguous, so refused
        (lambda: _mistral(layer_types=["full_attention"] * 2), "mistral config field.*layer_"),
        (lambda: _mistral(attention_bias=True), "mistral config field.*attention_bias"),
        (lambda: _qwen2(clip_qkv=8.0), "qwen2 config field.*clip_qkv"),
        (lambda: _gemma(altup_coef_clip=1.0), "gemma config field.*altup_coef_clip"),
        (lambda: _gemma2(clip_qkv=8.0), "gemma2 config field.*clip_qkv"),
        (lambda: _granite(mlp_bias=True), "MLP biases"),
        (lambda: _granite(rope_scaling={"rope_type": "linear", "factor": 2.0}),
         "rope scaling 'linear' is not supported for granite"),
        (lambda: _starcoder2(clip_qkv=8.0), "starcoder2 config field.*clip_qkv"),
        (lambda: _stablelm(use_qk_norm=True), "stablelm config field.*use_qk_norm"),
        (lambda: _cohere(qk_layernorm=True), "cohere config field.*qk_layernorm"),
        (lambda: _cohere(rope_parameters={"rope_type": "default", "rope_theta": 1e4,
                                          "partial_rotary_factor": 0.5}),
         "cohere with a partial_rotary_factor"),
    ],
    ids=["mistral-scaled", "longrope-long-list", "unknown-rope-key", "qwen3-field", "llama-field",
         "olmo2-field", "mistral-layer-types", "mistral-field", "qwen2-field", "gemma-field",
         "gemma2-field", "granite-mlp-bias", "granite-scaled", "starcoder2-field",
         "stablelm-field", "cohere-field", "cohere-partial-rotary"],
)  # fmt: skip
def test_unsupported_variants_are_refused_by_name(make: Any, message: str, tmp_path: Path) -> None:
    make().save_pretrained(tmp_path, safe_serialization=True)
    with pytest.raises(UnsupportedModelError, match=message):
        HookedTransformer.from_pretrained(tmp_path)


def test_dla_sums_to_hf_logit_difference(pair: Any) -> None:
    """Per-component (and per-head where writes are additive) DLA totals HF's logit difference.

    Under a final soft-cap DLA decomposes (and ``Attribution.actual`` reports) the
    logits before the cap; those, capped, must be HF's.
    """
    _, hf, model = pair
    tokens, _ = token_batch(VOCAB, padded=False)
    hf_logits = hf_forward(hf, tokens, None).logits[:, -1]
    answers, wrong = torch.tensor([1, 5, 9]), torch.tensor([2, 6, 3])
    rows = torch.arange(3)
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens)
    result = logit_attribution(model, cache, answers, wrong)
    expected = hf_logits[rows, answers] - hf_logits[rows, wrong]
    if cap := model.cfg.output_softcap:
        with torch.no_grad():
            final = model.ln_final(cache["resid_post", model.cfg.n_layers - 1][:, -1:])
            uncapped = (final @ model.W_U + model.b_U)[:, 0]
        torch.testing.assert_close(cap * torch.tanh(uncapped / cap), hf_logits, atol=TOL, rtol=0)
        expected = uncapped[rows, answers] - uncapped[rows, wrong]
    torch.testing.assert_close(result.actual, expected, atol=TOL, rtol=0)
    torch.testing.assert_close(result.total(), expected, atol=TOL, rtol=0)
    if model.cfg.sandwich_norms:  # normed sublayer outputs are not sums of per-head writes
        with pytest.raises(UnsupportedModelError, match="sandwich norms"):
            logit_attribution(model, cache, answers, wrong, by="head")
        return
    by_head = logit_attribution(model, cache, answers, wrong, by="head")
    torch.testing.assert_close(by_head.total(), expected, atol=TOL, rtol=0)


PROCESSING_STEPS = ("fold_ln", "center_writing_weights", "center_unembed", "fold_value_biases")


@pytest.mark.parametrize("step", PROCESSING_STEPS)
def test_weight_processing_keeps_log_probs_or_is_refused(pair: Any, step: str) -> None:
    """Each processing step leaves log-probs as they were, or refuses the model by name."""
    _, _, model = pair
    tokens, mask = token_batch(VOCAB, padded=True)
    real = mask.bool()
    processed = copy.deepcopy(model)
    try:
        processed.process_weights(**{step: True})
    except UnsupportedModelError as err:
        assert str(err), "a refusal must say why"
        return
    with torch.no_grad():
        before = model(tokens, attention_mask=mask).log_softmax(-1)[real]
        after = processed(tokens, attention_mask=mask).log_softmax(-1)[real]
    torch.testing.assert_close(after, before, atol=TOL, rtol=0)


def _peaked_attention(model: nn.Module) -> nn.Module:
    """Queries and keys scaled up (norm weights where q/k are normed) so attention is peaked.

    At HF's init the tiny model's greedy tokens ignore positions, so a wrong or
    missing rotary scaling would still generate the same tokens.
    """
    # Gemma 3's q/k norms multiply by 1 + weight: its weight grows by 2 rather than tripling
    gemma3 = model.config.model_type == "gemma3_text"
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("qkv_proj.weight"):  # Phi-3 packs q, k, v: the q and k rows
                cfg = model.config
                d_head = cfg.hidden_size // cfg.num_attention_heads
                param[: (cfg.num_attention_heads + cfg.num_key_value_heads) * d_head].mul_(8.0)
            elif name.endswith(("q_norm.weight", "k_norm.weight")):
                param.add_(2.0) if gemma3 else param.mul_(3.0)
            elif name.endswith(("q_proj.weight", "k_proj.weight")):
                param.mul_(8.0)
    return model


@pytest.mark.parametrize("family", LONG_CONTEXT)
def test_greedy_generation_past_the_original_context_matches_hf(
    family: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """HF's 14-token generations (a 6-token prompt, cached steps past position 8), as greedy."""
    # test_hf_generate imports this module, so it is imported here, not at the top
    from tests.parity import test_hf_generate

    monkeypatch.setitem(
        test_hf_generate.FAMILIES, family, lambda: _peaked_attention(FAMILIES[family]())
    )
    test_hf_generate.test_greedy_matches_hf_generate(family, tmp_path)


@pytest.mark.parametrize(
    "pair",
    [
        f
        for f in sorted(FAMILIES)
        if f.startswith(("qwen3", "olmo2", "gemma3")) or "qk-layernorm" in f
    ],
    indirect=True,
)
def test_normed_queries_and_keys_match_hf_norm_outputs(pair: Any) -> None:
    """``hook_q_normed``/``hook_k_normed`` (reached by kind) equal HF's q/k norm outputs."""
    _, hf, model = pair
    tokens, _ = token_batch(VOCAB, padded=False)
    seen: dict[str, torch.Tensor] = {}
    attn = hf.model.layers[1].self_attn
    # StableLM's are q_layernorm/k_layernorm
    norms = [getattr(attn, f"{which}_norm", None) or getattr(attn, f"{which}_layernorm")
             for which in "qk"]  # fmt: skip
    handles = [
        module.register_forward_hook(lambda _m, _i, out, key=key: seen.__setitem__(key, out))
        for key, module in zip("qk", norms, strict=True)
    ]
    try:
        hf_forward(hf, tokens, None)
    finally:
        for handle in handles:
            handle.remove()
    kinds = [name(f"{which}_normed", 1) for which in "qk"]
    _, cache = model.run_with_cache(tokens, names_filter=kinds)
    for which in "qk":
        ours, theirs = cache[f"{which}_normed", 1], seen[which]
        assert ours.shape[-1] == model.cfg.d_head
        if theirs.shape[1] != tokens.shape[1]:  # Gemma 3 norms [batch, head, pos, d_head]
            theirs = theirs.transpose(1, 2)
        torch.testing.assert_close(ours.flatten(2), theirs.flatten(2), atol=1e-5, rtol=0)
    scale = model.blocks[1].attn.q_norm.hook_scale.name
    _, cache = model.run_with_cache(tokens, names_filter=scale)
    per_head = model.cfg.qk_norm != "projection"
    assert cache[scale].shape == ((3, 12, model.cfg.n_heads, 1) if per_head else (3, 12, 1))


def test_in_memory_source_and_native_save_give_the_same_model(pair: Any, tmp_path: Path) -> None:
    _, hf, model = pair
    tokens, mask = token_batch(VOCAB, padded=True)
    model.save(tmp_path / "native")
    with torch.no_grad():
        expected = model(tokens, attention_mask=mask)
        for other in (HookedTransformer.from_pretrained(hf),
                      HookedTransformer.from_pretrained(tmp_path / "native")):  # fmt: skip
            assert other.cfg == model.cfg
            torch.testing.assert_close(other(tokens, attention_mask=mask), expected, atol=0, rtol=0)


@pytest.mark.parametrize("variant", sorted(SCALED_ROPE))
@pytest.mark.parametrize("breakage", ["unscaled", "factor-off-by-half"])
def test_breaking_a_scaling_formula_is_caught(variant: str, breakage: str, tmp_path: Path) -> None:
    """The parity check fails for the same weights with no scaling or a wrong factor.

    So the batch runs far enough past the original context for every variant's
    formula to matter, and a wrong formula could not pass.
    """
    torch.manual_seed(0)
    hf = _randomised(_scaled_llama(variant), seed=1)
    hf.save_pretrained(tmp_path, safe_serialization=True)
    hf.config._attn_implementation = "eager"
    model = HookedTransformer.from_pretrained(tmp_path)
    scaling = model.cfg.rotary_scaling
    assert scaling is not None
    wrong = None if breakage == "unscaled" else scaling.replace(factor=scaling.factor * 1.5)
    if wrong is not None and scaling.kind == "longrope":  # it reads per-pair factors instead
        wrong = scaling.replace(long_factor=[f * 1.5 for f in scaling.long_factor or ()])
    broken = HookedTransformer(model.cfg.replace(rotary_scaling=wrong), seed=None)
    broken.load_state_dict(model.state_dict())
    tokens, mask = token_batch(VOCAB, padded=True)
    assert_matches_hf(hf, model, tokens, mask, TOL)
    with pytest.raises(AssertionError, match="not close"):
        assert_matches_hf(hf, broken.eval(), tokens, mask, TOL)


def test_fold_ln_refuses_a_model_without_pre_norms(tmp_path: Path) -> None:
    _olmo2().save_pretrained(tmp_path, safe_serialization=True)
    with pytest.raises(UnsupportedModelError, match="pre-norm"):
        HookedTransformer.from_pretrained(tmp_path, fold_ln=True)


def test_a_published_llama_3_2_config_converts() -> None:
    """Llama-3.2-1B's ``config.json`` (old layout: ``rope_scaling``, ``rope_theta``) passes the
    allow-list and keeps its Llama 3 scaling."""
    from mitk.model.pretrained.llama import llama_config

    hf = {"architectures": ["LlamaForCausalLM"], "attention_bias": False,
          "attention_dropout": 0.0, "bos_token_id": 128000, "eos_token_id": 128001,
          "head_dim": 64, "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02,
          "intermediate_size": 8192, "max_position_embeddings": 131072, "mlp_bias": False,
          "model_type": "llama", "num_attention_heads": 32, "num_hidden_layers": 16,
          "num_key_value_heads": 8, "pretraining_tp": 1, "rms_norm_eps": 1e-05,
          "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                           "original_max_position_embeddings": 8192, "rope_type": "llama3"},
          "rope_theta": 500000.0, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
          "transformers_version": "4.45.0.dev0", "use_cache": True,
          "vocab_size": 128256}  # fmt: skip
    cfg = llama_config(hf)
    assert cfg.rotary_base == 500000.0 and cfg.rotary_scaling is not None
    assert (cfg.rotary_scaling.kind, cfg.rotary_scaling.factor) == ("llama3", 32.0)
    assert cfg.rotary_scaling.original_context == 8192


def test_published_mistral_qwen2_and_gemma_configs_convert() -> None:
    """Published ``config.json``s (older layouts, no ``layer_types``) pass the allow-lists and
    get Hugging Face's windows: Mistral's on every layer, none for Qwen2.5 (its window is
    switched off), Gemma-2's on the even layers."""
    from mitk.model.pretrained.gemma import gemma_config
    from mitk.model.pretrained.llama import llama_config

    common = {"attention_dropout": 0.0, "bos_token_id": 1, "eos_token_id": 2,
              "initializer_range": 0.02, "torch_dtype": "bfloat16", "use_cache": True,
              "transformers_version": "4.42.4"}  # fmt: skip
    mistral = {**common, "architectures": ["MistralForCausalLM"], "hidden_act": "silu",
               "hidden_size": 4096, "intermediate_size": 14336, "head_dim": None,
               "max_position_embeddings": 32768, "model_type": "mistral",
               "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8,
               "rms_norm_eps": 1e-05, "rope_theta": 10000.0, "sliding_window": 4096,
               "tie_word_embeddings": False, "vocab_size": 32000}  # fmt: skip
    cfg = llama_config(mistral)
    assert (cfg.sliding_window, cfg.sliding_window_layers, cfg.d_head) == (4096, None, 128)
    qwen2 = {**common, "architectures": ["Qwen2ForCausalLM"], "hidden_act": "silu",
             "hidden_size": 896, "intermediate_size": 4864, "max_position_embeddings": 32768,
             "max_window_layers": 21, "model_type": "qwen2", "num_attention_heads": 14,
             "num_hidden_layers": 24, "num_key_value_heads": 2, "rms_norm_eps": 1e-06,
             "rope_theta": 1000000.0, "sliding_window": 32768, "tie_word_embeddings": True,
             "use_sliding_window": False, "vocab_size": 151936}  # fmt: skip
    assert llama_config(qwen2).sliding_window == 0
    # with the window switched on, HF windows the layers from max_window_layers on
    cfg = llama_config({**qwen2, "use_sliding_window": True})
    assert cfg.sliding_window == 32768 and cfg.sliding_window_layers == [21, 22, 23]
    gemma2 = {**common, "architectures": ["Gemma2ForCausalLM"], "attention_bias": False,
              "attn_logit_softcapping": 50.0, "cache_implementation": "hybrid",
              "final_logit_softcapping": 30.0, "head_dim": 256,
              "hidden_act": "gelu_pytorch_tanh", "hidden_activation": "gelu_pytorch_tanh",
              "hidden_size": 2304, "intermediate_size": 9216, "max_position_embeddings": 8192,
              "model_type": "gemma2", "num_attention_heads": 8, "num_hidden_layers": 26,
              "num_key_value_heads": 4, "pad_token_id": 0, "query_pre_attn_scalar": 256,
              "rms_norm_eps": 1e-06, "rope_theta": 10000.0, "sliding_window": 4096,
              "vocab_size": 256000}  # fmt: skip
    cfg = gemma_config(gemma2)
    assert cfg.sliding_window == 4096 and cfg.sliding_window_layers == list(range(0, 26, 2))
    gemma = {**common, "architectures": ["GemmaForCausalLM"], "head_dim": 256,
             "hidden_act": "gelu", "hidden_size": 2048, "intermediate_size": 16384,
             "max_position_embeddings": 8192, "model_type": "gemma", "num_attention_heads": 8,
             "num_hidden_layers": 18, "num_key_value_heads": 1, "pad_token_id": 0,
             "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 10000.0,
             "vocab_size": 256000}  # fmt: skip
    assert gemma_config(gemma).act_fn == "gelu_tanh"


def _broken_copy(model: HookedTransformer, **changes: Any) -> HookedTransformer:
    """``model``'s weights under a config with ``changes``: what a wrong conversion would build."""
    broken = HookedTransformer(model.cfg.replace(**changes), seed=None)
    broken.load_state_dict(model.state_dict())
    return broken.eval()


@pytest.mark.parametrize(
    ("family", "changes"),
    [
        ("gemma3-local-global-linear-8-logit-softcap", {"rotary_local_base": 10000.0}),
        ("gemma3-local-global-linear-8-logit-softcap", {"rotary_local_layers": None}),
        ("gemma3-local-global-linear-8-logit-softcap", {"rotary_local_layers": [0, 1, 2]}),
        ("gemma3-local-global-linear-8-logit-softcap", {"rotary_scaling": None}),
        ("smollm3-nope-on-layer-1", {"no_rotary_layers": None}),
        ("smollm3-nope-on-layer-1", {"no_rotary_layers": [0]}),
    ],
    ids=["local-base-is-global", "no-local-layers", "global-layer-local", "global-unscaled",
         "nope-layer-rotates", "nope-on-wrong-layer"],
)  # fmt: skip
def test_a_wrong_per_layer_rotary_fails_parity(
    family: str, changes: dict[str, Any], tmp_path: Path
) -> None:
    """Each layer's own base, scaling and NoPE flag matter: any one wrong breaks parity."""
    torch.manual_seed(0)
    hf = _randomised(FAMILIES[family](), seed=1)
    hf.save_pretrained(tmp_path, safe_serialization=True)
    hf.config._attn_implementation = "eager"
    model = HookedTransformer.from_pretrained(tmp_path)
    tokens, mask = token_batch(VOCAB, padded=True)
    assert_matches_hf(hf, model, tokens, mask, TOL)
    with pytest.raises(AssertionError, match="not close"):
        assert_matches_hf(hf, _broken_copy(model, **changes), tokens, mask, TOL)


@pytest.mark.parametrize(
    ("family", "changes"),
    [
        ("granite-multipliers-gqa", {"attn_scale": 0.25}),
        ("starcoder2-biased-window-4", {"sliding_window": 0}),
        ("starcoder2-biased-window-4", {"norm_eps": 1e-5}),
        ("stablelm-parallel-head-qk-layernorms", {"rotary_dim": 16}),
        ("stablelm-parallel-head-qk-layernorms", {"parallel_attn_mlp": False}),
        ("cohere-head-qk-layernorms-untied-biased", {"rotary_style": "neox"}),
    ],
    ids=["granite-attention-multiplier-ignored", "starcoder2-no-window",
         "starcoder2-default-eps", "stablelm-whole-head-rotary", "stablelm-sequential",
         "cohere-rotate-halves"],
)  # fmt: skip
def test_a_wrong_dense_family_choice_fails_parity(
    family: str, changes: dict[str, Any], tmp_path: Path
) -> None:
    """Granite's, StarCoder2's, StableLM's and Cohere's config choices each matter."""
    test_a_wrong_per_layer_rotary_fails_parity(family, changes, tmp_path)


def test_a_published_gemma_3_config_converts() -> None:
    """Gemma-3-1B's ``config.json`` (flat layout: ``rope_theta``, ``rope_local_base_freq``,
    ``sliding_window_pattern``) passes the allow-list: every 6th layer global and scaled."""
    from mitk.model.pretrained.gemma3 import gemma3_config

    hf = {"architectures": ["Gemma3ForCausalLM"], "attention_bias": False,
          "attention_dropout": 0.0, "attn_logit_softcapping": None, "bos_token_id": 2,
          "cache_implementation": "hybrid", "eos_token_id": [1, 106],
          "final_logit_softcapping": None, "head_dim": 256,
          "hidden_activation": "gelu_pytorch_tanh", "hidden_size": 1152,
          "initializer_range": 0.02, "intermediate_size": 6912,
          "max_position_embeddings": 32768, "model_type": "gemma3_text",
          "num_attention_heads": 4, "num_hidden_layers": 26, "num_key_value_heads": 1,
          "pad_token_id": 0, "query_pre_attn_scalar": 256, "rms_norm_eps": 1e-06,
          "rope_local_base_freq": 10000, "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
          "rope_theta": 1000000, "sliding_window": 512, "sliding_window_pattern": 6,
          "torch_dtype": "bfloat16", "transformers_version": "4.50.0.dev0", "use_cache": True,
          "vocab_size": 262144}  # fmt: skip
    cfg = gemma3_config(hf)
    global_layers = [5, 11, 17, 23]
    assert cfg.rotary_local_layers == [i for i in range(26) if i not in global_layers]
    assert cfg.sliding_window_layers == cfg.rotary_local_layers and cfg.sliding_window == 512
    assert (cfg.rotary_base, cfg.rotary_local_base) == (1e6, 1e4)
    assert cfg.rotary_scaling is not None and cfg.rotary_scaling.factor == 8.0
    assert cfg.rotary_of(5) == (1e6, cfg.rotary_scaling) and cfg.rotary_of(0) == (1e4, None)
    assert cfg.attn_scale == 256**-0.5 and cfg.qk_norm == "head" and cfg.sandwich_norms


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: _gemma3(rope_parameters={
            "full_attention": {"rope_type": "default", "rope_theta": 1e4},
            "sliding_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 100.0}}),
         "rope scaling 'linear' is not supported for gemma3_text"),
        (lambda: _gemma3(use_bidirectional_attention=True), "bidirectional"),
        (lambda: _gemma3(altup_coef_clip=1.0), "gemma3_text config field.*altup_coef_clip"),
        (lambda: _smollm3(clip_qkv=8.0), "smollm3 config field.*clip_qkv"),
    ],
    ids=["scaled-local-rope", "bidirectional", "gemma3-field", "smollm3-field"],
)  # fmt: skip
def test_unsupported_gemma3_and_smollm3_variants_are_refused(
    make: Any, message: str, tmp_path: Path
) -> None:
    make().save_pretrained(tmp_path, safe_serialization=True)
    with pytest.raises(UnsupportedModelError, match=message):
        HookedTransformer.from_pretrained(tmp_path)


def test_longrope_within_the_original_context_uses_the_short_factors(tmp_path: Path) -> None:
    """An 8-token batch (within Phi-3's original context) matches HF with the short factors:
    wrong short factors fail parity, wrong long ones do not (the 12-token batch reads those)."""
    torch.manual_seed(0)
    hf = _randomised(_phi3_longrope(), seed=1)
    hf.save_pretrained(tmp_path, safe_serialization=True)
    hf.config._attn_implementation = "eager"
    model = HookedTransformer.from_pretrained(tmp_path)
    scaling = model.cfg.rotary_scaling
    assert scaling is not None and scaling.kind == "longrope"
    tokens, mask = token_batch(VOCAB, padded=True)
    short = tokens[:, :ORIGINAL_CONTEXT], mask[:, :ORIGINAL_CONTEXT]
    assert_matches_hf(hf, model, *short, TOL)
    assert_matches_hf(hf, model, tokens, mask, TOL)
    doubled = [2 * f for f in scaling.short_factor or ()]
    wrong_long = _broken_copy(model, rotary_scaling=scaling.replace(long_factor=doubled))
    assert_matches_hf(hf, wrong_long, *short, TOL)
    wrong_short = _broken_copy(model, rotary_scaling=scaling.replace(short_factor=doubled))
    with pytest.raises(AssertionError, match="not close"):
        assert_matches_hf(hf, wrong_short, *short, TOL)


def test_longrope_generation_reruns_at_the_switch_only_where_hf_does() -> None:
    """HF's Phi-3 ``generate`` reruns the sequence when it passes the original context; its
    LLaMA keeps the keys it cached with the short factors."""
    from mitk.model.pretrained.llama import llama_config
    from mitk.model.pretrained.phi3 import phi3_config

    phi3 = phi3_config(_phi3_longrope().config.to_dict()).rotary_scaling
    llama = llama_config(_scaled_llama("longrope").config.to_dict()).rotary_scaling
    assert phi3 is not None and phi3.recompute_at_switch
    assert llama is not None and not llama.recompute_at_switch


def test_a_published_phi_3_config_converts() -> None:
    """Phi-3-mini-128k's ``config.json`` layout (``rope_scaling`` of the old type ``su``, a
    top-level ``original_max_position_embeddings``, ``auto_map``) converts to LongRoPE.
    The factor lists here are stand-ins of the published length (48: 96-wide heads)."""
    from mitk.model.pretrained.phi3 import phi3_config

    hf = {"_name_or_path": "Phi-3-mini-128k-instruct", "architectures": ["Phi3ForCausalLM"],
          "attention_dropout": 0.0,
          "auto_map": {"AutoConfig": "configuration_phi3.Phi3Config",
                       "AutoModelForCausalLM": "modeling_phi3.Phi3ForCausalLM"},
          "bos_token_id": 1, "embd_pdrop": 0.0, "eos_token_id": 32000, "hidden_act": "silu",
          "hidden_size": 3072, "initializer_range": 0.02, "intermediate_size": 8192,
          "max_position_embeddings": 131072, "model_type": "phi3", "num_attention_heads": 32,
          "num_hidden_layers": 32, "num_key_value_heads": 32,
          "original_max_position_embeddings": 4096, "pad_token_id": 32000, "resid_pdrop": 0.0,
          "rms_norm_eps": 1e-05,
          "rope_scaling": {"long_factor": [1.0 + i / 8 for i in range(48)],
                           "short_factor": [1.0 + i / 100 for i in range(48)], "type": "su"},
          "rope_theta": 10000.0, "sliding_window": 262144, "tie_word_embeddings": False,
          "torch_dtype": "bfloat16", "transformers_version": "4.40.2", "use_cache": True,
          "attention_bias": False, "vocab_size": 32064}  # fmt: skip
    cfg = phi3_config(hf)
    scaling = cfg.rotary_scaling
    assert scaling is not None and scaling.kind == "longrope"
    assert (scaling.original_context, scaling.factor) == (4096, 32.0)
    assert scaling.attention_factor == pytest.approx((1 + math.log(32) / math.log(4096)) ** 0.5)
    assert scaling.long_factor == hf["rope_scaling"]["long_factor"]
    assert (cfg.d_head, cfg.rotary_dim, cfg.sliding_window) == (96, 96, 262144)
    assert not cfg.attn_qkv_bias and not cfg.attn_out_bias and cfg.gated_mlp


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: _phi3(mup_width_multiplier=2.0), "phi3 config field.*mup_width_multiplier"),
        (lambda: _phi3(attention_bias=True), "attention_bias are true"),
        (lambda: _phi3(original_max_position_embeddings=ORIGINAL_CONTEXT, rope_parameters={
            "rope_type": "longrope", "short_factor": SHORT_FACTOR,
            "long_factor": [1.0] * 7 + [-1.0]}),
         "longrope long_factor must be a list of positive numbers"),
    ],
    ids=["phi3-field", "phi3-bias", "longrope-negative-factor"],
)  # fmt: skip
def test_unsupported_phi3_variants_are_refused(make: Any, message: str, tmp_path: Path) -> None:
    make().save_pretrained(tmp_path, safe_serialization=True)
    with pytest.raises(UnsupportedModelError, match=message):
        HookedTransformer.from_pretrained(tmp_path)
