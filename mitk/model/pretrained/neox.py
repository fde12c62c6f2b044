"""Hugging Face GPT-NeoX (Pythia) checkpoints to mitk weights.

GPT-NeoX runs attention and MLP in parallel off the same residual (unless
``use_parallel_residual`` is off), rotates only the first
``partial_rotary_factor`` of each head (rotate-halves layout), and packs its
fused q/k/v projection head by head (``[head, (q|k|v), d_head]``), unlike
mitk's ``[(q heads) | (k heads) | (v heads)]``; ``split_per_head_qkv`` reorders it.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from mitk.config import TransformerConfig
from mitk.model.pretrained.gpt2 import hf_activation
from mitk.model.pretrained.rope import rope_fields


def split_per_head_qkv(
    weight: Tensor, bias: Tensor | None, n_heads: int
) -> tuple[Tensor, Tensor | None]:
    """A ``[head, 3, d_head]``-packed ``nn.Linear`` (``[out, in]``) as mitk's ``W_qkv``/``b_qkv``.

    Returns ``W_qkv [d_model, 3 * n_heads * d_head]`` and ``b_qkv [3 * n_heads * d_head]``.
    """
    d_model = weight.shape[1]
    per_kind = weight.view(n_heads, 3, -1, d_model).transpose(0, 1).reshape(-1, d_model)
    if bias is None:
        return per_kind.T, None
    return per_kind.T, bias.view(n_heads, 3, -1).transpose(0, 1).reshape(-1)


def neox_config(hf: dict[str, Any], **overrides: Any) -> TransformerConfig:
    """TransformerConfig equivalent to a GPT-NeoX ``config.json``."""
    d_model, n_heads = hf["hidden_size"], hf["num_attention_heads"]
    d_head = d_model // n_heads
    bias = bool(hf.get("attention_bias", True))
    fields: dict[str, Any] = {
        "d_model": d_model,
        "n_layers": hf["num_hidden_layers"],
        "n_heads": n_heads,
        "d_head": d_head,
        "d_mlp": hf["intermediate_size"],
        "d_vocab": hf["vocab_size"],
        "n_ctx": hf["max_position_embeddings"],
        "act_fn": hf_activation(hf.get("hidden_act", "gelu")),
        "norm_eps": hf.get("layer_norm_eps", 1e-5),
        # HF's default when a config names no fraction: a quarter of each head rotates
        **rope_fields(hf, d_head, default_fraction=0.25),
        "parallel_attn_mlp": bool(hf.get("use_parallel_residual", True)),
        "attn_qkv_bias": bias,
        "attn_out_bias": bias,
        "attn_scale": d_head**-0.5,
        "architecture": "gpt_neox",
        "extra": {"source_model_type": "gpt_neox"},
    }
    fields.update(overrides)
    return TransformerConfig(**fields)


def neox_state_dict(hf_state: dict[str, Tensor], cfg: TransformerConfig) -> dict[str, Tensor]:
    """Rename, transpose and reorder a ``GPTNeoXForCausalLM`` state dict to mitk names."""
    sd = {k.removeprefix("gpt_neox."): v for k, v in hf_state.items()}
    unembed = sd.get("embed_out.weight", sd.get("lm_head.weight", sd["embed_in.weight"]))
    out = {
        "embed.W_E": sd["embed_in.weight"],
        "ln_final.w": sd["final_layer_norm.weight"],
        "ln_final.b": sd["final_layer_norm.bias"],
        "unembed.W_U": unembed.T,
    }
    for layer in range(cfg.n_layers):
        hf, mk = f"layers.{layer}.", f"blocks.{layer}."
        w_qkv, b_qkv = split_per_head_qkv(
            sd[hf + "attention.query_key_value.weight"],
            sd.get(hf + "attention.query_key_value.bias"),
            cfg.n_heads,
        )
        out[mk + "attn.W_qkv"] = w_qkv
        out[mk + "attn.W_o_packed"] = sd[hf + "attention.dense.weight"].T
        if cfg.attn_qkv_bias and b_qkv is not None:
            out[mk + "attn.b_qkv"] = b_qkv
            out[mk + "attn.b_o_param"] = sd[hf + "attention.dense.bias"]
        out |= {
            mk + "ln1.w": sd[hf + "input_layernorm.weight"],
            mk + "ln1.b": sd[hf + "input_layernorm.bias"],
            mk + "ln2.w": sd[hf + "post_attention_layernorm.weight"],
            mk + "ln2.b": sd[hf + "post_attention_layernorm.bias"],
            mk + "mlp.W_in": sd[hf + "mlp.dense_h_to_4h.weight"].T,
            mk + "mlp.b_in": sd[hf + "mlp.dense_h_to_4h.bias"],
            mk + "mlp.W_out": sd[hf + "mlp.dense_4h_to_h.weight"].T,
            mk + "mlp.b_out": sd[hf + "mlp.dense_4h_to_h.bias"],
        }
    return out
