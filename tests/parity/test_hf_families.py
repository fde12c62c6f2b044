"""mitk against Hugging Face decoder families on the same tiny random weights (fp32, CPU).

Each family is built from its ``transformers`` config class, given non-trivial
norm weights and biases, written with ``save_pretrained`` and loaded back with
``HookedTransformer.from_pretrained``. Left-padded rows get HF position ids
counted over real tokens, which is what mitk derives from the mask.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from mitk import HookedTransformer
from mitk.errors import UnsupportedModelError
from tests.parity.hf_compare import assert_matches_hf, token_batch

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
}


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


@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "left-padded"])
def test_log_probs_and_every_residual_match(pair: Any, padded: bool) -> None:
    _, hf, model = pair
    tokens, mask = token_batch(VOCAB, padded)
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
    assert cache["blocks.0.attn.hook_v"].shape == (3, 12, n_kv, model.cfg.d_head)
    assert cache["blocks.0.attn.hook_q"].shape == (3, 12, model.cfg.n_heads, model.cfg.d_head)


def test_unsupported_architecture_lists_the_supported_ones(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text('{"model_type": "mamba"}')
    with pytest.raises(UnsupportedModelError, match=r"'mamba'.*supported: .*llama.*mistral"):
        HookedTransformer.from_pretrained(tmp_path)


def test_scaled_rope_is_refused(tmp_path: Path) -> None:
    hf = _llama(rope_scaling={"rope_type": "linear", "factor": 2.0})
    hf.save_pretrained(tmp_path, safe_serialization=True)
    with pytest.raises(UnsupportedModelError, match="rope scaling 'linear'"):
        HookedTransformer.from_pretrained(tmp_path)


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
