"""Hugging Face GPT-NeoX (Pythia) checkpoints to mitk weights.

GPT-NeoX runs attention and MLP in parallel off the same residual (unless
``use_parallel_residual`` is off), rotates only the first
``partial_rotary_factor`` of each head (rotate-halves layout), and packs its
fused q/k/v projection head by head (``[head, (q|k|v), d_head]``), unlike
mitk's ``[(q heads) | (k heads) | (v heads)]``; ``mappings.per_head_qkv`` reorders it.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from mitk.config import TransformerConfig
from mitk.model.pretrained import mappings, rope

KNOWN_FIELDS = frozenset({
    "attention_bias", "hidden_act", "hidden_size", "intermediate_size", "layer_norm_eps",
    "max_position_embeddings", "num_attention_heads", "num_hidden_layers", "rope_parameters",
    "rope_scaling", "rope_theta", "rotary_pct", "rotary_emb_base", "partial_rotary_factor",
    "tie_word_embeddings", "use_parallel_residual", "vocab_size",
    *mappings.INERT_TRAINING_FIELDS,
})  # fmt: skip
"""``config.json`` fields the conversion reads or knows to be inert; others are refused."""


def neox_config(hf: dict[str, Any], **overrides: Any) -> TransformerConfig:
    """TransformerConfig equivalent to a GPT-NeoX ``config.json``."""
    mappings.refuse_unknown_fields(hf, KNOWN_FIELDS)
    fields = mappings.decoder_fields(hf, mappings.ConfigNames(), "gpt_neox")
    bias = bool(hf.get("attention_bias", True))
    fields |= {
        # HF's default when a config names no fraction: a quarter of each head rotates
        **rope.rope_fields(hf, fields["d_head"], default_fraction=0.25),
        "parallel_attn_mlp": bool(hf.get("use_parallel_residual", True)),
        "attn_qkv_bias": bias,
        "attn_out_bias": bias,
    }
    return TransformerConfig(**{**fields, **overrides})


def neox_state_dict(hf_state: dict[str, Tensor], cfg: TransformerConfig) -> dict[str, Tensor]:
    """Rename, transpose and reorder a ``GPTNeoXForCausalLM`` state dict to mitk names."""
    sd = mappings.without_prefix(hf_state, "gpt_neox.")
    out = {
        **mappings.embeddings(sd, "embed_in", heads=("embed_out", "lm_head")),
        **mappings.norm(sd, "final_layer_norm", "ln_final"),
    }
    for hf, mk in mappings.layer_prefixes(cfg.n_layers, "layers.{}"):
        out |= mappings.megatron_block(sd, hf, mk, "attention", cfg.n_heads, bias=cfg.attn_qkv_bias)
    return out
