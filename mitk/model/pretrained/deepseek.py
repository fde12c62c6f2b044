"""Hugging Face DeepSeek-V2 checkpoints (``model_type`` ``deepseek_v2``) to mitk weights.

Multi-head latent attention (see ``mitk.model.latent_attention``), RMSNorm and
a gated (SwiGLU) MLP, which from layer ``first_k_dense_replace`` on is a
mixture of ``n_routed_experts`` experts plus ``n_shared_experts`` shared ones
(one shared MLP ``n_shared_experts * moe_intermediate_size`` wide, ungated).
Routing is greedy or group-limited greedy (``topk_method``), the chosen
probabilities scaled by ``routed_scaling_factor`` and, as in Hugging Face's
implementation, never renormalised: a config asking for ``norm_topk_prob`` is
refused, since the original code and Hugging Face's disagree on it.
Hugging Face rotates the decoupled rotary part in interleaved pairs (its
complex-number form), which is mitk's ``gptj`` rotary style.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from mitk.config import MoEConfig, TransformerConfig
from mitk.errors import UnsupportedModelError
from mitk.model.pretrained import experts, mappings, rope

KNOWN_FIELDS = frozenset({
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
    "num_attention_heads", "num_key_value_heads", "hidden_act", "max_position_embeddings",
    "rms_norm_eps", "pretraining_tp", "tie_word_embeddings", "rope_parameters", "rope_scaling",
    "rope_theta", "attention_bias", "mlp_bias", "head_dim", "qk_head_dim", "kv_lora_rank",
    "q_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
    "first_k_dense_replace", "n_routed_experts", "n_shared_experts", "num_experts_per_tok",
    "moe_intermediate_size", "routed_scaling_factor", "topk_method", "n_group", "topk_group",
    "norm_topk_prob", "moe_layer_freq", "scoring_func",
    # training or placement only: load-balancing losses, expert parallelism, remote code
    "output_router_logits", "aux_loss_alpha", "seq_aux", "ep_size", "auto_map",
})  # fmt: skip
"""``config.json`` fields the conversion reads or knows to be inert; others are refused."""


def deepseek_config(hf: dict[str, Any], **overrides: Any) -> TransformerConfig:
    """TransformerConfig equivalent to a DeepSeek-V2 ``config.json``."""
    mappings.refuse_unknown_fields(hf, KNOWN_FIELDS)
    for key, expected in (("moe_layer_freq", 1), ("scoring_func", "softmax")):
        if hf.get(key, expected) != expected:  # Hugging Face's implementation assumes these
            raise UnsupportedModelError(f"deepseek_v2 {key}={hf[key]!r} is not supported")
    if hf.get("mlp_bias"):
        raise UnsupportedModelError("MLP biases in a DeepSeek-V2 model are not supported")
    d_rope, d_nope = hf["qk_rope_head_dim"], hf["qk_nope_head_dim"]
    # rope_fields refuses scaled rope (YaRN...), so the softmax scale needs no YaRN mscale
    rotary = rope.rope_fields(hf, d_rope)
    bias = bool(hf.get("attention_bias", False))
    fields = mappings.decoder_fields(
        hf, mappings.LLAMA_NAMES, "deepseek_v2", d_head=d_nope + d_rope
    )
    fields |= {
        "gated_mlp": True,
        "normalization": "rmsnorm",
        **rotary,
        "rotary_style": "gptj",
        "attn_qkv_bias": bias,
        "attn_out_bias": bias,
        "mlp_bias": False,
        "attention_type": "mla",
        "q_lora_rank": hf.get("q_lora_rank") or 0,
        "kv_lora_rank": hf["kv_lora_rank"],
        "v_head_dim": hf["v_head_dim"],
        # Hugging Face's latent norms use their default epsilon, not rms_norm_eps
        "latent_norm_eps": 1e-6,
        "moe": _moe(hf),
    }
    return TransformerConfig(**{**fields, **overrides})


TOPK_METHODS = ("greedy", "group_limited_greedy")


def _moe(hf: dict[str, Any]) -> MoEConfig | None:
    """The routing of layers ``first_k_dense_replace``.. (None when every layer is dense)."""
    n_layers, first = hf["num_hidden_layers"], hf.get("first_k_dense_replace") or 0
    if first >= n_layers or not hf.get("n_routed_experts"):
        return None
    if hf.get("norm_topk_prob"):
        raise UnsupportedModelError(
            "deepseek_v2 norm_topk_prob=True is not supported: Hugging Face's DeepSeek-V2 "
            "ignores it and the original code renormalises, so the intended routing is unclear"
        )
    method = hf.get("topk_method", "greedy")
    if method not in TOPK_METHODS:
        raise UnsupportedModelError(
            f"deepseek_v2 topk_method {method!r} is not supported; supported: {TOPK_METHODS}"
        )
    groups = {}
    if method == "group_limited_greedy":
        groups = {"n_groups": hf["n_group"], "top_groups": hf["topk_group"]}
    d_expert = hf["moe_intermediate_size"]
    return experts.moe_config(
        hf, hf["n_routed_experts"], d_expert, norm_top_k=False,
        routed_scale=float(hf.get("routed_scaling_factor") or 1.0),
        d_shared=d_expert * (hf.get("n_shared_experts") or 0),
        layers=list(range(first, n_layers)), **groups,
    )  # fmt: skip


def deepseek_state_dict(hf_state: dict[str, Tensor], cfg: TransformerConfig) -> dict[str, Tensor]:
    """Rename and transpose a ``DeepseekV2ForCausalLM`` (or bare model) state dict."""
    sd = mappings.without_prefix(hf_state, "model.")
    out = {
        **mappings.embeddings(sd, "embed_tokens"),
        **mappings.norm(sd, "norm", "ln_final", bias=False),
    }
    for layer, (hf, mk) in enumerate(mappings.layer_prefixes(cfg.n_layers, "layers.{}")):
        out |= _latent_attention(sd, f"{hf}.self_attn", f"{mk}.attn", cfg)
        out |= mappings.block_norms(sd, hf, mk, bias=False)
        if cfg.moe is None or not cfg.is_moe_layer(layer):
            out |= mappings.llama_mlp(sd, hf, mk)
            continue
        out |= experts.router(sd, f"{hf}.mlp.gate", f"{mk}.mlp")
        out |= experts.experts(sd, f"{hf}.mlp.experts", f"{mk}.mlp", cfg.moe.n_experts)
        if cfg.moe.d_shared:
            out |= experts.shared_expert(sd, f"{hf}.mlp.shared_experts", f"{mk}.mlp")
    return out


def _latent_attention(
    sd: dict[str, Tensor], hf: str, mk: str, cfg: TransformerConfig
) -> dict[str, Tensor]:
    """One layer's latent attention: low-rank query and key-value paths, their norms, the output."""
    bias = cfg.attn_qkv_bias
    out: dict[str, Tensor] = {}
    if cfg.q_lora_rank:
        out |= mappings.linear(sd, f"{hf}.q_a_proj", f"{mk}.W_q_a", f"{mk}.b_q_a" if bias else None)
        out |= mappings.norm(sd, f"{hf}.q_a_layernorm", f"{mk}.q_norm", bias=False)
        out |= mappings.linear(sd, f"{hf}.q_b_proj", f"{mk}.W_q_b")
    else:
        out |= mappings.linear(sd, f"{hf}.q_proj", f"{mk}.W_q_packed")
    kv_a = mappings.linear(
        sd, f"{hf}.kv_a_proj_with_mqa", f"{mk}.W_kv_a", f"{mk}.b_kv_a" if bias else None
    )
    return {
        **out,
        **kv_a,
        **mappings.norm(sd, f"{hf}.kv_a_layernorm", f"{mk}.kv_norm", bias=False),
        **mappings.linear(sd, f"{hf}.kv_b_proj", f"{mk}.W_kv_b"),
        **mappings.attn_out(sd, f"{hf}.o_proj", mk, bias=cfg.attn_out_bias),
    }
