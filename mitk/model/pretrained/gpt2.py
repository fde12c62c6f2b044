"""Hugging Face GPT-2 checkpoints to mitk weights.

HF's ``Conv1D`` stores weights as ``[d_in, d_out]`` and packs q, k, v head by
head, which is exactly mitk's packed layout, so the conversion is a renaming.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from mitk.config import TransformerConfig
from mitk.errors import UnsupportedModelError
from mitk.model.pretrained import mappings

KNOWN_FIELDS = frozenset({
    "activation_function", "layer_norm_epsilon", "n_embd", "n_head", "n_inner", "n_layer",
    "n_positions", "n_ctx", "vocab_size", "tie_word_embeddings", "scale_attn_weights",
    "scale_attn_by_inverse_layer_idx",
    "reorder_and_upcast_attn",  # fp32 upcast of the scores: the same function
    *mappings.INERT_TRAINING_FIELDS,
})  # fmt: skip
"""``config.json`` fields the conversion reads or knows to be inert; others are refused."""


def gpt2_config(hf: dict[str, Any], **overrides: Any) -> TransformerConfig:
    """TransformerConfig equivalent to a GPT-2 ``config.json``."""
    mappings.refuse_unknown_fields(hf, KNOWN_FIELDS)
    if hf.get("scale_attn_by_inverse_layer_idx"):
        raise UnsupportedModelError("GPT-2 with scale_attn_by_inverse_layer_idx is not supported")
    if hf.get("add_cross_attention"):
        raise UnsupportedModelError("GPT-2 with cross-attention is not supported")
    fields = mappings.decoder_fields(hf, mappings.GPT2_NAMES, "gpt2")
    if not hf.get("scale_attn_weights", True):
        fields["attn_scale"] = 1.0
    return TransformerConfig(**{**fields, **overrides})


def gpt2_state_dict(hf_state: dict[str, Tensor], cfg: TransformerConfig) -> dict[str, Tensor]:
    """Rename a GPT-2 state dict (``GPT2Model`` or ``GPT2LMHeadModel``) to mitk names.

    The head is tied to the embedding in these checkpoints; mitk keeps its own copy.
    """
    sd = mappings.without_prefix(hf_state, "transformer.")
    out = {
        **mappings.embeddings(sd, "wte", position="wpe"),
        **mappings.norm(sd, "ln_f", "ln_final"),
    }
    for hf, mk in mappings.layer_prefixes(cfg.n_layers, "h.{}"):
        qkv = mappings.linear(
            sd, f"{hf}.attn.c_attn", f"{mk}.attn.W_qkv", f"{mk}.attn.b_qkv", transpose=False
        )
        out |= {
            **mappings.block_norms(sd, hf, mk, ("ln_1", "ln_2")),
            **qkv,
            **mappings.attn_out(sd, f"{hf}.attn.c_proj", f"{mk}.attn", bias=True, transpose=False),
            **mappings.mlp(sd, f"{hf}.mlp.c_fc", f"{hf}.mlp.c_proj", f"{mk}.mlp", transpose=False),
        }
    return out
