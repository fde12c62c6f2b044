"""Multi-head latent attention (DeepSeek-V2) against Hugging Face, tiny random weights (fp32).

Every layer here is dense (``first_k_dense_replace`` = layer count); the
mixture-of-experts variants are in the shared family suite
(``hf_moe_builders``). Query/key heads (16 wide: 12 non-rotary + 4
rotary) differ from value heads (8 wide), so shapes are checked too.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from mitk import HookedTransformer, hooks
from mitk.config import TransformerConfig
from mitk.errors import ConfigError, UnsupportedModelError
from tests.parity.hf_compare import assert_matches_hf, token_batch

TOL = 1e-4
VOCAB = 97
LAYERS = 2
TINY: dict[str, Any] = {
    "vocab_size": VOCAB,
    "max_position_embeddings": 64,
    "hidden_size": 64,
    "num_hidden_layers": LAYERS,
    "num_attention_heads": 4,
    "intermediate_size": 96,
    "kv_lora_rank": 24,
    "qk_nope_head_dim": 12,
    "qk_rope_head_dim": 4,
    "v_head_dim": 8,
    "first_k_dense_replace": LAYERS,
    "rope_theta": 500.0,
}
VARIANTS: dict[str, dict[str, Any]] = {
    "q-lora": {"q_lora_rank": 20},
    "plain-q-biased": {"q_lora_rank": None, "attention_bias": True},
}


def _deepseek(**kw: Any) -> nn.Module:
    from transformers import DeepseekV2Config, DeepseekV2ForCausalLM

    return DeepseekV2ForCausalLM(DeepseekV2Config(**{**TINY, **kw}))


def _randomised(model: nn.Module, seed: int) -> nn.Module:
    """HF inits norms to 1 and biases to 0: perturb them so parity covers those terms."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                param.add_(torch.randn(param.shape, generator=gen) * 0.1)
    return model.eval()


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def pair(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """(HF model in eager attention, mitk's load of its saved directory)."""
    torch.manual_seed(0)
    hf = _randomised(_deepseek(**VARIANTS[request.param]), seed=1)
    directory = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(directory, safe_serialization=True)
    hf.config._attn_implementation = "eager"
    return hf, HookedTransformer.from_pretrained(directory)


@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "left-padded"])
def test_log_probs_and_every_residual_match(pair: Any, padded: bool) -> None:
    hf, model = pair
    tokens, mask = token_batch(VOCAB, padded)
    assert_matches_hf(hf, model, tokens, mask, TOL)
    assert model.attention_paths() == ["sdpa"] * LAYERS


def test_fused_and_explicit_paths_agree(pair: Any) -> None:
    _, model = pair
    tokens, mask = token_batch(VOCAB, padded=True)
    with torch.no_grad():
        fused = model(tokens, attention_mask=mask)
        assert model.attention_paths() == ["sdpa"] * LAYERS
        with model.hooks(fwd_hooks=[(hooks.name("pattern", 1), lambda p, h: None)]):
            hooked = model(tokens, attention_mask=mask)
        assert model.attention_paths() == ["sdpa", "eager: hooked blocks.1.attn.hook_pattern"]
        with model.backend("eager"):
            explicit = model(tokens, attention_mask=mask)
    real = mask.bool()
    torch.testing.assert_close(fused[real], explicit[real], atol=1e-5, rtol=0)
    torch.testing.assert_close(fused[real], hooked[real], atol=1e-5, rtol=0)


def test_hook_shapes_include_the_latent(pair: Any) -> None:
    _, model = pair
    tokens, _ = token_batch(VOCAB, padded=False)
    kinds = ("kv_latent", "q", "k", "v", "rot_q", "rot_k", "z", "pattern")
    _, cache = model.run_with_cache(tokens, names_filter=[hooks.name(k, 0) for k in kinds])
    assert hooks.name("kv_latent", 0) == "blocks.0.attn.hook_kv_latent"
    assert cache["blocks.0.attn.hook_kv_latent"].shape == (3, 12, 24)
    for kind in ("q", "k", "rot_q", "rot_k"):
        assert cache[hooks.name(kind, 0)].shape == (3, 12, 4, 16)
    for kind in ("v", "z"):
        assert cache[hooks.name(kind, 0)].shape == (3, 12, 4, 8)
    assert cache["blocks.0.attn.hook_pattern"].shape == (3, 4, 12, 12)


def test_zeroing_the_latent_changes_the_output(pair: Any) -> None:
    _, model = pair
    tokens, _ = token_batch(VOCAB, padded=False)
    with torch.no_grad():
        clean = model(tokens)
        ablated = model.run_with_hooks(
            tokens, fwd_hooks=[("blocks.0.attn.hook_kv_latent", lambda a, h: torch.zeros_like(a))]
        )
    assert model.attention_paths() == ["sdpa"] * LAYERS  # the latent hook keeps the fused path
    assert (clean - ablated).abs().max() > 1e-3


def test_weight_views_and_processing_refuse_mla(pair: Any) -> None:
    _, model = pair
    for view in ("W_Q", "W_K", "W_V", "QK", "OV"):
        with pytest.raises(UnsupportedModelError, match="latent attention"):
            getattr(model, view)
    with pytest.raises(UnsupportedModelError, match="latent attention"):
        model.process_weights(fold_ln=True)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"norm_topk_prob": True}, "norm_topk_prob=True"),
        ({"topk_method": "noaux_tc"}, "topk_method 'noaux_tc'"),
        ({"moe_layer_freq": 2}, "moe_layer_freq=2"),
        ({"kv_quant": True}, "deepseek_v2 config field.*kv_quant"),
    ],
)
def test_unsupported_moe_variants_are_refused(
    fields: dict[str, Any], message: str, tmp_path: Path
) -> None:
    _deepseek(first_k_dense_replace=1, n_routed_experts=4, num_experts_per_tok=2,
              moe_intermediate_size=16, n_shared_experts=1).save_pretrained(tmp_path)  # fmt: skip
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, **fields}))
    with pytest.raises(UnsupportedModelError, match=message):
        HookedTransformer.from_pretrained(tmp_path)


def test_scaled_rope_is_refused(tmp_path: Path) -> None:
    yarn = {"rope_type": "yarn", "factor": 2.0, "rope_theta": 500.0,
            "original_max_position_embeddings": 32, "mscale_all_dim": 1.0}  # fmt: skip
    _deepseek(rope_parameters=yarn).save_pretrained(tmp_path)
    with pytest.raises(UnsupportedModelError, match="rope scaling 'yarn'"):
        HookedTransformer.from_pretrained(tmp_path)


@pytest.mark.parametrize(
    ("change", "message"),
    [({"kv_lora_rank": 0}, "kv_lora_rank"), ({"positional": "learned"}, "rotary"),
     ({"rotary_dim": 16}, "rotary_dim < d_head"), ({"n_key_value_heads": 2}, "per query head")],
)  # fmt: skip
def test_mla_config_is_validated(change: dict[str, Any], message: str) -> None:
    base = {"d_model": 64, "n_layers": 1, "n_heads": 4, "d_vocab": VOCAB, "n_ctx": 64,
            "d_head": 16, "positional": "rotary", "rotary_dim": 4, "attention_type": "mla",
            "kv_lora_rank": 24, "v_head_dim": 8}  # fmt: skip
    TransformerConfig(**base)
    with pytest.raises(ConfigError, match=message):
        TransformerConfig(**{**base, **change})
