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
from mitk.model.pretrained import mappings


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
    # rope_fields refuses scaled rope (YaRN...), so the softmax scale needs no YaRN mscale
    rope = mappings.rope_fields(hf, d_rope)
    bias = bool(hf.get("attention_bias", False))
    fields = mappings.decoder_fields(
        hf, mappings.LLAMA_NAMES, "deepseek_v2", d_head=d_nope + d_rope
    )
    fields |= {
        "gated_mlp": True,
        "normalization": "rmsnorm",
        **rope,
        "rotary_style": "gptj",
        "attn_qkv_bias": bias,
        "attn_out_bias": bias,
        "mlp_bias": False,
        "attention_type": "mla",
        "q_lora_rank": hf.get("q_lora_rank") or 0,
        "kv_lora_rank": hf["kv_lora_rank"],
        "v_head_dim": hf["v_head_dim"],
        # Hugging Face's latent norms use their default epsilon, not rms_norm_eps
        "latent_norm_eps": 1e-6,
    }
    return TransformerConfig(**{**fields, **overrides})


def deepseek_state_dict(hf_state: dict[str, Tensor], cfg: TransformerConfig) -> dict[str, Tensor]:
    """Rename and transpose a ``DeepseekV2ForCausalLM`` (or bare model) state dict."""
    sd = mappings.without_prefix(hf_state, "model.")
    out = {
        **mappings.embeddings(sd, "embed_tokens"),
        **mappings.norm(sd, "norm", "ln_final", bias=False),
    }
    for hf, mk in mappings.layer_prefixes(cfg.n_layers, "layers.{}"):
        out |= _latent_attention(sd, f"{hf}.self_attn", f"{mk}.attn", cfg)
        out |= mappings.block_norms(sd, hf, mk, bias=False) | mappings.llama_mlp(sd, hf, mk)
    return out


def _latent_attention(
    sd: dict[str, Tensor], hf: str, mk: str, cfg: TransformerConfig
) -> dict[str, Tensor]:
    """One layer's latent attention: low-rank query and key-value paths, their norms, the output."""
    bias = cfg.attn_qkv_bias
    out: dict[str, Tensor] = {}
    if cfg.q_lora_rank:
        out |= mappings.linear(sd, f"{hf}.q_a_proj", f"{mk}.W_q_a", f"{mk}.b_q_a" if bias else None)
        out |= mappings.norm(sd, f"{hf}.q_a_layernorm", f"{mk}.q_norm", bias=False)
        out |= mappings.linear(sd, f"{hf}.q_b_proj", f"{mk}.W_q_b")
    else:
        out |= mappings.linear(sd, f"{hf}.q_proj", f"{mk}.W_q_packed")
    kv_a = mappings.linear(
        sd, f"{hf}.kv_a_proj_with_mqa", f"{mk}.W_kv_a", f"{mk}.b_kv_a" if bias else None
    )
    return {
        **out,
        **kv_a,
        **mappings.norm(sd, f"{hf}.kv_a_layernorm", f"{mk}.kv_norm", bias=False),
        **mappings.linear(sd, f"{hf}.kv_b_proj", f"{mk}.W_kv_b"),
        **mappings.attn_out(sd, f"{hf}.o_proj", mk, bias=cfg.attn_out_bias),
    }
