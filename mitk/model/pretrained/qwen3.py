"""Hugging Face Qwen 3 checkpoints to mitk weights.

LLaMA's layout (see ``llama.py``) with an RMSNorm on each query and key head
(``d_head`` wide) before rotary: ``cfg.qk_norm = "head"``, weights under
``attn.q_norm``/``attn.k_norm``. Windows follow ``layer_types`` as in Qwen2.
"""

from __future__ import annotations

from typing import Any

from mitk.config import TransformerConfig
from mitk.model.pretrained import mappings
from mitk.model.pretrained.llama import llama_config, llama_state_dict

KNOWN_FIELDS = frozenset({
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
    "num_attention_heads", "num_key_value_heads", "head_dim", "hidden_act",
    "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings", "rope_parameters",
    "rope_scaling", "rope_theta", "attention_bias", "use_sliding_window", "sliding_window",
    "max_window_layers", "layer_types",
})  # fmt: skip
"""``config.json`` fields the conversion reads or knows to be inert; others are refused."""


def qwen3_config(hf: dict[str, Any], **overrides: Any) -> TransformerConfig:
    """TransformerConfig equivalent to a Qwen 3 ``config.json``."""
    mappings.refuse_unknown_fields(hf, KNOWN_FIELDS)
    return llama_config(hf, **{"qk_norm": "head", **overrides})


qwen3_state_dict = llama_state_dict
"""Qwen 3's weights are LLaMA's plus ``q_norm``/``k_norm``, which ``llama_state_dict`` reads."""
