"""Hugging Face Mixtral checkpoints to mitk weights.

Mistral's attention and norms (see ``llama.py``) with every MLP a mixture of
``num_local_experts`` SwiGLU experts, ``num_experts_per_tok`` per token, their
softmax weights renormalised over the chosen ones. On disk the MoE lives at
``block_sparse_moe`` (experts ``w1``/``w3``/``w2``); in memory at ``mlp``.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from mitk.config import TransformerConfig
from mitk.model.pretrained import experts, mappings
from mitk.model.pretrained.llama import llama_config, llama_state_dict

KNOWN_FIELDS = frozenset({
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
    "num_attention_heads", "num_key_value_heads", "head_dim", "hidden_act",
    "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings", "rope_parameters",
    "rope_scaling", "rope_theta", "sliding_window", "num_local_experts", "num_experts_per_tok",
    # training-only: the load-balancing loss and router noise do not touch an eval forward
    "output_router_logits", "router_aux_loss_coef", "router_jitter_noise",
})  # fmt: skip
"""``config.json`` fields the conversion reads or knows to be inert; others are refused."""


def mixtral_config(hf: dict[str, Any], **overrides: Any) -> TransformerConfig:
    """TransformerConfig equivalent to a Mixtral ``config.json``."""
    mappings.refuse_unknown_fields(hf, KNOWN_FIELDS)
    moe = experts.moe_config(hf, hf["num_local_experts"], hf["intermediate_size"])
    return llama_config(hf, **{"moe": moe, **overrides})


def mixtral_state_dict(hf_state: dict[str, Tensor], cfg: TransformerConfig) -> dict[str, Tensor]:
    """Rename a ``MixtralForCausalLM`` state dict (fused or per-expert experts) to mitk names."""
    assert cfg.moe is not None
    out = llama_state_dict(hf_state, cfg)
    sd = mappings.without_prefix(hf_state, "model.")
    for hf, mk in mappings.layer_prefixes(cfg.n_layers, "layers.{}"):
        on_disk = f"{hf}.block_sparse_moe.gate.weight" in sd
        moe = f"{hf}.block_sparse_moe" if on_disk else f"{hf}.mlp"
        names = experts.MIXTRAL_EXPERT_NAMES
        out |= experts.router(sd, f"{moe}.gate", f"{mk}.mlp")
        out |= experts.experts(sd, f"{moe}.experts", f"{mk}.mlp", cfg.moe.n_experts, names)
    return out
