"""Hugging Face OLMo 2 checkpoints to mitk weights.

LLaMA's projections and SwiGLU MLP (see ``llama.py``) with three differences:
no norm before the sublayers (``cfg.pre_norms = False``), an RMSNorm on each
sublayer's output before it is added (``post_attention_layernorm`` is
``ln1_post``, ``post_feedforward_layernorm`` ``ln2_post``: Gemma-2's sandwich
norms without the bread's first slice), and RMSNorms over the whole query and
key projections before rotary (``cfg.qk_norm = "projection"``).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from mitk.config import TransformerConfig
from mitk.model.pretrained import mappings
from mitk.model.pretrained.llama import llama_config, llama_state_dict

KNOWN_FIELDS = frozenset({
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
    "num_attention_heads", "num_key_value_heads", "hidden_act", "max_position_embeddings",
    "rms_norm_eps", "tie_word_embeddings", "rope_parameters", "rope_scaling", "rope_theta",
    "attention_bias",
})  # fmt: skip
"""``config.json`` fields the conversion reads or knows to be inert; others are refused."""


def olmo2_config(hf: dict[str, Any], **overrides: Any) -> TransformerConfig:
    """TransformerConfig equivalent to an OLMo 2 ``config.json``."""
    mappings.refuse_unknown_fields(hf, KNOWN_FIELDS)
    fields = {"qk_norm": "projection", "pre_norms": False, "sandwich_norms": True}
    return llama_config(hf, **{**fields, **overrides})


def olmo2_state_dict(hf_state: dict[str, Tensor], cfg: TransformerConfig) -> dict[str, Tensor]:
    """Rename an ``Olmo2ForCausalLM`` state dict to mitk names (post-norms as ``ln*_post``)."""
    out = llama_state_dict(hf_state, cfg)
    sd = mappings.without_prefix(hf_state, "model.")
    for hf, mk in mappings.layer_prefixes(cfg.n_layers, "layers.{}"):
        out |= {
            **mappings.norm(sd, f"{hf}.post_attention_layernorm", f"{mk}.ln1_post", bias=False),
            **mappings.norm(sd, f"{hf}.post_feedforward_layernorm", f"{mk}.ln2_post", bias=False),
        }
    return out
