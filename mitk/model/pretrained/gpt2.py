"""Hugging Face GPT-2 checkpoints to mitk weights.

HF's ``Conv1D`` stores weights as ``[d_in, d_out]`` and packs q, k, v head by
head, which is exactly mitk's packed layout, so the conversion is a renaming.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from mitk.config import TransformerConfig
from mitk.errors import UnsupportedModelError

HF_ACTIVATIONS = {
    "gelu": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
    "relu": "relu",
    "silu": "silu",
    "swish": "silu",
}


def hf_activation(name: str) -> str:
    """mitk's name for a Hugging Face ``activation_function``/``hidden_act``."""
    if name not in HF_ACTIVATIONS:
        raise UnsupportedModelError(
            f"activation {name!r} is not supported; known: {sorted(HF_ACTIVATIONS)}"
        )
    return HF_ACTIVATIONS[name]


def gpt2_config(hf: dict[str, Any], **overrides: Any) -> TransformerConfig:
    """TransformerConfig equivalent to a GPT-2 ``config.json``."""
    if hf.get("scale_attn_by_inverse_layer_idx"):
        raise UnsupportedModelError("GPT-2 with scale_attn_by_inverse_layer_idx is not supported")
    if hf.get("add_cross_attention"):
        raise UnsupportedModelError("GPT-2 with cross-attention is not supported")
    d_model, n_heads = hf["n_embd"], hf["n_head"]
    fields: dict[str, Any] = {
        "d_model": d_model,
        "n_layers": hf["n_layer"],
        "n_heads": n_heads,
        "d_head": d_model // n_heads,
        "d_mlp": hf.get("n_inner") or 4 * d_model,
        "d_vocab": hf["vocab_size"],
        "n_ctx": hf["n_positions"],
        "act_fn": hf_activation(hf.get("activation_function", "gelu_new")),
        "norm_eps": hf.get("layer_norm_epsilon", 1e-5),
        "attn_scale": (d_model // n_heads) ** -0.5 if hf.get("scale_attn_weights", True) else 1.0,
        "architecture": "gpt2",
        "extra": {"source_model_type": "gpt2"},
    }
    fields.update(overrides)
    return TransformerConfig(**fields)


def gpt2_state_dict(hf_state: dict[str, Tensor], cfg: TransformerConfig) -> dict[str, Tensor]:
    """Rename a GPT-2 state dict (``GPT2Model`` or ``GPT2LMHeadModel``) to mitk names."""
    sd = {k.removeprefix("transformer."): v for k, v in hf_state.items()}
    out = gpt2_outer_weights(sd)
    for layer in range(cfg.n_layers):
        hf, mk = f"h.{layer}.", f"blocks.{layer}."
        out |= {
            mk + "ln1.w": sd[hf + "ln_1.weight"],
            mk + "ln1.b": sd[hf + "ln_1.bias"],
            mk + "attn.W_qkv": sd[hf + "attn.c_attn.weight"],
            mk + "attn.b_qkv": sd[hf + "attn.c_attn.bias"],
            mk + "attn.W_o_packed": sd[hf + "attn.c_proj.weight"],
            mk + "attn.b_o_param": sd[hf + "attn.c_proj.bias"],
            mk + "ln2.w": sd[hf + "ln_2.weight"],
            mk + "ln2.b": sd[hf + "ln_2.bias"],
            mk + "mlp.W_in": sd[hf + "mlp.c_fc.weight"],
            mk + "mlp.b_in": sd[hf + "mlp.c_fc.bias"],
            mk + "mlp.W_out": sd[hf + "mlp.c_proj.weight"],
            mk + "mlp.b_out": sd[hf + "mlp.c_proj.bias"],
        }
    return out


def gpt2_outer_weights(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """Embeddings, final norm and unembedding of a GPT-2-layout state dict (GPT-2, GPT-Neo).

    The head is tied to the embedding in these checkpoints; mitk keeps its own copy.
    """
    return {
        "embed.W_E": sd["wte.weight"],
        "pos_embed.W_pos": sd["wpe.weight"],
        "ln_final.w": sd["ln_f.weight"],
        "ln_final.b": sd["ln_f.bias"],
        "unembed.W_U": sd.get("lm_head.weight", sd["wte.weight"]).T,
    }
