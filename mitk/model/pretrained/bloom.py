"""Hugging Face BLOOM checkpoints to mitk weights.

BLOOM has no positional embedding: ALiBi biases every head's scores. A
LayerNorm follows the token embedding (mitk's ``embed_norm``, module
``ln_embed``), q/k/v are packed head by head like GPT-NeoX's, and the
unembedding is tied to the embedding.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from mitk.config import TransformerConfig
from mitk.errors import UnsupportedModelError
from mitk.model.pretrained.neox import split_per_head_qkv

# ALiBi extrapolates, so BLOOM's config names no context length; this is only a default
DEFAULT_N_CTX = 2048


def bloom_config(hf: dict[str, Any], **overrides: Any) -> TransformerConfig:
    """TransformerConfig equivalent to a BLOOM ``config.json``."""
    if hf.get("apply_residual_connection_post_layernorm"):
        raise UnsupportedModelError(
            "BLOOM with apply_residual_connection_post_layernorm=True is not supported"
        )
    if hf.get("slow_but_exact") and hf.get("pretraining_tp", 1) > 1:
        raise UnsupportedModelError(
            "BLOOM with slow_but_exact tensor-parallel sums is not supported"
        )
    d_model, n_heads = hf.get("hidden_size") or hf["n_embed"], hf["n_head"]
    d_head = d_model // n_heads
    fields: dict[str, Any] = {
        "d_model": d_model,
        "n_layers": hf["n_layer"],
        "n_heads": n_heads,
        "d_head": d_head,
        "d_mlp": 4 * d_model,
        "d_vocab": hf["vocab_size"],
        "n_ctx": hf.get("seq_length") or DEFAULT_N_CTX,
        "act_fn": "gelu_tanh",  # BLOOM's own gelu is the tanh approximation
        "norm_eps": hf.get("layer_norm_epsilon", 1e-5),
        "positional": "alibi",
        "embed_norm": True,
        "attn_scale": d_head**-0.5,
        "architecture": "bloom",
        "extra": {"source_model_type": "bloom"},
    }
    fields.update(overrides)
    return TransformerConfig(**fields)


def bloom_state_dict(hf_state: dict[str, Tensor], cfg: TransformerConfig) -> dict[str, Tensor]:
    """Rename, transpose and reorder a ``BloomForCausalLM`` state dict to mitk names."""
    sd = {k.removeprefix("transformer."): v for k, v in hf_state.items()}
    out = {
        "embed.W_E": sd["word_embeddings.weight"],
        "ln_embed.w": sd["word_embeddings_layernorm.weight"],
        "ln_embed.b": sd["word_embeddings_layernorm.bias"],
        "ln_final.w": sd["ln_f.weight"],
        "ln_final.b": sd["ln_f.bias"],
        "unembed.W_U": sd.get("lm_head.weight", sd["word_embeddings.weight"]).T,
    }
    for layer in range(cfg.n_layers):
        hf, mk = f"h.{layer}.", f"blocks.{layer}."
        w_qkv, b_qkv = split_per_head_qkv(
            sd[hf + "self_attention.query_key_value.weight"],
            sd[hf + "self_attention.query_key_value.bias"],
            cfg.n_heads,
        )
        assert b_qkv is not None
        out |= {
            mk + "attn.W_qkv": w_qkv,
            mk + "attn.b_qkv": b_qkv,
            mk + "attn.W_o_packed": sd[hf + "self_attention.dense.weight"].T,
            mk + "attn.b_o_param": sd[hf + "self_attention.dense.bias"],
            mk + "ln1.w": sd[hf + "input_layernorm.weight"],
            mk + "ln1.b": sd[hf + "input_layernorm.bias"],
            mk + "ln2.w": sd[hf + "post_attention_layernorm.weight"],
            mk + "ln2.b": sd[hf + "post_attention_layernorm.bias"],
            mk + "mlp.W_in": sd[hf + "mlp.dense_h_to_4h.weight"].T,
            mk + "mlp.b_in": sd[hf + "mlp.dense_h_to_4h.bias"],
            mk + "mlp.W_out": sd[hf + "mlp.dense_4h_to_h.weight"].T,
            mk + "mlp.b_out": sd[hf + "mlp.dense_4h_to_h.bias"],
        }
    return out
