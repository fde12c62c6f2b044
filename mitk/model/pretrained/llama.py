"""Hugging Face LLaMA, Mistral and Qwen2 checkpoints to mitk weights.

The three share one layout: RMSNorm, a gated (SwiGLU) MLP, rotary positions
(rotate-halves layout) and grouped-query attention with separate q/k/v
projections. They differ in biases (Qwen2 has q/k/v biases, LLaMA's are
optional) and in sliding-window attention (Mistral on every layer, Qwen2 on
the layers its ``layer_types`` name).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from mitk.config import TransformerConfig
from mitk.errors import UnsupportedModelError
from mitk.model.pretrained.gpt2 import hf_activation
from mitk.model.pretrained.rope import rope_fields


def llama_config(hf: dict[str, Any], **overrides: Any) -> TransformerConfig:
    """TransformerConfig equivalent to a LLaMA, Mistral or Qwen2 ``config.json``."""
    model_type = hf["model_type"]
    d_model, n_heads = hf["hidden_size"], hf["num_attention_heads"]
    d_head = hf.get("head_dim") or d_model // n_heads
    if hf.get("mlp_bias"):
        raise UnsupportedModelError("MLP biases in a LLaMA-style model are not supported")
    qkv_bias = model_type == "qwen2" or bool(hf.get("attention_bias", False))
    fields: dict[str, Any] = {
        "d_model": d_model,
        "n_layers": hf["num_hidden_layers"],
        "n_heads": n_heads,
        "d_head": d_head,
        "d_mlp": hf["intermediate_size"],
        "n_key_value_heads": hf.get("num_key_value_heads") or n_heads,
        "d_vocab": hf["vocab_size"],
        "n_ctx": hf["max_position_embeddings"],
        "act_fn": hf_activation(hf.get("hidden_act", "silu")),
        "gated_mlp": True,
        "normalization": "rmsnorm",
        "norm_eps": hf.get("rms_norm_eps", 1e-6),
        **rope_fields(hf, d_head),
        **_window_fields(hf),
        "attn_qkv_bias": qkv_bias,
        "attn_out_bias": model_type == "llama" and bool(hf.get("attention_bias", False)),
        "mlp_bias": False,
        "attn_scale": d_head**-0.5,
        "architecture": model_type,
        "extra": {"source_model_type": model_type},
    }
    fields.update(overrides)
    return TransformerConfig(**fields)


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
    sd = {k.removeprefix("model."): v for k, v in hf_state.items()}
    out = embedding_and_unembedding(sd)
    for layer in range(cfg.n_layers):
        hf, mk = f"layers.{layer}.", f"blocks.{layer}."
        attn = hf + "self_attn."
        # mitk packs q, k, v as one [d_model, (n_q + 2 n_kv) d_head] matrix
        out[mk + "attn.W_qkv"] = torch.cat([sd[attn + f"{p}_proj.weight"] for p in "qkv"], dim=0).T
        if cfg.attn_qkv_bias:
            out[mk + "attn.b_qkv"] = torch.cat([sd[attn + f"{p}_proj.bias"] for p in "qkv"])
        out[mk + "attn.W_o_packed"] = sd[attn + "o_proj.weight"].T
        if cfg.attn_out_bias:
            out[mk + "attn.b_o_param"] = sd[attn + "o_proj.bias"]
        out |= norms_and_gated_mlp(sd, hf, mk)
    return out


def embedding_and_unembedding(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """A LLaMA-layout model's embedding, final RMSNorm and unembedding, under mitk names."""
    return {
        "embed.W_E": sd["embed_tokens.weight"],
        "ln_final.w": sd["norm.weight"],
        # tied checkpoints store no lm_head: the unembedding is the embedding
        "unembed.W_U": sd.get("lm_head.weight", sd["embed_tokens.weight"]).T,
    }


def norms_and_gated_mlp(sd: dict[str, Tensor], hf: str, mk: str) -> dict[str, Tensor]:
    """One LLaMA-style layer's two RMSNorms and SwiGLU MLP, under mitk names.

    ``hf`` and ``mk`` are the layer's key prefixes (``layers.L.``, ``blocks.L.``);
    the families built on LLaMA's layer layout (DeepSeek-V2's dense layers) share it.
    """
    return {
        mk + "ln1.w": sd[hf + "input_layernorm.weight"],
        mk + "ln2.w": sd[hf + "post_attention_layernorm.weight"],
        mk + "mlp.W_gate": sd[hf + "mlp.gate_proj.weight"].T,
        mk + "mlp.W_in": sd[hf + "mlp.up_proj.weight"].T,
        mk + "mlp.W_out": sd[hf + "mlp.down_proj.weight"].T,
    }
