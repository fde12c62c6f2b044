"""Hugging Face RWKV-4 (``rwkv``) checkpoints to mitk weights.

The embeddings go through a LayerNorm (HF's ``blocks.0.pre_ln``, mitk's ``ln_embed``),
then every block is ``x + time_mix(ln1(x))``, ``+ channel_mix(ln2(x))`` (``mitk.model.rwkv``),
then ``ln_out`` and the head. No positions: the token shift orders the tokens.
``context_length`` is only the longest sequence HF's CUDA kernel takes in one call;
the model itself has no limit. HF's eval-mode rescaling (``rescale_every``) is matched
through the norms' epsilons (see ``RWKVConfig.rescale_every``); weights load as stored.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from mitk.config import RWKVConfig, TransformerConfig
from mitk.errors import ModelFileError
from mitk.model.pretrained import mappings
from mitk.model.pretrained.mamba import NO_LIMIT

KNOWN_FIELDS = frozenset({
    "vocab_size", "hidden_size", "num_hidden_layers", "attention_hidden_size",
    "intermediate_size", "layer_norm_epsilon", "rescale_every", "tie_word_embeddings",
    # the longest input HF's CUDA kernel takes in one call; the recurrence has no limit
    "context_length",
})  # fmt: skip
"""``model_type="rwkv"`` fields the conversion reads or knows to be inert; others are refused."""

RWKV_NAMES = mappings.ConfigNames(
    n_heads="hidden_size", n_ctx="hidden_size", default_act="relu", eps="layer_norm_epsilon",
    mlp_defaults_to_4x=True,
)  # fmt: skip
"""RWKV's names; it has no attention heads or context limit (overwritten below)."""


def rwkv_config(hf: dict[str, Any], **overrides: Any) -> TransformerConfig:
    """TransformerConfig equivalent to an RWKV-4 ``config.json``."""
    mappings.refuse_unknown_fields(hf, KNOWN_FIELDS)
    d_model = hf["hidden_size"]
    fields = mappings.decoder_fields(hf, RWKV_NAMES, "rwkv", d_head=d_model)
    rwkv = RWKVConfig(
        d_attn=hf.get("attention_hidden_size") or d_model,
        rescale_every=max(0, hf.get("rescale_every", 6)),
    )
    fields |= {
        "n_heads": 1,
        "n_ctx": NO_LIMIT,
        "normalization": "layernorm",
        "positional": "none",
        "embed_norm": True,
        "rwkv": rwkv,
    }
    return TransformerConfig(**{**fields, **overrides})


def rwkv_state_dict(hf_state: dict[str, Tensor], cfg: TransformerConfig) -> dict[str, Tensor]:
    """Rename and transpose an ``RwkvForCausalLM`` (or bare ``RwkvModel``) state dict."""
    sd = mappings.without_prefix(hf_state, "rwkv.")
    out = {
        **mappings.embeddings(sd, "embeddings", heads=("head",)),
        **mappings.norm(sd, "blocks.0.pre_ln", "ln_embed"),
        **mappings.norm(sd, "ln_out", "ln_final"),
    }
    for hf, mk in mappings.layer_prefixes(cfg.n_layers, "blocks.{}"):
        att, ffn = f"{hf}.attention", f"{hf}.feed_forward"
        out |= {
            **mappings.block_norms(sd, hf, mk, ("ln1", "ln2")),
            f"{mk}.mixer.time_decay": sd[f"{att}.time_decay"],
            f"{mk}.mixer.time_first": sd[f"{att}.time_first"],
            **_mixes(sd, att, f"{mk}.mixer", {"key": "k", "value": "v", "receptance": "r"}),
            **mappings.linear(sd, f"{att}.key", f"{mk}.mixer.W_k"),
            **mappings.linear(sd, f"{att}.value", f"{mk}.mixer.W_v"),
            **mappings.linear(sd, f"{att}.receptance", f"{mk}.mixer.W_r"),
            **mappings.linear(sd, f"{att}.output", f"{mk}.mixer.W_out"),
            **_mixes(sd, ffn, f"{mk}.mlp", {"key": "k", "receptance": "r"}),
            **mappings.linear(sd, f"{ffn}.key", f"{mk}.mlp.W_in"),
            **mappings.linear(sd, f"{ffn}.receptance", f"{mk}.mlp.W_r"),
            **mappings.linear(sd, f"{ffn}.value", f"{mk}.mlp.W_out"),
        }
    return out


def _mixes(sd: dict[str, Tensor], hf: str, mk: str, names: dict[str, str]) -> dict[str, Tensor]:
    """HF's token-shift mixes ``time_mix_{name} [1, 1, d_model]`` as mitk's ``mix_{x}``."""
    out = {}
    for name, x in names.items():
        mix = sd[f"{hf}.time_mix_{name}"]
        if mix.dim() != 3 or mix.shape[:2] != (1, 1):
            raise ModelFileError(
                f"tensor {hf}.time_mix_{name} has shape {tuple(mix.shape)}, "
                "expected (1, 1, d_model)"
            )
        out[f"{mk}.mix_{x}"] = mix[0, 0]
    return out
