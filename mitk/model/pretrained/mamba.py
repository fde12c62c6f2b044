"""Hugging Face Mamba (``model_type="mamba"``) checkpoints to mitk weights.

Every block is ``resid + mixer(rmsnorm(resid))`` with Mamba-1's selective
state-space mixer (``mitk.model.ssm``); no attention, no MLP, no positions.
The mixer's convolution activation is ``hidden_act``; its gate is always SiLU,
as in Hugging Face's and the reference implementation's code.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from mitk.config import SSMConfig, TransformerConfig
from mitk.model.pretrained import mappings

KNOWN_FIELDS = frozenset({
    "vocab_size", "hidden_size", "state_size", "num_hidden_layers", "layer_norm_epsilon",
    "expand", "intermediate_size", "conv_kernel", "use_bias", "use_conv_bias", "hidden_act",
    "time_step_rank", "tie_word_embeddings",
    # the precision of the residual additions in low-precision runs; an fp32 run is unchanged
    "residual_in_fp32",
    # initialisation only
    "time_step_scale", "time_step_min", "time_step_max", "time_step_init_scheme",
    "time_step_floor", "rescale_prenorm_residual",
    # which torch implementation of the same scan Hugging Face runs
    "use_mambapy", "use_associative_scan",
})  # fmt: skip
"""``model_type="mamba"`` fields the conversion reads or knows to be inert; others are refused."""

MAMBA_NAMES = mappings.ConfigNames(
    n_heads="hidden_size", n_ctx="hidden_size", default_act="silu", eps="layer_norm_epsilon"
)
"""Mamba's names; it has no heads and no context limit (those two are overwritten below)."""

NO_LIMIT = 2**20
"""``n_ctx`` of a Mamba model: nothing in it depends on the position, so no real limit."""


def mamba_config(hf: dict[str, Any], **overrides: Any) -> TransformerConfig:
    """TransformerConfig equivalent to a Mamba ``config.json``."""
    mappings.refuse_unknown_fields(hf, KNOWN_FIELDS)
    d_model = hf["hidden_size"]
    d_inner = hf.get("intermediate_size") or int(hf.get("expand", 2) * d_model)
    rank = hf.get("time_step_rank", "auto")
    ssm = SSMConfig(
        d_inner=d_inner,
        d_state=hf.get("state_size", 16),
        d_conv=hf.get("conv_kernel", 4),
        dt_rank=-(-d_model // 16) if rank == "auto" else rank,
        conv_bias=bool(hf.get("use_conv_bias", True)),
        proj_bias=bool(hf.get("use_bias", False)),
    )
    fields = mappings.decoder_fields(hf, MAMBA_NAMES, "mamba", d_head=d_model)
    fields |= {
        "n_heads": 1,
        "d_mlp": 0,
        "n_ctx": NO_LIMIT,
        "normalization": "rmsnorm",
        "positional": "none",
        "ssm": ssm,
    }
    return TransformerConfig(**{**fields, **overrides})


def mamba_state_dict(hf_state: dict[str, Tensor], cfg: TransformerConfig) -> dict[str, Tensor]:
    """Rename and transpose a ``MambaForCausalLM`` (or bare ``MambaModel``) state dict."""
    sd = mappings.without_prefix(hf_state, "backbone.")
    assert cfg.ssm is not None
    bias = cfg.ssm.proj_bias
    out = {
        **mappings.embeddings(sd, "embeddings"),
        **mappings.norm(sd, "norm_f", "ln_final", bias=False),
    }
    for hf, mk in mappings.layer_prefixes(cfg.n_layers, "layers.{}"):
        mixer, mk_mixer = f"{hf}.mixer", f"{mk}.mixer"
        out |= {
            **mappings.norm(sd, f"{hf}.norm", f"{mk}.ln1", bias=False),
            **mappings.linear(sd, f"{mixer}.in_proj", f"{mk_mixer}.W_in",
                              f"{mk_mixer}.b_in" if bias else None),
            **mappings.linear(sd, f"{mixer}.x_proj", f"{mk_mixer}.W_x"),
            **mappings.linear(sd, f"{mixer}.dt_proj", f"{mk_mixer}.W_dt", f"{mk_mixer}.b_dt"),
            **mappings.linear(sd, f"{mixer}.out_proj", f"{mk_mixer}.W_out",
                              f"{mk_mixer}.b_out" if bias else None),
            f"{mk_mixer}.W_conv": sd[f"{mixer}.conv1d.weight"][:, 0],
            f"{mk_mixer}.A_log": sd[f"{mixer}.A_log"],
            f"{mk_mixer}.D": sd[f"{mixer}.D"],
        }  # fmt: skip
        if cfg.ssm.conv_bias:
            out[f"{mk_mixer}.b_conv"] = sd[f"{mixer}.conv1d.bias"]
    return out
