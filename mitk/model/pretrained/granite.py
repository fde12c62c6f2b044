"""Hugging Face Granite checkpoints to mitk weights.

LLaMA's layout (see ``llama.py``) with four scalar multipliers, all folded into
the weights at load so the model is a standard one and every analysis reading
the weights stays exact:

- ``embedding_multiplier`` scales the embedding: folded into ``W_E``, so
  ``hook_embed`` sees what enters the stream (HF's ``hidden_states[0]``);
- ``residual_multiplier`` scales each sublayer's output before it is added:
  folded into ``W_O``/``b_O`` and ``W_out``, so ``hook_attn_out`` and
  ``hook_mlp_out`` are the writes and still sum to the residual stream;
- ``attention_multiplier`` replaces ``1/sqrt(d_head)``: it is ``cfg.attn_scale``;
- logits are divided by ``logits_scaling``: folded into ``W_U``.

The multipliers are recorded in ``cfg.extra["folded_multipliers"]``.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from mitk.config import TransformerConfig
from mitk.model.pretrained import mappings
from mitk.model.pretrained.llama import llama_config, llama_state_dict

MULTIPLIERS = ("embedding_multiplier", "residual_multiplier", "logits_scaling")
"""The multipliers folded into weights (``attention_multiplier`` becomes ``attn_scale``)."""
KNOWN_FIELDS = frozenset({
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
    "num_attention_heads", "num_key_value_heads", "hidden_act", "max_position_embeddings",
    "rms_norm_eps", "tie_word_embeddings", "rope_parameters", "rope_scaling", "rope_theta",
    "attention_bias", "mlp_bias", "attention_multiplier", *MULTIPLIERS,
})  # fmt: skip
"""``config.json`` fields the conversion reads or knows to be inert; others are refused
(a set ``mlp_bias`` is refused by ``llama_config``)."""


def granite_config(hf: dict[str, Any], **overrides: Any) -> TransformerConfig:
    """TransformerConfig equivalent to a Granite ``config.json`` (multipliers in ``extra``)."""
    mappings.refuse_unknown_fields(hf, KNOWN_FIELDS)
    folded = {name: float(hf.get(name, 1.0)) for name in MULTIPLIERS}
    fields = {
        "attn_scale": float(hf.get("attention_multiplier", 1.0)),
        "extra": {"source_model_type": "granite", "folded_multipliers": folded},
    }
    return llama_config(hf, **{**fields, **overrides})


def granite_state_dict(hf_state: dict[str, Tensor], cfg: TransformerConfig) -> dict[str, Tensor]:
    """Rename a ``GraniteForCausalLM`` state dict to mitk names, multipliers folded in."""
    folded = cfg.extra["folded_multipliers"]
    residual = folded["residual_multiplier"]
    scales = {
        "embed.W_E": folded["embedding_multiplier"],
        "unembed.W_U": 1.0 / folded["logits_scaling"],
    }
    out = llama_state_dict(hf_state, cfg)
    for name in out:
        if name.endswith(("attn.W_o_packed", "attn.b_o_param", "mlp.W_out", "mlp.b_out")):
            scales[name] = residual
    # scaled in fp32, then back to the checkpoint's dtype; new tensors, so tied W_E/W_U part
    return {
        name: (w.float() * scales[name]).to(w.dtype) if name in scales else w
        for name, w in out.items()
    }
