"""Hugging Face StarCoder2 checkpoints to mitk weights.

LLaMA's attention (separate q/k/v projections, grouped-query heads, rotary in
the rotate-halves layout) with GPT-2's other parts: LayerNorms with biases
(epsilon ``norm_epsilon``) and a plain, biased MLP (``c_fc``/``c_proj``).
``use_bias`` switches the biases of every projection (q/k/v, attention output,
MLP) together; a set ``sliding_window`` windows every layer, as in Mistral.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from mitk.config import TransformerConfig
from mitk.model.pretrained import mappings, rope

KNOWN_FIELDS = frozenset({
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
    "num_attention_heads", "num_key_value_heads", "hidden_act", "max_position_embeddings",
    "norm_epsilon", "tie_word_embeddings", "rope_parameters", "rope_scaling", "rope_theta",
    "sliding_window", "use_bias",
    "residual_dropout", "embedding_dropout",  # training only
    # labels early configs carry that HF's StarCoder2 never reads (it always builds
    # LayerNorms with norm_epsilon and the plain MLP)
    "mlp_type", "norm_type", "layer_norm_epsilon",
})  # fmt: skip
"""``config.json`` fields the conversion reads or knows to be inert; others are refused."""
NAMES = mappings.ConfigNames(default_act="gelu_pytorch_tanh", eps="norm_epsilon")


def starcoder2_config(hf: dict[str, Any], **overrides: Any) -> TransformerConfig:
    """TransformerConfig equivalent to a StarCoder2 ``config.json``."""
    mappings.refuse_unknown_fields(hf, KNOWN_FIELDS)
    fields = mappings.decoder_fields(hf, NAMES, "starcoder2")
    bias = bool(hf.get("use_bias", True))
    fields |= {
        "n_key_value_heads": hf.get("num_key_value_heads") or fields["n_heads"],
        **rope.rope_fields(hf, fields["d_head"]),
        "sliding_window": hf.get("sliding_window") or 0,
        "attn_qkv_bias": bias,
        "attn_out_bias": bias,
        "mlp_bias": bias,
    }
    return TransformerConfig(**{**fields, **overrides})


def starcoder2_state_dict(hf_state: dict[str, Tensor], cfg: TransformerConfig) -> dict[str, Tensor]:
    """Rename and transpose a ``Starcoder2ForCausalLM`` state dict to mitk names."""
    sd = mappings.without_prefix(hf_state, "model.")
    out = {**mappings.embeddings(sd, "embed_tokens"), **mappings.norm(sd, "norm", "ln_final")}
    for hf, mk in mappings.layer_prefixes(cfg.n_layers, "layers.{}"):
        attn = f"{hf}.self_attn"
        out |= {
            **mappings.llama_attention(
                sd, attn, f"{mk}.attn", qkv_bias=cfg.attn_qkv_bias, out_bias=cfg.attn_out_bias
            ),
            **mappings.block_norms(sd, hf, mk),
            **mappings.mlp(
                sd, f"{hf}.mlp.c_fc", f"{hf}.mlp.c_proj", f"{mk}.mlp", bias=cfg.mlp_bias
            ),
        }
    return out
