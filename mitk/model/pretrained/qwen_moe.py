"""Hugging Face Qwen2-MoE and Qwen3-MoE checkpoints to mitk weights.

Qwen2's (``qwen2_moe``: q/k/v biases from ``qkv_bias``) or Qwen 3's
(``qwen3_moe``: per-head q/k norms) attention, with a mixture of
``num_experts`` SwiGLU experts on every ``decoder_sparse_step``-th layer not in
``mlp_only_layers`` (the others keep a dense ``intermediate_size`` MLP). The
chosen experts' softmax weights are renormalised only if ``norm_topk_prob``.
Qwen2-MoE adds a shared expert, gated by ``sigmoid(x w)``, that every token goes
through.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from mitk.config import TransformerConfig
from mitk.model.pretrained import experts, mappings
from mitk.model.pretrained.llama import llama_config, llama_state_dict

_COMMON = frozenset({
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
    "num_attention_heads", "num_key_value_heads", "hidden_act", "max_position_embeddings",
    "rms_norm_eps", "tie_word_embeddings", "rope_parameters", "rope_scaling", "rope_theta",
    "use_sliding_window", "sliding_window", "max_window_layers", "layer_types",
    "decoder_sparse_step", "moe_intermediate_size", "num_experts", "num_experts_per_tok",
    "norm_topk_prob", "mlp_only_layers",
    # training-only: the load-balancing loss does not touch an eval forward
    "output_router_logits", "router_aux_loss_coef",
})  # fmt: skip
KNOWN_FIELDS = {
    "qwen2_moe": _COMMON | {"qkv_bias", "shared_expert_intermediate_size"},
    "qwen3_moe": _COMMON | {"attention_bias", "head_dim", "num_local_experts"},
}
"""``config.json`` fields each conversion reads or knows to be inert; others are refused."""


def qwen_moe_config(hf: dict[str, Any], **overrides: Any) -> TransformerConfig:
    """TransformerConfig equivalent to a Qwen2-MoE or Qwen3-MoE ``config.json``."""
    model_type = hf["model_type"]
    mappings.refuse_unknown_fields(hf, KNOWN_FIELDS[model_type])
    n_experts = hf.get("num_experts") or hf["num_local_experts"]
    shared: dict[str, Any] = {}
    if d_shared := hf.get("shared_expert_intermediate_size"):
        shared = {"d_shared": d_shared, "shared_gate": True}
    moe = experts.moe_config(
        hf, n_experts, hf["moe_intermediate_size"], norm_top_k=bool(hf.get("norm_topk_prob")),
        layers=experts.sparse_layers(hf), **shared,
    )  # fmt: skip
    fields: dict[str, Any] = {"moe": moe}
    if model_type == "qwen2_moe":
        fields |= {"attn_qkv_bias": bool(hf.get("qkv_bias", True)), "attn_out_bias": False}
    else:
        fields |= {"qk_norm": "head"}
    return llama_config(hf, **{**fields, **overrides})


def qwen_moe_state_dict(hf_state: dict[str, Tensor], cfg: TransformerConfig) -> dict[str, Tensor]:
    """Rename a ``Qwen2MoeForCausalLM``/``Qwen3MoeForCausalLM`` state dict to mitk names."""
    assert cfg.moe is not None
    out = llama_state_dict(hf_state, cfg)
    sd = mappings.without_prefix(hf_state, "model.")
    for layer, (hf, mk) in enumerate(mappings.layer_prefixes(cfg.n_layers, "layers.{}")):
        if not cfg.is_moe_layer(layer):
            continue
        out |= experts.router(sd, f"{hf}.mlp.gate", f"{mk}.mlp")
        out |= experts.experts(sd, f"{hf}.mlp.experts", f"{mk}.mlp", cfg.moe.n_experts)
        if cfg.moe.d_shared:
            gate = f"{hf}.mlp.shared_expert_gate"
            out |= experts.shared_expert(sd, f"{hf}.mlp.shared_expert", f"{mk}.mlp", gate)
    return out
