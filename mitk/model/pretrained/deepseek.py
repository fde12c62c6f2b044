"""Hugging Face DeepSeek-V2 checkpoints (``model_type`` ``deepseek_v2``) to mitk weights.

Multi-head latent attention (see ``mitk.model.latent_attention``), RMSNorm and
a gated (SwiGLU) MLP. Only dense layers are supported: a checkpoint whose
layers from ``first_k_dense_replace`` on are mixture-of-experts is refused.
Hugging Face rotates the decoupled rotary part in interleaved pairs (its
complex-number form), which is mitk's ``gptj`` rotary style.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from mitk.config import TransformerConfig
from mitk.errors import UnsupportedModelError
from mitk.model.pretrained.gpt2 import hf_activation
from mitk.model.pretrained.llama import embedding_and_unembedding, norms_and_gated_mlp
from mitk.model.pretrained.rope import rope_fields


def deepseek_config(hf: dict[str, Any], **overrides: Any) -> TransformerConfig:
    """TransformerConfig equivalent to a DeepSeek-V2 ``config.json`` (dense layers only)."""
    n_layers = hf["num_hidden_layers"]
    dense = hf.get("first_k_dense_replace", 0)
    if dense < n_layers:
        raise UnsupportedModelError(
            f"DeepSeek-V2 mixture-of-experts layers are not supported: first_k_dense_replace="
            f"{dense} < num_hidden_layers={n_layers} makes layers {dense}.. MoE"
        )
    if hf.get("mlp_bias"):
        raise UnsupportedModelError("MLP biases in a DeepSeek-V2 model are not supported")
    d_rope, d_nope = hf["qk_rope_head_dim"], hf["qk_nope_head_dim"]
    d_qk = d_nope + d_rope
    # rope_fields refuses scaled rope (YaRN...), so the softmax scale needs no YaRN mscale
    rope = rope_fields(hf, d_rope)
    bias = bool(hf.get("attention_bias", False))
    fields: dict[str, Any] = {
        "d_model": hf["hidden_size"],
        "n_layers": n_layers,
        "n_heads": hf["num_attention_heads"],
        "d_head": d_qk,
        "d_mlp": hf["intermediate_size"],
        "d_vocab": hf["vocab_size"],
        "n_ctx": hf["max_position_embeddings"],
        "act_fn": hf_activation(hf.get("hidden_act", "silu")),
        "gated_mlp": True,
        "normalization": "rmsnorm",
        "norm_eps": hf.get("rms_norm_eps", 1e-6),
        **rope,
        "rotary_style": "gptj",
        "attn_qkv_bias": bias,
        "attn_out_bias": bias,
        "mlp_bias": False,
        "attn_scale": d_qk**-0.5,
        "architecture": "deepseek_v2",
        "extra": {"source_model_type": "deepseek_v2"},
        "attention_type": "mla",
        "q_lora_rank": hf.get("q_lora_rank") or 0,
        "kv_lora_rank": hf["kv_lora_rank"],
        "v_head_dim": hf["v_head_dim"],
        # Hugging Face's latent norms use their default epsilon, not rms_norm_eps
        "latent_norm_eps": 1e-6,
    }
    fields.update(overrides)
    return TransformerConfig(**fields)


def deepseek_state_dict(hf_state: dict[str, Tensor], cfg: TransformerConfig) -> dict[str, Tensor]:
    """Rename and transpose a ``DeepseekV2ForCausalLM`` (or bare model) state dict."""
    sd = {k.removeprefix("model."): v for k, v in hf_state.items()}
    out = embedding_and_unembedding(sd)
    for layer in range(cfg.n_layers):
        hf, mk = f"layers.{layer}.", f"blocks.{layer}."
        attn, mla = hf + "self_attn.", mk + "attn."
        if cfg.q_lora_rank:
            out[mla + "W_q_a"] = sd[attn + "q_a_proj.weight"].T
            out[mla + "q_norm.w"] = sd[attn + "q_a_layernorm.weight"]
            out[mla + "W_q_b"] = sd[attn + "q_b_proj.weight"].T
            if cfg.attn_qkv_bias:
                out[mla + "b_q_a"] = sd[attn + "q_a_proj.bias"]
        else:
            out[mla + "W_q_packed"] = sd[attn + "q_proj.weight"].T
        out[mla + "W_kv_a"] = sd[attn + "kv_a_proj_with_mqa.weight"].T
        if cfg.attn_qkv_bias:
            out[mla + "b_kv_a"] = sd[attn + "kv_a_proj_with_mqa.bias"]
        out[mla + "kv_norm.w"] = sd[attn + "kv_a_layernorm.weight"]
        out[mla + "W_kv_b"] = sd[attn + "kv_b_proj.weight"].T
        out[mla + "W_o_packed"] = sd[attn + "o_proj.weight"].T
        if cfg.attn_out_bias:
            out[mla + "b_o_param"] = sd[attn + "o_proj.bias"]
        out |= norms_and_gated_mlp(sd, hf, mk)
    return out
