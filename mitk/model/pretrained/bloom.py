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
from mitk.model.pretrained import mappings

# ALiBi extrapolates, so BLOOM's config names no context length; this is only a default
DEFAULT_N_CTX = 2048


KNOWN_FIELDS = frozenset({
    "apply_residual_connection_post_layernorm", "hidden_size", "n_embed", "layer_norm_epsilon",
    "n_head", "n_layer", "n_inner", "pretraining_tp", "slow_but_exact", "seq_length",
    "tie_word_embeddings", "vocab_size", "unk_token_id",
    # Megatron kernel fusions and fp32 softmax: the same function
    "attention_softmax_in_fp32", "bias_dropout_fusion", "masked_softmax_fusion", "offset_alibi",
    "skip_bias_add", "skip_bias_add_qkv",
    *mappings.INERT_TRAINING_FIELDS,
})  # fmt: skip
"""``config.json`` fields the conversion reads or knows to be inert; others are refused."""


def bloom_config(hf: dict[str, Any], **overrides: Any) -> TransformerConfig:
    """TransformerConfig equivalent to a BLOOM ``config.json``."""
    mappings.refuse_unknown_fields(hf, KNOWN_FIELDS)
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
    sd = mappings.without_prefix(hf_state, "transformer.")
    out = {
        **mappings.embeddings(sd, "word_embeddings"),
        **mappings.norm(sd, "word_embeddings_layernorm", "ln_embed"),
        **mappings.norm(sd, "ln_f", "ln_final"),
    }
    for hf, mk in mappings.layer_prefixes(cfg.n_layers, "h.{}"):
        out |= mappings.megatron_block(sd, hf, mk, "self_attention", cfg.n_heads, bias=True)
    return out
