"""EncoderDecoderConfig: the shape and variant choices of a T5-style encoder-decoder.

Kept apart from ``TransformerConfig`` (decoder-only) because the two stacks,
the relative position buckets and the tied-unembedding rescale have no meaning
there. ``block_config()`` gives the ``TransformerConfig`` view that the shared
components (``RMSNorm``, ``MLP``) are built from.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from mitk.config import ActFn, AttentionBackend, DType, JsonConfig, TransformerConfig, check_choices
from mitk.errors import ConfigError


@dataclass(frozen=True)
class EncoderDecoderConfig(JsonConfig):
    """Shape and variant choices of a T5-style encoder-decoder; every field is validated."""

    d_model: int
    """Width of both residual streams."""
    n_layers: int
    """Encoder blocks."""
    n_decoder_layers: int
    """Decoder blocks."""
    n_heads: int
    """Heads per attention layer (self- and cross-attention)."""
    d_head: int
    """Width of one head (T5's ``d_kv``; need not be ``d_model // n_heads``)."""
    d_mlp: int
    """Hidden width of every MLP (T5's ``d_ff``)."""
    d_vocab: int
    """Vocabulary size, shared by both stacks and the unembedding."""
    act_fn: ActFn = "relu"
    """MLP nonlinearity (T5 v1.0: relu; v1.1 ``gated-gelu``: ``gelu_tanh``)."""
    gated_mlp: bool = False
    """Gated MLP ``act(x W_gate) * (x W_in)`` (T5 v1.1)."""
    norm_eps: float = 1e-6
    """Epsilon inside every RMSNorm."""
    relative_buckets: int = 32
    """Buckets of the relative position bias."""
    relative_max_distance: int = 128
    """Distance from which all relative positions share the last bucket."""
    scale_unembed_input: bool = True
    """Multiply the decoder output by ``d_model**-0.5`` before the unembedding (tied T5 v1.0)."""
    attention_backend: AttentionBackend = "auto"
    """``auto``: fused unless a hook needs scores/patterns; ``sdpa``/``eager`` force a path."""
    dtype: DType = "float32"
    """Dtype of the weights and activations."""
    architecture: str = "t5"
    """Family the weights came from (informational)."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Free-form provenance; never read by the forward."""

    def __post_init__(self) -> None:
        for name in ("d_model", "n_layers", "n_decoder_layers", "n_heads", "d_head", "d_mlp"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{name} must be a positive int, got {value!r}")
        if self.d_vocab <= 0:
            raise ConfigError(f"d_vocab must be positive, got {self.d_vocab}")
        if self.relative_buckets < 2 or self.relative_max_distance < 1:
            raise ConfigError("relative_buckets must be >= 2 and relative_max_distance >= 1")
        if self.norm_eps <= 0:
            raise ConfigError(f"norm_eps must be positive, got {self.norm_eps}")
        check_choices(
            self, {"act_fn": ActFn, "attention_backend": AttentionBackend, "dtype": DType}
        )

    def block_config(self) -> TransformerConfig:
        """The ``TransformerConfig`` view the shared components (RMSNorm, MLP, token checks) read.

        ``positional="none"`` because T5 positions live in the attention bias,
        so no sequence length is refused; ``n_ctx`` is then unused.
        """
        return TransformerConfig(
            d_model=self.d_model,
            n_layers=max(self.n_layers, self.n_decoder_layers),
            n_heads=self.n_heads,
            d_head=self.d_head,
            d_mlp=self.d_mlp,
            d_vocab=self.d_vocab,
            n_ctx=self.relative_max_distance,
            act_fn=self.act_fn,
            gated_mlp=self.gated_mlp,
            normalization="rmsnorm",
            norm_eps=self.norm_eps,
            positional="none",
            attn_qkv_bias=False,
            attn_out_bias=False,
            mlp_bias=False,
            attn_scale=1.0,
            attention_backend=self.attention_backend,
            dtype=self.dtype,
            architecture=self.architecture,
        )
