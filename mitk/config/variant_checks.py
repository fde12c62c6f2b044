"""The checks of one variant each: what a layer kind needs and which other choices it refuses.

``TransformerConfig`` validates its own fields and calls these for the variants a config
uses. Most are a table of refused combinations, each labelled as the user would write
it, so one ``ConfigError`` names every conflict at once (``refuse``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from mitk.config.longformer import LongformerConfig
from mitk.config.rwkv import RWKVConfig
from mitk.config.ssm import SSMConfig
from mitk.errors import ConfigError

if TYPE_CHECKING:  # the config module imports this one
    from mitk.config import TransformerConfig


def refuse(what_it_is: str, refused: dict[str, bool]) -> None:
    """Raise ``ConfigError("{what_it_is}; got ...")`` naming every refused entry present."""
    found = [label for label, present in refused.items() if present]
    if found:
        raise ConfigError(f"{what_it_is}; got {', '.join(found)}")


def check_sparse_patterns(cfg: TransformerConfig) -> None:
    """Sparse Transformer masks: causal multi-head attention, blocks that hold a summary."""
    if not cfg.causal or cfg.attention_type != "mha":
        raise ConfigError("sparse_attention needs causal=True and attention_type='mha'")
    if cfg.sparse_block < 2:
        raise ConfigError(
            f"sparse_attention={cfg.sparse_attention!r} needs sparse_block >= 2, "
            f"got {cfg.sparse_block}"
        )
    if not 1 <= cfg.sparse_summary <= cfg.sparse_block:
        raise ConfigError(
            f"sparse_summary must lie in [1, sparse_block={cfg.sparse_block}], "
            f"got {cfg.sparse_summary}"
        )


def check_kernel_attention(cfg: TransformerConfig) -> None:
    """Linear and Performer attention: causal, positions in the stream, nothing on the scores."""
    refuse(
        f"attention_type={cfg.attention_type!r} is causal, with positions added to the stream "
        "(learned, sinusoidal or none) and no window, sinks or soft-cap",
        {
            "causal=False": not cfg.causal,
            f"positional={cfg.positional!r}": cfg.positional in ("rotary", "alibi"),
            "a sliding window": cfg.sliding_window > 0,
            "attn_sinks": cfg.attn_sinks,
            "attn_softcap": cfg.attn_softcap > 0,
            "performer_features < 1": cfg.performer_features < 1,
        },
    )


def check_ssm(cfg: TransformerConfig) -> None:
    """Mamba mixers: plain pre-norm blocks; an MLP after them needs one to exist."""
    ssm = cfg.ssm
    if not isinstance(ssm, SSMConfig):
        raise ConfigError(f"ssm must be an SSMConfig or None, got {ssm!r}")
    if not all(0 <= i < cfg.n_layers for i in ssm.layers or ()):
        raise ConfigError(f"ssm layers must lie in [0, {cfg.n_layers}), got {ssm.layers}")
    if cfg.norm_position != "pre" or not cfg.pre_norms or cfg.sandwich_norms:
        raise ConfigError("ssm mixers need plain pre-norm blocks")
    if cfg.moe is not None and ssm.layers is None and not ssm.mlp:
        raise ConfigError("every layer is an ssm mixer, so there is no MLP for moe to replace")
    if ssm.mlp and not cfg.has_mlp:
        raise ConfigError("ssm mlp=True puts an MLP after each mixer, so it needs d_mlp > 0")
    layers = range(cfg.n_layers)
    if ssm.mlp and any(cfg.is_ssm_layer(i) and cfg.is_moe_layer(i) for i in layers):
        raise ConfigError("a mixture of experts after an ssm mixer is not supported")


def check_rwkv(cfg: TransformerConfig) -> None:
    """RWKV-4 blocks: pre-LayerNorm time and channel mixing, no positions."""
    if not isinstance(cfg.rwkv, RWKVConfig):
        raise ConfigError(f"rwkv must be an RWKVConfig or None, got {cfg.rwkv!r}")
    refuse(
        "rwkv blocks are pre-LayerNorm time + channel mixing with no positions (the token "
        "shift orders the tokens)",
        {
            "ssm": cfg.ssm is not None,
            "moe": cfg.moe is not None,
            f"attention_type={cfg.attention_type!r}": cfg.attention_type != "mha",
            f"positional={cfg.positional!r}": cfg.positional != "none",
            f"normalization={cfg.normalization!r}": cfg.normalization != "layernorm",
            "d_mlp=0": not cfg.has_mlp,
            "other than plain pre-norm blocks": cfg.norm_position != "pre"
            or not cfg.pre_norms or cfg.sandwich_norms or cfg.parallel_attn_mlp,
        },
    )  # fmt: skip


def check_encoder_attention(cfg: TransformerConfig, kind: str, record: type) -> None:
    """Longformer, Nystrom or block-sparse (BigBird) attention, ``cfg.<kind>`` of ``record``.

    All three are bidirectional multi-head attention with positions added to the
    stream, and replace the attention computation themselves, so they refuse every
    other mask, score change or attention kind (and each other).
    """
    settings = getattr(cfg, kind)
    if not isinstance(settings, record):
        raise ConfigError(f"{kind} must be a {record.__name__} or None, got {settings!r}")
    if isinstance(settings, LongformerConfig) and len(settings.attention_window) != cfg.n_layers:
        raise ConfigError(
            f"longformer attention_window needs one width per layer ({cfg.n_layers}), "
            f"got {settings.attention_window}"
        )
    others = [k for k in ("longformer", "nystrom", "block_sparse") if k != kind]
    refuse(
        f"{kind} attention is bidirectional multi-head attention with positions added to the "
        "stream and no other mask, window, sinks, soft-cap or q/k norm",
        {
            "causal=True": cfg.causal,
            f"attention_type={cfg.attention_type!r}": cfg.attention_type != "mha",
            "grouped-query attention (fewer key/value heads)": cfg.n_key_value_heads != cfg.n_heads,
            f"positional={cfg.positional!r}": cfg.positional in ("rotary", "alibi"),
            "sliding_window": cfg.sliding_window > 0,
            f"sparse_attention={cfg.sparse_attention!r}": cfg.sparse_attention != "none",
            "attn_sinks": cfg.attn_sinks,
            "attn_softcap": cfg.attn_softcap > 0,
            "qk_norm": cfg.qk_norm != "none",
            "ssm or rwkv mixers": cfg.ssm is not None or cfg.rwkv is not None,
            **{other: getattr(cfg, other) is not None for other in others},
        },
    )


def check_mla(cfg: TransformerConfig) -> None:
    """Multi-head latent attention: its ranks, a decoupled rotary part, one kv head per query."""
    for name in ("kv_lora_rank", "v_head_dim"):
        if getattr(cfg, name) <= 0:
            raise ConfigError(f"attention_type='mla' needs a positive {name}")
    if cfg.q_lora_rank < 0:
        raise ConfigError(
            f"q_lora_rank must be >= 0 (0: a plain W_q_packed), got {cfg.q_lora_rank}"
        )
    if cfg.positional != "rotary" or cfg.rotary_dim >= cfg.d_head:
        # the decoupled rotary key is a trailing part of each query/key head
        raise ConfigError(
            "attention_type='mla' needs positional='rotary' and rotary_dim < d_head "
            f"(got {cfg.positional!r}, rotary_dim={cfg.rotary_dim}, d_head={cfg.d_head})"
        )
    if cfg.n_key_value_heads != cfg.n_heads:
        raise ConfigError("attention_type='mla' up-projects one key/value head per query head")
