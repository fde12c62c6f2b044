"""Hugging Face SmolLM3 checkpoints to mitk weights.

LLaMA's layout (see ``llama.py``) with rotary left out on some layers (NoPE):
``no_rope_layers`` holds a 1 for each layer that rotates and a 0 for one that
does not (absent, every ``no_rope_layer_interval``-th layer does not), which
becomes ``cfg.no_rotary_layers``. Windows apply only with
``use_sliding_window``, on the layers ``layer_types`` marks.
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
    "rope_scaling", "rope_theta", "attention_bias", "mlp_bias", "use_sliding_window",
    "sliding_window", "layer_types", "no_rope_layers", "no_rope_layer_interval",
    "max_window_layers",  # read by no SmolLM3 forward: windows follow layer_types
    "pretraining_tp",  # splits the projections' matmuls only: the same function
})  # fmt: skip
"""``config.json`` fields the conversion reads or knows to be inert; others are refused."""


def smollm3_config(hf: dict[str, Any], **overrides: Any) -> TransformerConfig:
    """TransformerConfig equivalent to a SmolLM3 ``config.json``."""
    mappings.refuse_unknown_fields(hf, KNOWN_FIELDS)
    uses_rope = hf.get("no_rope_layers")
    if uses_rope is None:
        interval = hf.get("no_rope_layer_interval", 4)
        uses_rope = [(i + 1) % interval != 0 for i in range(hf["num_hidden_layers"])]
    no_rotary = [i for i, rotates in enumerate(uses_rope) if not rotates]
    # HF windows a sliding_attention layer only while use_sliding_window is on
    window = hf.get("sliding_window") if hf.get("use_sliding_window") else None
    fields = {"no_rotary_layers": no_rotary or None}
    return llama_config({**hf, "sliding_window": window}, **{**fields, **overrides})


smollm3_state_dict = llama_state_dict
"""SmolLM3's weights are LLaMA's (every layer keeps its projections, rotary or not)."""
