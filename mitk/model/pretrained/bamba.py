"""Hugging Face Bamba (``bamba``) checkpoints to mitk weights: a Mamba-2 / attention hybrid.

Every layer is ``x + sublayer(rmsnorm(x))`` then ``+ mlp(rmsnorm(x))`` with a SwiGLU
MLP; the sublayer is LLaMA-style grouped-query attention on the layers
``attn_layer_indices`` names and a Mamba-2 mixer (``mitk.model.ssm``, with
``SSMConfig.mlp`` for the MLP after it) on the others. The attention rotates only
part of each head: Hugging Face writes ``partial_rotary_factor`` 0.5 into
``rope_parameters`` unless the config sets one. ``hidden_act`` is both the MLP's
activation and the mixer convolution's; ``rms_norm_eps`` is every norm's, the mixer's
gated norm included. ``z_loss_coefficient`` only adds a term to Hugging Face's training
loss (mitk's ``return_type="loss"`` is the cross-entropy alone).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from mitk.config import SSMConfig, TransformerConfig
from mitk.errors import ConfigError, UnsupportedModelError
from mitk.model.pretrained import mappings, rope
from mitk.model.pretrained.mamba import (
    check_time_step_limit,
    mamba2_mixer,
    mamba2_weights,
    mixer_weights,
)

KNOWN_FIELDS = frozenset({
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
    "num_attention_heads", "num_key_value_heads", "head_dim", "hidden_act", "rms_norm_eps",
    "max_position_embeddings", "tie_word_embeddings", "rope_parameters", "rope_theta",
    "attention_bias", "mlp_bias", "attn_layer_indices", "mamba_n_heads", "mamba_d_head",
    "mamba_n_groups", "mamba_d_state", "mamba_d_conv", "mamba_expand", "mamba_conv_bias",
    "mamba_proj_bias", "time_step_limit",
    # the chunk length of HF's own scan, how many logits HF's generate keeps, and a term
    # of HF's training loss: none changes the forward
    "mamba_chunk_size", "num_logits_to_keep", "z_loss_coefficient",
})  # fmt: skip
"""``model_type="bamba"`` fields the conversion reads or knows to be inert; others are refused."""

BAMBA_NAMES = mappings.ConfigNames(default_act="silu", eps="rms_norm_eps", default_eps=1e-5)
"""Bamba's names: LLaMA's, with Hugging Face's Bamba default epsilon."""

ROTARY_FRACTION = 0.5
"""The share of each head that rotates when ``rope_parameters`` does not say (HF's default)."""


def bamba_config(hf: dict[str, Any], **overrides: Any) -> TransformerConfig:
    """TransformerConfig equivalent to a Bamba ``config.json``."""
    mappings.refuse_unknown_fields(hf, KNOWN_FIELDS)
    check_time_step_limit(hf)
    if hf.get("mlp_bias"):
        raise UnsupportedModelError("bamba mlp_bias=True (a biased SwiGLU gate) is not supported")
    fields = mappings.decoder_fields(hf, BAMBA_NAMES, "bamba", d_head=hf.get("head_dim"))
    bias = bool(hf.get("attention_bias", False))
    fields |= {
        "n_key_value_heads": hf.get("num_key_value_heads") or fields["n_heads"],
        "gated_mlp": True,
        "normalization": "rmsnorm",
        **rope.rope_fields(hf, fields["d_head"], ROTARY_FRACTION),
        "attn_qkv_bias": bias,
        "attn_out_bias": bias,
        "mlp_bias": False,
        "ssm": _mixer_config(hf),
    }
    return TransformerConfig(**{**fields, **overrides})


def _mixer_config(hf: dict[str, Any]) -> SSMConfig:
    """The Mamba-2 mixers: their widths, and the layers that are not attention."""
    n_layers, attention = hf["num_hidden_layers"], hf.get("attn_layer_indices") or []
    if not all(isinstance(i, int) and 0 <= i < n_layers for i in attention):
        raise ConfigError(
            f"bamba attn_layer_indices must be layers in [0, {n_layers}), got {attention!r}"
        )
    d_head = hf.get("mamba_d_head", "auto")
    return mamba2_mixer(
        "bamba mamba_n_heads * mamba_d_head",
        d_inner=hf.get("mamba_expand", 2) * hf["hidden_size"],
        heads=hf.get("mamba_n_heads", 128),
        head_dim=None if d_head == "auto" else d_head,
        d_state=hf.get("mamba_d_state", 256),
        d_conv=hf.get("mamba_d_conv", 4),
        conv_bias=hf.get("mamba_conv_bias", True),
        proj_bias=hf.get("mamba_proj_bias", False),
        n_groups=hf.get("mamba_n_groups", 1),
        layers=[i for i in range(n_layers) if i not in attention],
        mlp=True,
    )


def bamba_state_dict(hf_state: dict[str, Tensor], cfg: TransformerConfig) -> dict[str, Tensor]:
    """Rename and transpose a ``BambaForCausalLM`` (or bare ``BambaModel``) state dict."""
    assert cfg.ssm is not None
    sd = mappings.without_prefix(hf_state, "model.")
    out = {
        **mappings.embeddings(sd, "embed_tokens"),
        **mappings.norm(sd, "final_layernorm", "ln_final", bias=False),
    }
    for layer, (hf, mk) in enumerate(mappings.layer_prefixes(cfg.n_layers, "layers.{}")):
        ffn = f"{hf}.feed_forward"
        out |= {
            **mappings.block_norms(sd, hf, mk, ("input_layernorm", "pre_ff_layernorm"),
                                   bias=False),
            **mappings.mlp(sd, f"{ffn}.up_proj", f"{ffn}.down_proj", f"{mk}.mlp",
                           gate=f"{ffn}.gate_proj", bias=False),
        }  # fmt: skip
        if cfg.is_ssm_layer(layer):
            out |= mixer_weights(sd, f"{hf}.mamba", f"{mk}.mixer", cfg.ssm, mamba2_weights)
        else:
            out |= mappings.llama_attention(
                sd, f"{hf}.self_attn", f"{mk}.attn",
                qkv_bias=cfg.attn_qkv_bias, out_bias=cfg.attn_out_bias,
            )  # fmt: skip
    return out
