"""Hugging Face Mamba and Mamba-2 (``mamba``, ``mamba2``) checkpoints to mitk weights.

Every block is ``resid + mixer(rmsnorm(resid))`` with Mamba-1's selective
state-space mixer (``mitk.model.ssm``); no attention, no MLP, no positions.
The mixer's convolution activation is ``hidden_act``; its gate is always SiLU,
as in Hugging Face's and the reference implementation's code. Mamba-2 (``mamba2``)
has one scalar decay per head, ``B``/``C`` from the convolution shared per group of
heads, and a grouped RMSNorm of the gated output.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor

from mitk.config import SSMConfig, TransformerConfig
from mitk.errors import UnsupportedModelError
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
    n_heads="hidden_size", d_mlp="hidden_size", n_ctx="hidden_size", default_act="silu",
    eps="layer_norm_epsilon",
)  # fmt: skip
"""Mamba's names; it has no attention heads, MLP or context limit (overwritten below)."""

MixerWeights = Callable[[dict[str, Tensor], str, str], dict[str, Tensor]]
"""``(hf state dict, HF mixer prefix, mitk mixer prefix) -> mitk weights`` of one variant."""

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
    return _ssm_model_config(hf, "mamba", ssm, overrides)


def mamba_state_dict(hf_state: dict[str, Tensor], cfg: TransformerConfig) -> dict[str, Tensor]:
    """Rename and transpose a ``MambaForCausalLM`` (or bare ``MambaModel``) state dict."""

    def selective(sd: dict[str, Tensor], mixer: str, mk: str) -> dict[str, Tensor]:
        return {
            **mappings.linear(sd, f"{mixer}.x_proj", f"{mk}.W_x"),
            **mappings.linear(sd, f"{mixer}.dt_proj", f"{mk}.W_dt", f"{mk}.b_dt"),
        }

    return _ssm_state_dict(hf_state, cfg, selective)


MAMBA2_FIELDS = frozenset({
    "vocab_size", "hidden_size", "state_size", "num_hidden_layers", "layer_norm_epsilon",
    "expand", "conv_kernel", "use_bias", "use_conv_bias", "hidden_act", "num_heads",
    "head_dim", "n_groups", "tie_word_embeddings", "residual_in_fp32",
    "time_step_limit",  # read below: only the default (no clamp) is supported
    # initialisation only, or unused by the forward (time_step_rank: Mamba-2 has no dt_proj)
    "time_step_min", "time_step_max", "time_step_floor", "rescale_prenorm_residual",
    "time_step_rank",
    # the chunk length of HF's own scan: the same function at any length
    "chunk_size",
})  # fmt: skip
"""``model_type="mamba2"`` fields the conversion reads or knows to be inert; others are refused."""


def mamba2_config(hf: dict[str, Any], **overrides: Any) -> TransformerConfig:
    """TransformerConfig equivalent to a Mamba-2 ``config.json``."""
    mappings.refuse_unknown_fields(hf, MAMBA2_FIELDS)
    check_time_step_limit(hf)
    ssm = mamba2_mixer(
        "mamba2 num_heads * head_dim",
        d_inner=int(hf.get("expand", 2) * hf["hidden_size"]),
        heads=hf["num_heads"],
        head_dim=hf.get("head_dim"),
        d_state=hf.get("state_size", 128),
        d_conv=hf.get("conv_kernel", 4),
        conv_bias=hf.get("use_conv_bias", True),
        proj_bias=hf.get("use_bias", False),
        n_groups=hf.get("n_groups", 1),
    )
    return _ssm_model_config(hf, "mamba2", ssm, overrides)


def mamba2_mixer(
    heads_times_head_dim: str,
    *,
    d_inner: int,
    heads: int,
    head_dim: int | None,
    d_state: int,
    d_conv: int,
    conv_bias: Any,
    proj_bias: Any,
    n_groups: int,
    **more: Any,
) -> SSMConfig:
    """A Mamba-2 mixer's config from the values a Hugging Face config gives (Mamba-2's own
    names or Bamba's); ``heads_times_head_dim`` names the two fields in the error when
    ``heads * head_dim`` is not ``d_inner``; ``more`` goes to ``SSMConfig`` (layers, mlp)."""
    if head_dim is not None and heads * head_dim != d_inner:
        raise UnsupportedModelError(
            f"{heads_times_head_dim} ({heads} * {head_dim}) must equal the mixer width "
            f"expand * hidden_size ({d_inner})"
        )
    return SSMConfig(
        d_inner=d_inner,
        d_state=d_state,
        d_conv=d_conv,
        dt_rank=1,  # unused: Mamba-2's dt comes straight from the input projection
        conv_bias=bool(conv_bias),
        proj_bias=bool(proj_bias),
        variant="mamba2",
        n_heads=heads,
        n_groups=n_groups,
        **more,
    )


def mamba2_state_dict(hf_state: dict[str, Tensor], cfg: TransformerConfig) -> dict[str, Tensor]:
    """Rename and transpose a ``Mamba2ForCausalLM`` (or bare ``Mamba2Model``) state dict."""

    return _ssm_state_dict(hf_state, cfg, mamba2_weights)


def mamba2_weights(sd: dict[str, Tensor], mixer: str, mk: str) -> dict[str, Tensor]:
    """What a Mamba-2 mixer adds to ``mixer_weights``: its grouped norm and time-step bias."""
    return {
        **mappings.norm(sd, f"{mixer}.norm", f"{mk}.norm", bias=False),
        f"{mk}.b_dt": sd[f"{mixer}.dt_bias"],
    }


def check_time_step_limit(hf: dict[str, Any]) -> None:
    """Refuse a Mamba-2 ``time_step_limit`` other than the default (no clamp)."""
    limit = hf.get("time_step_limit", (0.0, float("inf")))
    if limit is not None and tuple(map(_number, limit)) != (0.0, float("inf")):
        raise UnsupportedModelError(
            f"{hf.get('model_type')} config field time_step_limit={limit!r} is not supported "
            "(Hugging Face clamps dt with it on the prefill but not per generated token)"
        )


def _number(value: Any) -> float:
    """A JSON number, or HF's spelling of a non-finite one (``{"__float__": "Infinity"}``)."""
    if isinstance(value, dict) and set(value) == {"__float__"}:
        return float(value["__float__"])
    return float(value)


def _ssm_model_config(
    hf: dict[str, Any], model_type: str, ssm: SSMConfig, overrides: dict[str, Any]
) -> TransformerConfig:
    """The decoder fields both variants share: one mixer per block, no heads, MLP or positions."""
    fields = mappings.decoder_fields(hf, MAMBA_NAMES, model_type, d_head=hf["hidden_size"])
    fields |= {
        "n_heads": 1,
        "d_mlp": 0,
        "n_ctx": NO_LIMIT,
        "normalization": "rmsnorm",
        "positional": "none",
        "ssm": ssm,
    }
    return TransformerConfig(**{**fields, **overrides})


def _ssm_state_dict(
    hf_state: dict[str, Tensor], cfg: TransformerConfig, variant_weights: MixerWeights
) -> dict[str, Tensor]:
    """Embeddings, norms and the mixer weights both variants share; ``variant_weights(sd,
    mixer, mk_mixer)`` adds the rest of one layer's mixer."""
    sd = mappings.without_prefix(hf_state, "backbone.")
    assert cfg.ssm is not None
    out = {
        **mappings.embeddings(sd, "embeddings"),
        **mappings.norm(sd, "norm_f", "ln_final", bias=False),
    }
    for hf, mk in mappings.layer_prefixes(cfg.n_layers, "layers.{}"):
        out |= {
            **mappings.norm(sd, f"{hf}.norm", f"{mk}.ln1", bias=False),
            **mixer_weights(sd, f"{hf}.mixer", f"{mk}.mixer", cfg.ssm, variant_weights),
        }
    return out


def mixer_weights(
    sd: dict[str, Tensor], mixer: str, mk: str, ssm: SSMConfig, variant_weights: MixerWeights
) -> dict[str, Tensor]:
    """HF mixer ``mixer``'s weights as mitk mixer ``mk``'s: the projections, convolution,
    ``A_log`` and ``D`` both variants share, then ``variant_weights(sd, mixer, mk)``."""
    bias = ssm.proj_bias
    out = {
        **mappings.linear(sd, f"{mixer}.in_proj", f"{mk}.W_in", f"{mk}.b_in" if bias else None),
        **mappings.linear(sd, f"{mixer}.out_proj", f"{mk}.W_out", f"{mk}.b_out" if bias else None),
        f"{mk}.W_conv": sd[f"{mixer}.conv1d.weight"][:, 0],
        f"{mk}.A_log": sd[f"{mixer}.A_log"],
        f"{mk}.D": sd[f"{mixer}.D"],
        **variant_weights(sd, mixer, mk),
    }
    if ssm.conv_bias:
        out[f"{mk}.b_conv"] = sd[f"{mixer}.conv1d.bias"]
    return out
