"""Hugging Face StableLM (``stablelm``, StableLM 2 and 3B-4E1T) checkpoints to mitk weights.

LLaMA's projections and SwiGLU MLP (see ``llama.py``) with:

- LayerNorms with biases (epsilon ``layer_norm_eps``);
- partial rotary in the rotate-halves layout (``partial_rotary_factor``, HF's
  default a quarter of each head);
- q/k/v biases when ``use_qkv_bias``, never an output bias;
- ``use_parallel_residual``: attention and MLP both read one shared norm of the
  stream (``input_layernorm``, copied into ``ln1`` and ``ln2``, as for GPT-J);
- ``qk_layernorm``: a bias-free LayerNorm on each query and key head, each head
  with its own weights (``cfg.qk_norm = "head_layernorm"``, weights ``[head, d_head]``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from mitk.config import TransformerConfig
from mitk.model.pretrained import mappings, rope

KNOWN_FIELDS = frozenset({
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
    "num_attention_heads", "num_key_value_heads", "hidden_act", "max_position_embeddings",
    "layer_norm_eps", "tie_word_embeddings", "rope_parameters", "rope_scaling", "rope_theta",
    "partial_rotary_factor", "use_qkv_bias", "qk_layernorm", "use_parallel_residual",
    "hidden_dropout",  # training only
})  # fmt: skip
"""``config.json`` fields the conversion reads or knows to be inert; others are refused."""
NAMES = mappings.ConfigNames(default_act="silu")


def stablelm_config(hf: dict[str, Any], **overrides: Any) -> TransformerConfig:
    """TransformerConfig equivalent to a StableLM ``config.json``."""
    mappings.refuse_unknown_fields(hf, KNOWN_FIELDS)
    fields = mappings.decoder_fields(hf, NAMES, "stablelm")
    fields |= {
        "n_key_value_heads": hf.get("num_key_value_heads") or fields["n_heads"],
        "gated_mlp": True,
        # HF's default when a config names no fraction: a quarter of each head rotates
        **rope.rope_fields(hf, fields["d_head"], default_fraction=0.25),
        "parallel_attn_mlp": bool(hf.get("use_parallel_residual", False)),
        "attn_qkv_bias": bool(hf.get("use_qkv_bias", False)),
        "attn_out_bias": False,
        "mlp_bias": False,
        "qk_norm": "head_layernorm" if hf.get("qk_layernorm") else "none",
    }
    return TransformerConfig(**{**fields, **overrides})


def stablelm_state_dict(hf_state: dict[str, Tensor], cfg: TransformerConfig) -> dict[str, Tensor]:
    """Rename and transpose a ``StableLmForCausalLM`` state dict to mitk names."""
    sd = mappings.without_prefix(hf_state, "model.")
    out = {**mappings.embeddings(sd, "embed_tokens"), **mappings.norm(sd, "norm", "ln_final")}
    for hf, mk in mappings.layer_prefixes(cfg.n_layers, "layers.{}"):
        attn = f"{hf}.self_attn"
        out |= {
            **mappings.llama_attention(
                sd, attn, f"{mk}.attn", qkv_bias=cfg.attn_qkv_bias, out_bias=False
            ),
            **mappings.llama_mlp(sd, hf, mk),
        }
        if cfg.parallel_attn_mlp:  # one shared norm; copies, so each can be edited alone
            shared = mappings.norm(sd, f"{hf}.input_layernorm", f"{mk}.ln1")
            out |= shared | {k.replace(".ln1.", ".ln2."): v.clone() for k, v in shared.items()}
        else:
            out |= mappings.block_norms(sd, hf, mk)
        if cfg.qk_norm != "none":  # one nn.LayerNorm per head: stacked as [head, d_head]
            for which, heads in (("q", cfg.n_heads), ("k", cfg.n_key_value_heads)):
                norms = f"{attn}.{which}_layernorm.norms"
                w = torch.stack([sd[f"{norms}.{head}.weight"] for head in range(heads)])
                out |= mappings.bias_free_layernorm(w, f"{mk}.attn.{which}_norm")
    return out
