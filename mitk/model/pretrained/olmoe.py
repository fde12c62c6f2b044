"""Hugging Face OLMoE checkpoints to mitk weights.

LLaMA's pre-norm layout (see ``llama.py``) with RMSNorms over the whole query
and key projections before rotary (``cfg.qk_norm = "projection"``, as OLMo 2)
and every MLP a mixture of ``num_experts`` SwiGLU experts, renormalised over the
chosen ones only if ``norm_topk_prob``. ``clip_qkv`` (clamping the projections)
is refused when set.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from mitk.config import TransformerConfig
from mitk.errors import UnsupportedModelError
from mitk.model.pretrained import experts, mappings
from mitk.model.pretrained.llama import llama_config, llama_state_dict

KNOWN_FIELDS = frozenset({
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
    "num_attention_heads", "num_key_value_heads", "hidden_act", "max_position_embeddings",
    "rms_norm_eps", "tie_word_embeddings", "rope_parameters", "rope_scaling", "rope_theta",
    "attention_bias", "clip_qkv", "num_experts", "num_experts_per_tok", "norm_topk_prob",
    # training-only: the load-balancing loss does not touch an eval forward
    "output_router_logits", "router_aux_loss_coef",
})  # fmt: skip
"""``config.json`` fields the conversion reads or knows to be inert; others are refused."""


def olmoe_config(hf: dict[str, Any], **overrides: Any) -> TransformerConfig:
    """TransformerConfig equivalent to an OLMoE ``config.json``."""
    mappings.refuse_unknown_fields(hf, KNOWN_FIELDS)
    if hf.get("clip_qkv") is not None:
        raise UnsupportedModelError(f"olmoe clip_qkv={hf['clip_qkv']} is not supported")
    moe = experts.moe_config(
        hf, hf["num_experts"], hf["intermediate_size"], norm_top_k=bool(hf.get("norm_topk_prob"))
    )
    return llama_config(hf, **{"moe": moe, "qk_norm": "projection", **overrides})


def olmoe_state_dict(hf_state: dict[str, Tensor], cfg: TransformerConfig) -> dict[str, Tensor]:
    """Rename an ``OlmoeForCausalLM`` state dict (fused or per-expert experts) to mitk names."""
    assert cfg.moe is not None
    out = llama_state_dict(hf_state, cfg)
    sd = mappings.without_prefix(hf_state, "model.")
    for hf, mk in mappings.layer_prefixes(cfg.n_layers, "layers.{}"):
        out |= experts.router(sd, f"{hf}.mlp.gate", f"{mk}.mlp")
        out |= experts.experts(sd, f"{hf}.mlp.experts", f"{mk}.mlp", cfg.moe.n_experts)
    return out
