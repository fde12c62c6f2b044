"""Hugging Face GPT-NeoX (Pythia) checkpoints to mitk weights.

GPT-NeoX runs attention and MLP in parallel off the same residual (unless
``use_parallel_residual`` is off), rotates only the first
``partial_rotary_factor`` of each head (rotate-halves layout), and packs its
fused q/k/v projection head by head (``[head, (q|k|v), d_head]``), unlike
mitk's ``[(q heads) | (k heads) | (v heads)]``; ``per_head_qkv`` reorders it.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from mitk.config import TransformerConfig
from mitk.model.pretrained.mappings import (
    ConfigNames,
    attn_out,
    block_norms,
    decoder_fields,
    embeddings,
    layer_prefixes,
    mlp,
    norm,
    per_head_qkv,
    rope_fields,
    without_prefix,
)


def neox_config(hf: dict[str, Any], **overrides: Any) -> TransformerConfig:
    """TransformerConfig equivalent to a GPT-NeoX ``config.json``."""
    fields = decoder_fields(hf, ConfigNames(), "gpt_neox")
    bias = bool(hf.get("attention_bias", True))
    fields |= {
        # HF's default when a config names no fraction: a quarter of each head rotates
        **rope_fields(hf, fields["d_head"], default_fraction=0.25),
        "parallel_attn_mlp": bool(hf.get("use_parallel_residual", True)),
        "attn_qkv_bias": bias,
        "attn_out_bias": bias,
    }
    return TransformerConfig(**{**fields, **overrides})


def neox_state_dict(hf_state: dict[str, Tensor], cfg: TransformerConfig) -> dict[str, Tensor]:
    """Rename, transpose and reorder a ``GPTNeoXForCausalLM`` state dict to mitk names."""
    sd = without_prefix(hf_state, "gpt_neox.")
    out = {
        **embeddings(sd, "embed_in", heads=("embed_out", "lm_head")),
        **norm(sd, "final_layer_norm", "ln_final"),
    }
    for hf, mk in layer_prefixes(cfg.n_layers, "layers.{}"):
        attn = f"{hf}.attention"
        out |= {
            **per_head_qkv(
                sd, f"{attn}.query_key_value", f"{mk}.attn", cfg.n_heads, bias=cfg.attn_qkv_bias
            ),
            **attn_out(sd, f"{attn}.dense", f"{mk}.attn", bias=cfg.attn_out_bias),
            **block_norms(sd, hf, mk),
            **mlp(sd, f"{hf}.mlp.dense_h_to_4h", f"{hf}.mlp.dense_4h_to_h", f"{mk}.mlp"),
        }
    return out
