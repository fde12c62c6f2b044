"""Hugging Face GPT-J checkpoints to mitk weights.

GPT-J runs attention and MLP in parallel off one shared LayerNorm (``ln_1``),
rotates the first ``rotary_dim`` dimensions of each head in interleaved pairs
(``2i``, ``2i+1``), has no biases on q/k/v or the attention output, and a bias
on its unembedding. mitk's parallel block has a norm per sublayer, so ``ln_1``
is copied into both ``ln1`` and ``ln2``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from mitk.config import TransformerConfig
from mitk.model.pretrained.gpt2 import hf_activation


def gptj_config(hf: dict[str, Any], **overrides: Any) -> TransformerConfig:
    """TransformerConfig equivalent to a GPT-J ``config.json``."""
    d_model, n_heads = hf["n_embd"], hf["n_head"]
    d_head = d_model // n_heads
    fields: dict[str, Any] = {
        "d_model": d_model,
        "n_layers": hf["n_layer"],
        "n_heads": n_heads,
        "d_head": d_head,
        "d_mlp": hf.get("n_inner") or 4 * d_model,
        "d_vocab": hf["vocab_size"],
        "n_ctx": hf["n_positions"],
        "act_fn": hf_activation(hf.get("activation_function", "gelu_new")),
        "norm_eps": hf.get("layer_norm_epsilon", 1e-5),
        "positional": "rotary",
        "rotary_dim": hf.get("rotary_dim") or d_head,
        "rotary_style": "gptj",
        "parallel_attn_mlp": True,
        "attn_qkv_bias": False,
        "attn_out_bias": False,
        "unembed_bias": True,
        "attn_scale": d_head**-0.5,
        "architecture": "gptj",
        "extra": {"source_model_type": "gptj"},
    }
    fields.update(overrides)
    return TransformerConfig(**fields)


def gptj_state_dict(hf_state: dict[str, Tensor], cfg: TransformerConfig) -> dict[str, Tensor]:
    """Rename and transpose a ``GPTJForCausalLM`` state dict to mitk names."""
    sd = {k.removeprefix("transformer."): v for k, v in hf_state.items()}
    out = {
        "embed.W_E": sd["wte.weight"],
        "ln_final.w": sd["ln_f.weight"],
        "ln_final.b": sd["ln_f.bias"],
        "unembed.W_U": sd.get("lm_head.weight", sd["wte.weight"]).T,
        "unembed.b_U": sd.get("lm_head.bias", sd["wte.weight"].new_zeros(cfg.d_vocab)),
    }
    for layer in range(cfg.n_layers):
        hf, mk = f"h.{layer}.", f"blocks.{layer}."
        qkv = [sd[hf + f"attn.{p}_proj.weight"] for p in "qkv"]
        out |= {
            mk + "attn.W_qkv": torch.cat(qkv, dim=0).T,
            mk + "attn.W_o_packed": sd[hf + "attn.out_proj.weight"].T,
            # one shared norm feeds both sublayers; copies, so each can be edited alone
            mk + "ln1.w": sd[hf + "ln_1.weight"],
            mk + "ln1.b": sd[hf + "ln_1.bias"],
            mk + "ln2.w": sd[hf + "ln_1.weight"].clone(),
            mk + "ln2.b": sd[hf + "ln_1.bias"].clone(),
            mk + "mlp.W_in": sd[hf + "mlp.fc_in.weight"].T,
            mk + "mlp.b_in": sd[hf + "mlp.fc_in.bias"],
            mk + "mlp.W_out": sd[hf + "mlp.fc_out.weight"].T,
            mk + "mlp.b_out": sd[hf + "mlp.fc_out.bias"],
        }
    return out
