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

from torch import Tensor

from mitk.config import TransformerConfig
from mitk.errors import UnsupportedModelError
from mitk.model.pretrained import mappings

# GPT-Neo names its layer and head counts its own way, its activation and norm as GPT-2 does
NAMES = mappings.ConfigNames(
    n_layers="num_layers",
    n_heads="num_heads",
    act="activation_function",
    default_act="gelu_new",
    eps="layer_norm_epsilon",
    mlp_defaults_to_4x=True,
)


KNOWN_FIELDS = frozenset({
    "activation_function", "attention_layers", "attention_types", "hidden_size",
    "intermediate_size", "layer_norm_epsilon", "max_position_embeddings", "num_heads",
    "num_layers", "tie_word_embeddings", "vocab_size", "window_size",
    *mappings.INERT_TRAINING_FIELDS,
})  # fmt: skip
"""``config.json`` fields the conversion reads or knows to be inert; others are refused."""


def gpt_neo_config(hf: dict[str, Any], **overrides: Any) -> TransformerConfig:
    """TransformerConfig equivalent to a GPT-Neo ``config.json``."""
    mappings.refuse_unknown_fields(hf, KNOWN_FIELDS)
    layer_types = _layer_types(hf, hf["num_layers"])
    local = [i for i, kind in enumerate(layer_types) if kind == "local"]
    window = hf.get("window_size", 256)
    fields = mappings.decoder_fields(hf, NAMES, "gpt_neo")
    fields |= {
        "attn_qkv_bias": False,
        "attn_scale": 1.0,  # GPT-Neo does not scale q·k by 1/sqrt(d_head)
    }
    if local and window:
        fields |= {"sliding_window": window, "sliding_window_layers": local}
    return TransformerConfig(**{**fields, **overrides})


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
    sd = mappings.without_prefix(hf_state, "transformer.")
    # GPT-2's outer layout: learned positions, a final LayerNorm, a tied head
    out = {
        **mappings.embeddings(sd, "wte", position="wpe"),
        **mappings.norm(sd, "ln_f", "ln_final"),
    }
    for hf, mk in mappings.layer_prefixes(cfg.n_layers, "h.{}"):
        attn = f"{hf}.attn.attention"
        out |= {
            **mappings.separate_qkv(
                sd, [f"{attn}.{p}_proj" for p in "qkv"], f"{mk}.attn", bias=False
            ),
            **mappings.attn_out(sd, f"{attn}.out_proj", f"{mk}.attn", bias=True),
            **mappings.block_norms(sd, hf, mk, ("ln_1", "ln_2")),
            **mappings.mlp(sd, f"{hf}.mlp.c_fc", f"{hf}.mlp.c_proj", f"{mk}.mlp"),
        }
    return out
