"""Hugging Face Phi-3 checkpoints to mitk weights.

LLaMA's computation (see ``llama.py``: RMSNorm, SwiGLU, rotary, grouped-query
attention, no biases) with two projections packed: ``qkv_proj`` holds all
query rows, then all key rows, then all value rows (mitk's own ``W_qkv``
order), and ``gate_up_proj`` the gate's rows, then the up rows. A
``sliding_window`` applies to every layer. Rotary may be partial
(``partial_rotary_factor``) and scaled by LongRoPE (``rope_type`` ``longrope``;
older configs say ``su`` or ``yarn`` and mean the same, as Hugging Face reads
them), with ``original_max_position_embeddings`` at the top level.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from mitk.config import TransformerConfig
from mitk.errors import UnsupportedModelError
from mitk.model.pretrained import mappings
from mitk.model.pretrained.llama import llama_config

KNOWN_FIELDS = frozenset({
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
    "num_attention_heads", "num_key_value_heads", "head_dim", "hidden_act",
    "max_position_embeddings", "original_max_position_embeddings", "rms_norm_eps",
    "tie_word_embeddings", "rope_parameters", "rope_scaling", "rope_theta",
    "partial_rotary_factor", "sliding_window",
    "resid_pdrop", "embd_pdrop",  # dropout: inert at inference
    "attention_bias", "mlp_bias", "lm_head_bias",  # HF's Phi-3 builds none: refused when true
    "auto_map",  # the hub's remote code, which HF's own Phi3 implementation replaces
})  # fmt: skip
"""``config.json`` fields the conversion reads or knows to be inert; others are refused."""

_LONGROPE_ALIASES = ("su", "yarn")
"""Older Phi-3 ``rope_scaling`` types that Hugging Face reads as ``longrope``."""


def phi3_config(hf: dict[str, Any], **overrides: Any) -> TransformerConfig:
    """TransformerConfig equivalent to a Phi-3 ``config.json``."""
    mappings.refuse_unknown_fields(hf, KNOWN_FIELDS)
    biased = [key for key in ("attention_bias", "mlp_bias", "lm_head_bias") if hf.get(key)]
    if biased:
        raise UnsupportedModelError(
            f"phi3 config field(s) {', '.join(biased)} are true, but Hugging Face's Phi-3 has no "
            "biases: the checkpoint's would be dropped"
        )
    hf = {**hf, **_longrope_named(hf)}
    fields = {"sliding_window": hf.get("sliding_window") or 0, "attn_qkv_bias": False,
              "attn_out_bias": False}  # fmt: skip
    return llama_config(hf, **{**fields, **overrides})


def _longrope_named(hf: dict[str, Any]) -> dict[str, Any]:
    """The rope dict with an old ``su``/``yarn`` type renamed ``longrope`` (empty if none)."""
    for key in ("rope_parameters", "rope_scaling"):
        params = hf.get(key)
        if params and params.get("rope_type", params.get("type")) in _LONGROPE_ALIASES:
            renamed = {k: v for k, v in params.items() if k != "type"}
            return {key: {**renamed, "rope_type": "longrope"}}
    return {}


def phi3_state_dict(hf_state: dict[str, Tensor], cfg: TransformerConfig) -> dict[str, Tensor]:
    """Rename, unpack and transpose a ``Phi3ForCausalLM`` (or bare ``Phi3Model``) state dict."""
    sd = mappings.without_prefix(hf_state, "model.")
    out = {
        **mappings.embeddings(sd, "embed_tokens"),
        **mappings.norm(sd, "norm", "ln_final", bias=False),
    }
    for hf, mk in mappings.layer_prefixes(cfg.n_layers, "layers.{}"):
        attn = f"{hf}.self_attn"
        out |= {
            **mappings.packed_qkv(sd, f"{attn}.qkv_proj", f"{mk}.attn", bias=False),
            **mappings.attn_out(sd, f"{attn}.o_proj", f"{mk}.attn", bias=False),
            **mappings.packed_gated_mlp(
                sd, f"{hf}.mlp.gate_up_proj", f"{hf}.mlp.down_proj", f"{mk}.mlp"
            ),
            **mappings.block_norms(sd, hf, mk, bias=False),
        }
    return out
