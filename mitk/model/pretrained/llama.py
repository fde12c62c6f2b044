"""Hugging Face LLaMA, Mistral and Qwen2 checkpoints to mitk weights.

The three share one layout: RMSNorm, a gated (SwiGLU) MLP, rotary positions
(rotate-halves layout) and grouped-query attention with separate q/k/v
projections. They differ in biases (Qwen2 has q/k/v biases, LLaMA's are
optional) and in sliding-window attention (Mistral on every layer, Qwen2 on
the layers its ``layer_types`` name). LLaMA reads rotary scaling (Llama 3,
YaRN, linear, dynamic NTK, LongRoPE); the others refuse it. Qwen 3 and OLMo 2
(their own files) reuse this conversion with q/k norms, Phi-3 with packed projections.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from mitk.config import TransformerConfig
from mitk.errors import UnsupportedModelError
from mitk.model.pretrained import mappings, rope

LLAMA_FIELDS = frozenset({
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
    "num_attention_heads", "num_key_value_heads", "head_dim", "hidden_act",
    "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings", "rope_parameters",
    "rope_scaling", "rope_theta", "attention_bias", "mlp_bias",
    "pretraining_tp",  # splits the projections' matmuls only: the same function
})  # fmt: skip
"""``model_type="llama"`` fields the conversion reads or knows to be inert; others are refused."""
_SHARED_FIELDS = LLAMA_FIELDS - {"attention_bias", "mlp_bias", "pretraining_tp"}
KNOWN_FIELDS: dict[str, frozenset[str]] = {
    "llama": LLAMA_FIELDS,
    # Mistral windows every layer; HF's Mistral ignores layer_types, so they are refused
    "mistral": _SHARED_FIELDS | {"sliding_window"},
    # Qwen2 always has q/k/v biases (no attention_bias switch); HF reads head_dim if present
    "qwen2": _SHARED_FIELDS | {"use_sliding_window", "sliding_window", "max_window_layers",
                               "layer_types"},
}  # fmt: skip
"""Each family's allow-list (Gemma's is in ``gemma.py``; Qwen 3's, OLMo 2's... in their files)."""

SCALED_ROPE = frozenset({"llama", "qwen3", "olmo2", "gemma3_text", "smollm3", "phi3", "gpt_oss"})
"""Families whose rotary scaling is tested against Hugging Face (the rest refuse it)."""


def llama_config(hf: dict[str, Any], **overrides: Any) -> TransformerConfig:
    """TransformerConfig equivalent to a LLaMA, Mistral or Qwen2 ``config.json``."""
    if hf["model_type"] in KNOWN_FIELDS:
        mappings.refuse_unknown_fields(hf, KNOWN_FIELDS[hf["model_type"]])
    if hf["model_type"] == "qwen2":
        hf = _qwen2_layer_types(hf)
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
        **rope.rope_fields(hf, fields["d_head"], scaled=model_type in SCALED_ROPE),
        **_window_fields(hf),
        "attn_qkv_bias": model_type == "qwen2" or bool(hf.get("attention_bias", False)),
        # Mistral's and Qwen2's output projections never carry a bias
        "attn_out_bias": model_type not in ("mistral", "qwen2")
        and bool(hf.get("attention_bias", False)),
        "mlp_bias": False,
    }
    return TransformerConfig(**{**fields, **overrides})


def _window_fields(hf: dict[str, Any]) -> dict[str, Any]:
    """Mistral (and Mixtral) window every layer when ``sliding_window`` is set; Qwen2 per
    ``layer_types``."""
    window = hf.get("sliding_window") or 0
    if hf["model_type"] in ("mistral", "mixtral"):
        return {"sliding_window": window}
    layer_types = hf.get("layer_types") or []
    windowed = [i for i, kind in enumerate(layer_types) if kind == "sliding_attention"]
    unknown = set(layer_types) - {"sliding_attention", "full_attention"}
    if unknown:
        raise UnsupportedModelError(f"layer types {sorted(unknown)} are not supported")
    if not windowed or not window:
        return {}
    return {"sliding_window": window, "sliding_window_layers": windowed}


def _qwen2_layer_types(hf: dict[str, Any]) -> dict[str, Any]:
    """``hf`` read as HF's Qwen2 config reads it: no window unless ``use_sliding_window``, and
    (in configs without ``layer_types``) windows on the layers from ``max_window_layers`` on."""
    window = hf.get("sliding_window") if hf.get("use_sliding_window") else None
    layer_types = hf.get("layer_types")
    if layer_types is None:
        first = hf.get("max_window_layers", 28)  # HF's default
        windowed = [window is not None and i >= first for i in range(hf["num_hidden_layers"])]
        layer_types = ["sliding_attention" if w else "full_attention" for w in windowed]
    return {**hf, "sliding_window": window, "layer_types": layer_types}


def llama_state_dict(hf_state: dict[str, Tensor], cfg: TransformerConfig) -> dict[str, Tensor]:
    """Rename and transpose a ``*ForCausalLM`` (or bare ``*Model``) state dict to mitk names."""
    sd = mappings.without_prefix(hf_state, "model.")
    out = {
        **mappings.embeddings(sd, "embed_tokens"),
        **mappings.norm(sd, "norm", "ln_final", bias=False),
    }
    for layer, (hf, mk) in enumerate(mappings.layer_prefixes(cfg.n_layers, "layers.{}")):
        attn = f"{hf}.self_attn"
        out |= {
            **mappings.llama_attention(
                sd, attn, f"{mk}.attn", qkv_bias=cfg.attn_qkv_bias, out_bias=cfg.attn_out_bias
            ),
        }
        if not cfg.is_moe_layer(layer):  # MoE families (mixtral.py...) map their experts
            out |= mappings.llama_mlp(sd, hf, mk)
        if cfg.pre_norms:
            out |= mappings.block_norms(sd, hf, mk, bias=False)
        if cfg.qk_norm != "none":
            out |= mappings.qk_norms(sd, attn, f"{mk}.attn")
    return out
