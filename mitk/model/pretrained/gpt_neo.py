"""Hugging Face GPT-Neo checkpoints to mitk weights.

GPT-2's layout (learned positions, LayerNorm, ``c_fc``/``c_proj`` MLP, tied head)
with three differences: separate unbiased q/k/v ``nn.Linear`` projections, no
``1/sqrt(d_head)`` score scaling, and layers that alternate between global and
local attention. A local layer lets a query see keys fewer than ``window_size``
positions back (``0 <= q - k < window_size``), which is mitk's ``sliding_window``
convention, applied to the layers ``sliding_window_layers`` lists.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from mitk.config import TransformerConfig
from mitk.errors import UnsupportedModelError
from mitk.model.pretrained.gpt2 import gpt2_outer_weights, hf_activation


def gpt_neo_config(hf: dict[str, Any], **overrides: Any) -> TransformerConfig:
    """TransformerConfig equivalent to a GPT-Neo ``config.json``."""
    d_model, n_heads, n_layers = hf["hidden_size"], hf["num_heads"], hf["num_layers"]
    layer_types = _layer_types(hf, n_layers)
    local = [i for i, kind in enumerate(layer_types) if kind == "local"]
    window = hf.get("window_size", 256)
    fields: dict[str, Any] = {
        "d_model": d_model,
        "n_layers": n_layers,
        "n_heads": n_heads,
        "d_head": d_model // n_heads,
        "d_mlp": hf.get("intermediate_size") or 4 * d_model,
        "d_vocab": hf["vocab_size"],
        "n_ctx": hf["max_position_embeddings"],
        "act_fn": hf_activation(hf.get("activation_function", "gelu_new")),
        "norm_eps": hf.get("layer_norm_epsilon", 1e-5),
        "attn_qkv_bias": False,
        "attn_scale": 1.0,  # GPT-Neo does not scale q·k by 1/sqrt(d_head)
        "architecture": "gpt_neo",
        "extra": {"source_model_type": "gpt_neo"},
    }
    if local and window:
        fields |= {"sliding_window": window, "sliding_window_layers": local}
    fields.update(overrides)
    return TransformerConfig(**fields)


def _layer_types(hf: dict[str, Any], n_layers: int) -> list[str]:
    """Per-layer ``global``/``local``: ``attention_types`` is ``[[pattern, repeats], ...]``."""
    layer_types = hf.get("attention_layers")
    if not layer_types:
        spec = hf.get("attention_types") or [[["global", "local"], n_layers // 2]]
        layer_types = [kind for pattern, times in spec for _ in range(times) for kind in pattern]
    unknown = set(layer_types) - {"global", "local"}
    if unknown:
        raise UnsupportedModelError(f"GPT-Neo attention types {sorted(unknown)} are not supported")
    if len(layer_types) != n_layers:
        raise UnsupportedModelError(
            f"GPT-Neo attention types name {len(layer_types)} layers, the model has {n_layers}"
        )
    return list(layer_types)


def gpt_neo_state_dict(hf_state: dict[str, Tensor], cfg: TransformerConfig) -> dict[str, Tensor]:
    """Rename and transpose a ``GPTNeoForCausalLM`` (or ``GPTNeoModel``) state dict."""
    sd = {k.removeprefix("transformer."): v for k, v in hf_state.items()}
    out = gpt2_outer_weights(sd)
    for layer in range(cfg.n_layers):
        hf, mk = f"h.{layer}.", f"blocks.{layer}."
        attn = hf + "attn.attention."
        out |= {
            mk + "ln1.w": sd[hf + "ln_1.weight"],
            mk + "ln1.b": sd[hf + "ln_1.bias"],
            # nn.Linear stores [d_out, d_in]; mitk packs q, k, v as [d_model, 3 d_model]
            mk + "attn.W_qkv": torch.cat([sd[attn + f"{p}_proj.weight"] for p in "qkv"]).T,
            mk + "attn.W_o_packed": sd[attn + "out_proj.weight"].T,
            mk + "attn.b_o_param": sd[attn + "out_proj.bias"],
            mk + "ln2.w": sd[hf + "ln_2.weight"],
            mk + "ln2.b": sd[hf + "ln_2.bias"],
            mk + "mlp.W_in": sd[hf + "mlp.c_fc.weight"].T,
            mk + "mlp.b_in": sd[hf + "mlp.c_fc.bias"],
            mk + "mlp.W_out": sd[hf + "mlp.c_proj.weight"].T,
            mk + "mlp.b_out": sd[hf + "mlp.c_proj.bias"],
        }
    return out
