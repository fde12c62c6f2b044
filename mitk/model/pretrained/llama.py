"""Hugging Face LLaMA, Mistral and Qwen2 checkpoints to mitk weights.

The three share one layout: RMSNorm, a gated (SwiGLU) MLP, rotary positions
(rotate-halves layout) and grouped-query attention with separate q/k/v
projections. They differ in biases (Qwen2 has q/k/v biases, LLaMA's are
optional) and in sliding-window attention (Mistral on every layer, Qwen2 on
the layers its ``layer_types`` name). LLaMA reads rotary scaling (Llama 3,
YaRN, linear, dynamic NTK); the others refuse it. Qwen 3 and OLMo 2 (their own
files) reuse this conversion with q/k norms.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from mitk.config import TransformerConfig
from mitk.errors import UnsupportedModelError
from mitk.model.pretrained import mappings

LLAMA_FIELDS = frozenset({
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
    "num_attention_heads", "num_key_value_heads", "head_dim", "hidden_act",
    "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings", "rope_parameters",
    "rope_scaling", "rope_theta", "attention_bias", "mlp_bias",
    "pretraining_tp",  # splits the projections' matmuls only: the same function
})  # fmt: skip
"""``model_type="llama"`` fields the conversion reads or knows to be inert; others are refused.

Mistral and Qwen2 (and Gemma, which reuses this conversion) have no allow-list yet."""

SCALED_ROPE = frozenset({"llama", "qwen3", "olmo2", "gemma3_text", "smollm3"})
"""Families whose rotary scaling is tested against Hugging Face (the rest refuse it)."""


def llama_config(hf: dict[str, Any], **overrides: Any) -> TransformerConfig:
    """TransformerConfig equivalent to a LLaMA, Mistral or Qwen2 ``config.json``."""
    if hf["model_type"] == "llama":
        mappings.refuse_unknown_fields(hf, LLAMA_FIELDS)
    if hf.get("mlp_bias"):
        raise UnsupportedModelError("MLP biases in a LLaMA-style model are not supported")
    model_type = hf["model_type"]
    fields = mappings.decoder_fields(
        hf, mappings.LLAMA_NAMES, model_type, d_head=hf.get("head_dim")
    )
    fields |= {
        "n_key_value_heads": hf.get("num_key_value_heads") or fields["n_heads"],
        "gated_mlp": True,
        "normalization": "rmsnorm",
        **mappings.rope_fields(hf, fields["d_head"], scaled=model_type in SCALED_ROPE),
        **_window_fields(hf),
        "attn_qkv_bias": model_type == "qwen2" or bool(hf.get("attention_bias", False)),
        # Mistral's and Qwen2's output projections never carry a bias
        "attn_out_bias": model_type not in ("mistral", "qwen2")
        and bool(hf.get("attention_bias", False)),
        "mlp_bias": False,
    }
    return TransformerConfig(**{**fields, **overrides})


def _window_fields(hf: dict[str, Any]) -> dict[str, Any]:
    """Mistral windows every layer when ``sliding_window`` is set; Qwen2 per ``layer_types``."""
    window = hf.get("sliding_window") or 0
    if hf["model_type"] == "mistral":
        return {"sliding_window": window}
    layer_types = hf.get("layer_types") or []
    windowed = [i for i, kind in enumerate(layer_types) if kind == "sliding_attention"]
    unknown = set(layer_types) - {"sliding_attention", "full_attention"}
    if unknown:
        raise UnsupportedModelError(f"layer types {sorted(unknown)} are not supported")
    if not windowed or not window:
        return {}
    return {"sliding_window": window, "sliding_window_layers": windowed}


def llama_state_dict(hf_state: dict[str, Tensor], cfg: TransformerConfig) -> dict[str, Tensor]:
    """Rename and transpose a ``*ForCausalLM`` (or bare ``*Model``) state dict to mitk names."""
    sd = mappings.without_prefix(hf_state, "model.")
    out = {
        **mappings.embeddings(sd, "embed_tokens"),
        **mappings.norm(sd, "norm", "ln_final", bias=False),
    }
    for hf, mk in mappings.layer_prefixes(cfg.n_layers, "layers.{}"):
        attn = f"{hf}.self_attn"
        qkv = [f"{attn}.{p}_proj" for p in "qkv"]
        out |= {
            **mappings.separate_qkv(sd, qkv, f"{mk}.attn", bias=cfg.attn_qkv_bias),
            **mappings.attn_out(sd, f"{attn}.o_proj", f"{mk}.attn", bias=cfg.attn_out_bias),
            **mappings.llama_mlp(sd, hf, mk),
        }
        if cfg.pre_norms:
            out |= mappings.block_norms(sd, hf, mk, bias=False)
        if cfg.qk_norm != "none":
            out |= mappings.qk_norms(sd, attn, f"{mk}.attn")
    return out
