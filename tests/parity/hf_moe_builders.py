"""Tiny random mixture-of-experts checkpoints from ``transformers``' own config classes.

Routers get a weight 30x HF's init: at 0.02 every token's router logits are
near-ties, so a 1e-7 rounding difference could flip a top-k choice, and the
routing would barely depend on the token. Scaled up, each token's choice is
clear and differs between tokens.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

VOCAB = 97
MOE_SHAPE: dict[str, Any] = {
    "vocab_size": VOCAB, "max_position_embeddings": 64, "hidden_size": 64,
    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
    "num_experts_per_tok": 2,
}  # fmt: skip


def sharp_routers(model: nn.Module, factor: float = 30.0) -> nn.Module:
    """Router weights scaled by ``factor`` (see the module docstring)."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("mlp.gate.weight", "mlp.router.weight")):
                param.mul_(factor)
    return model


def _mixtral(**kw: Any) -> nn.Module:
    from transformers import MixtralConfig, MixtralForCausalLM

    base = {**MOE_SHAPE, "intermediate_size": 48, "num_local_experts": 4}
    return sharp_routers(MixtralForCausalLM(MixtralConfig(**{**base, **kw})))


def _qwen2_moe(**kw: Any) -> nn.Module:
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    # layer 0 dense (decoder_sparse_step 2), layer 1 MoE with a gated shared expert
    base = {**MOE_SHAPE, "intermediate_size": 96, "moe_intermediate_size": 32,
            "shared_expert_intermediate_size": 40, "num_experts": 6,
            "decoder_sparse_step": 2}  # fmt: skip
    return sharp_routers(Qwen2MoeForCausalLM(Qwen2MoeConfig(**{**base, **kw})))


def _qwen3_moe(**kw: Any) -> nn.Module:
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    base = {**MOE_SHAPE, "num_hidden_layers": 3, "intermediate_size": 96,
            "moe_intermediate_size": 32, "num_experts": 5, "head_dim": 24,
            "norm_topk_prob": True, "mlp_only_layers": [1]}  # fmt: skip
    return sharp_routers(Qwen3MoeForCausalLM(Qwen3MoeConfig(**{**base, **kw})))


def _olmoe(**kw: Any) -> nn.Module:
    from transformers import OlmoeConfig, OlmoeForCausalLM

    # HF's default pad/eos ids exceed VOCAB; top-3 of 5, not renormalised
    base = {**MOE_SHAPE, "intermediate_size": 32, "num_experts": 5, "num_experts_per_tok": 3,
            "pad_token_id": 0, "eos_token_id": 0}  # fmt: skip
    return sharp_routers(OlmoeForCausalLM(OlmoeConfig(**{**base, **kw})))


def _deepseek_v2_moe(**kw: Any) -> nn.Module:
    from transformers import DeepseekV2Config, DeepseekV2ForCausalLM

    # latent attention as test_hf_mla's; layer 0 dense, layers 1-2 MoE with 2 shared experts
    base = {"vocab_size": VOCAB, "max_position_embeddings": 64, "hidden_size": 64,
            "num_hidden_layers": 3, "num_attention_heads": 4, "intermediate_size": 96,
            "kv_lora_rank": 24, "q_lora_rank": 20, "qk_nope_head_dim": 12, "qk_rope_head_dim": 4,
            "v_head_dim": 8, "rope_theta": 500.0, "first_k_dense_replace": 1,
            "n_routed_experts": 6, "num_experts_per_tok": 2, "moe_intermediate_size": 16,
            "n_shared_experts": 2, "routed_scaling_factor": 1.5}  # fmt: skip
    return sharp_routers(DeepseekV2ForCausalLM(DeepseekV2Config(**{**base, **kw})))


def _gpt_oss(**kw: Any) -> nn.Module:
    from transformers import GptOssConfig, GptOssForCausalLM

    # sliding (window 4) and full layers, 16-wide heads, YaRN past an original context of 8;
    # a clamp limit the tiny random gates reach
    base = {**MOE_SHAPE, "num_hidden_layers": 2, "head_dim": 16, "intermediate_size": 32,
            "num_local_experts": 4, "sliding_window": 4, "swiglu_limit": 0.05,
            "layer_types": ["sliding_attention", "full_attention"],
            "rope_parameters": {"rope_type": "yarn", "factor": 8.0, "rope_theta": 500.0,
                                "original_max_position_embeddings": 8, "beta_fast": 32.0,
                                "beta_slow": 1.0, "truncate": False},
            "pad_token_id": 0, "eos_token_id": 0, "bos_token_id": 0}  # fmt: skip
    model = GptOssForCausalLM(GptOssConfig(**{**base, **kw}))
    with torch.no_grad():  # sinks large enough to take a real share of each softmax
        for layer in model.model.layers:
            layer.self_attn.sinks.copy_(torch.linspace(-1.0, 2.0, layer.self_attn.sinks.numel()))
    return sharp_routers(model)


MOE_FAMILIES: dict[str, Callable[[], nn.Module]] = {
    "mixtral-top2-of-4": lambda: _mixtral(),
    "mixtral-window-4-top1": lambda: _mixtral(sliding_window=4, num_experts_per_tok=1),
    "qwen2-moe-shared-expert-dense-layer-0": lambda: _qwen2_moe(),
    "qwen3-moe-normed-top-k-dense-layer-1": lambda: _qwen3_moe(),
    "olmoe-top3-unnormed": lambda: _olmoe(),
    "deepseek-v2-moe-shared-scaled": lambda: _deepseek_v2_moe(),
    "gpt-oss-sinks-window-4-yarn-clamped": lambda: _gpt_oss(),
    # 6 experts in 3 groups; each token's best 2 groups compete
    "deepseek-v2-moe-group-limited": lambda: _deepseek_v2_moe(
        topk_method="group_limited_greedy", n_group=3, topk_group=2, num_experts_per_tok=3
    ),
}
"""The MoE entries of the shared parity suite (``test_hf_families.FAMILIES``)."""
