"""Hugging Face Cohere (Command R) checkpoints to mitk weights.

LLaMA's projections and SwiGLU MLP (see ``llama.py``) in a parallel block:

- attention and MLP both read one bias-free LayerNorm of the stream
  (``input_layernorm``, copied into ``ln1`` and ``ln2``, as for GPT-J); mitk's
  LayerNorms keep a bias, which is zero here (and for the final norm);
- rotary in interleaved pairs (``2i``, ``2i+1``: ``rotary_style = "gptj"``);
- logits are multiplied by ``logit_scale``: folded into ``W_U`` at load (recorded
  in ``cfg.extra["folded_multipliers"]``), so DLA reads the logits HF returns;
- ``use_qk_norm``: a bias-free LayerNorm on each query and key head with weights
  of its own (``cfg.qk_norm = "head_layernorm"``, weights ``[head, d_head]``).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from mitk.config import TransformerConfig
from mitk.errors import UnsupportedModelError
from mitk.model.pretrained import mappings, rope

KNOWN_FIELDS = frozenset({
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
    "num_attention_heads", "num_key_value_heads", "head_dim", "hidden_act",
    "max_position_embeddings", "layer_norm_eps", "tie_word_embeddings", "rope_parameters",
    "rope_scaling", "rope_theta", "attention_bias", "use_qk_norm", "logit_scale",
})  # fmt: skip
"""``config.json`` fields the conversion reads or knows to be inert; others are refused."""
NAMES = mappings.ConfigNames(default_act="silu")


def cohere_config(hf: dict[str, Any], **overrides: Any) -> TransformerConfig:
    """TransformerConfig equivalent to a Cohere ``config.json`` (``logit_scale`` in ``extra``)."""
    mappings.refuse_unknown_fields(hf, KNOWN_FIELDS)
    fields = mappings.decoder_fields(hf, NAMES, "cohere", d_head=hf.get("head_dim"))
    rotary = rope.rope_fields(hf, fields["d_head"])
    if rotary["rotary_dim"] != fields["d_head"]:  # HF's Cohere rotates whole heads regardless
        raise UnsupportedModelError("cohere with a partial_rotary_factor is not supported")
    bias = bool(hf.get("attention_bias", False))
    fields |= {
        **rotary,
        "n_key_value_heads": hf.get("num_key_value_heads") or fields["n_heads"],
        "rotary_style": "gptj",
        "gated_mlp": True,
        "parallel_attn_mlp": True,
        "attn_qkv_bias": bias,
        "attn_out_bias": bias,
        "mlp_bias": False,
        "qk_norm": "head_layernorm" if hf.get("use_qk_norm") else "none",
        "extra": {
            "source_model_type": "cohere",
            "folded_multipliers": {"logit_scale": float(hf.get("logit_scale", 0.0625))},
        },
    }
    return TransformerConfig(**{**fields, **overrides})


def cohere_state_dict(hf_state: dict[str, Tensor], cfg: TransformerConfig) -> dict[str, Tensor]:
    """Rename a ``CohereForCausalLM`` state dict to mitk names, ``logit_scale`` in ``W_U``."""
    sd = mappings.without_prefix(hf_state, "model.")
    out = {
        **mappings.embeddings(sd, "embed_tokens"),
        **mappings.bias_free_layernorm(sd["norm.weight"], "ln_final"),
    }
    w_u = out["unembed.W_U"]  # scaled in fp32, then back: a new tensor, so tied W_E stays
    scale = cfg.extra["folded_multipliers"]["logit_scale"]
    out["unembed.W_U"] = (w_u.float() * scale).to(w_u.dtype)
    for hf, mk in mappings.layer_prefixes(cfg.n_layers, "layers.{}"):
        attn = f"{hf}.self_attn"
        shared = sd[f"{hf}.input_layernorm.weight"]  # copies, so each can be edited alone
        out |= {
            **mappings.llama_attention(
                sd, attn, f"{mk}.attn", qkv_bias=cfg.attn_qkv_bias, out_bias=cfg.attn_out_bias
            ),
            **mappings.llama_mlp(sd, hf, mk),
            **mappings.bias_free_layernorm(shared, f"{mk}.ln1"),
            **mappings.bias_free_layernorm(shared.clone(), f"{mk}.ln2"),
        }
        if cfg.qk_norm != "none":  # HF's weights are already [head, d_head]
            for which in "qk":
                weight = sd[f"{attn}.{which}_norm.weight"]
                out |= mappings.bias_free_layernorm(weight, f"{mk}.attn.{which}_norm")
    return out
