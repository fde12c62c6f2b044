"""Hugging Face gpt-oss checkpoints to mitk weights.

LLaMA's layout (see ``llama.py``) with biased q/k/v/o projections, YaRN rotary,
sliding-window and full layers by ``layer_types``, and three additions:

- attention sinks: one learned logit per head (``self_attn.sinks``) that joins
  every softmax (``cfg.attn_sinks``; see ``mitk.model.sinks``);
- every MLP a mixture of ``num_local_experts`` experts with a biased router:
  top-k of the router logits, softmax over the chosen ones (the same weights as
  renormalising the top-k of a softmax over all, ``MoEConfig.norm_top_k``);
- clamped SwiGLU experts with biases (``swiglu_limit``, ``swiglu_alpha``), their
  gate and up projections interleaved column by column in ``gate_up_proj``,
  stored ``[n_experts, d_in, d_out]`` (mitk's orientation) in memory and on disk.

Published checkpoints store the experts in MXFP4; their ``quantization_config``
is refused by name (dequantise first, e.g. by loading them in ``transformers``).
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
    "rope_scaling", "rope_theta", "attention_bias", "sliding_window", "layer_types",
    "num_local_experts", "num_experts", "num_experts_per_tok", "experts_per_token",
    "swiglu_alpha", "swiglu_limit",
    # training-only: the load-balancing loss does not touch an eval forward
    "output_router_logits", "router_aux_loss_coef",
})  # fmt: skip
"""``config.json`` fields the conversion reads or knows to be inert; others are refused."""


def gpt_oss_config(hf: dict[str, Any], **overrides: Any) -> TransformerConfig:
    """TransformerConfig equivalent to a gpt-oss ``config.json``."""
    mappings.refuse_unknown_fields(hf, KNOWN_FIELDS)
    hf = {**hf, "num_experts_per_tok": hf.get("num_experts_per_tok") or hf.get("experts_per_token")}
    moe = experts.moe_config(
        hf, hf.get("num_local_experts") or hf["num_experts"], hf["intermediate_size"],
        router_bias=True, expert_bias=True, clamp_limit=float(hf.get("swiglu_limit", 7.0)),
        clamp_alpha=float(hf.get("swiglu_alpha", 1.702)),
    )  # fmt: skip
    return llama_config(hf, **{"moe": moe, "attn_sinks": True, **overrides})


def gpt_oss_state_dict(hf_state: dict[str, Tensor], cfg: TransformerConfig) -> dict[str, Tensor]:
    """Rename a ``GptOssForCausalLM`` state dict to mitk names (sinks, router, experts)."""
    out = llama_state_dict(hf_state, cfg)
    sd = mappings.without_prefix(hf_state, "model.")
    for hf, mk in mappings.layer_prefixes(cfg.n_layers, "layers.{}"):
        mlp, moe = f"{hf}.mlp", f"{mk}.mlp"
        gate_up, gate_up_bias = (
            sd[f"{mlp}.experts.gate_up_proj"],
            sd[f"{mlp}.experts.gate_up_proj_bias"],
        )
        out |= {
            f"{mk}.attn.sinks": sd[f"{hf}.self_attn.sinks"],
            **experts.router(sd, f"{mlp}.router", moe, bias=True),
            # gate and up alternate column by column
            f"{moe}.W_gate": gate_up[..., ::2], f"{moe}.W_in": gate_up[..., 1::2],
            f"{moe}.b_gate": gate_up_bias[..., ::2], f"{moe}.b_in": gate_up_bias[..., 1::2],
            f"{moe}.W_out": sd[f"{mlp}.experts.down_proj"],
            f"{moe}.b_out": sd[f"{mlp}.experts.down_proj_bias"],
        }  # fmt: skip
    return out
