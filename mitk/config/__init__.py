"""TransformerConfig: the one description of a model's shape and variant choices.

Frozen and validated on construction, so a model built from a config can trust
every field. ``to_json``/``from_json`` round-trip exactly; unknown keys in a
JSON file are an error rather than silently dropped.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
from typing_extensions import Self

from mitk.config import variant_checks
from mitk.config.block_sparse import BlockSparseConfig
from mitk.config.field_types import check_sizes, check_types
from mitk.config.json_config import (
    JsonConfig,
    check_choices,
    check_positive_ints,
    json_object,
)
from mitk.config.longformer import LongformerConfig
from mitk.config.moe import MoEConfig
from mitk.config.nystrom import NystromConfig
from mitk.config.rotary_scaling import RotaryScaling, RotaryScalingKind
from mitk.config.rwkv import RWKVConfig
from mitk.config.ssm import SSMConfig
from mitk.errors import ConfigError

ActFn = Literal["gelu", "gelu_tanh", "relu", "silu"]
Normalization = Literal["layernorm", "rmsnorm"]
Positional = Literal["learned", "sinusoidal", "rotary", "alibi", "none"]
RotaryStyle = Literal["neox", "gptj"]
AttentionBackend = Literal["auto", "sdpa", "eager"]
DType = Literal["float32", "float64", "float16", "bfloat16"]
AttentionType = Literal["mha", "mla", "linear", "performer"]
SparsePattern = Literal["none", "strided", "fixed"]
TORCH_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
"""The torch dtype of each ``DType`` name."""
DTYPE_NAMES: dict[torch.dtype, str] = {dtype: name for name, dtype in TORCH_DTYPES.items()}


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype for a ``DType`` name; ``ConfigError`` listing the choices otherwise."""
    if name not in TORCH_DTYPES:
        raise ConfigError(f"unknown dtype {name!r}; choose one of {', '.join(TORCH_DTYPES)}")
    return TORCH_DTYPES[name]


def loading_overrides(
    dtype: torch.dtype | str | None, attention_backend: str | None
) -> dict[str, Any]:
    """Config fields a loader's ``dtype=`` / ``attention_backend=`` arguments set (None: keep)."""
    overrides: dict[str, Any] = {}
    if dtype is not None:
        overrides["dtype"] = (
            DTYPE_NAMES.get(dtype, dtype) if isinstance(dtype, torch.dtype) else dtype
        )
    if attention_backend is not None:
        overrides["attention_backend"] = attention_backend
    return overrides


NormPosition = Literal["pre", "post"]
QKNorm = Literal["none", "head", "projection", "head_layernorm"]


@dataclass(frozen=True)
class TransformerConfig(JsonConfig):
    """Shape and variant choices of a transformer; every field is validated."""

    d_model: int
    """Width of the residual stream."""
    n_layers: int
    """Number of transformer blocks."""
    n_heads: int
    """Query heads per attention layer."""
    d_vocab: int
    """Vocabulary size: token ids lie in ``[0, d_vocab)``."""
    n_ctx: int
    """Longest sequence the positional scheme was trained for."""
    d_head: int = -1
    """Width of one head; -1 means ``d_model // n_heads``."""
    d_mlp: int = -1
    """Hidden width of the MLP; -1 means ``4 * d_model``; 0 means no MLP (attention-only)."""
    n_key_value_heads: int = -1
    """Key/value heads (grouped-query attention); -1 means ``n_heads``."""
    act_fn: ActFn = "gelu_tanh"
    """MLP nonlinearity; ``gelu_tanh`` is GPT-2's ``gelu_new``."""
    gated_mlp: bool = False
    """Gated MLP (``act(x W_gate) * (x W_in)``), as in SwiGLU/GeGLU."""
    normalization: Normalization = "layernorm"
    """Norm used before each sublayer and at the end."""
    norm_eps: float = 1e-5
    """Epsilon added to the variance inside every norm."""
    positional: Positional = "learned"
    """How position enters the model."""
    rotary_dim: int = -1
    """Dimensions of each head that rotary embeddings rotate; -1 means ``d_head``."""
    rotary_base: float = 10000.0
    """Base of the rotary frequency ladder."""
    rotary_style: RotaryStyle = "neox"
    """Rotated pairs: ``neox`` is ``(i, i + rotary_dim/2)`` (LLaMA...), ``gptj`` ``(2i, 2i+1)``."""
    rotary_scaling: RotaryScaling | None = None
    """Context-extension scaling of the rotary frequencies (Llama 3, YaRN...); None: unscaled."""
    rotary_local_layers: list[int] | None = None
    """Layers whose rotary uses ``rotary_local_base``, unscaled (Gemma 3's local layers);
    None: every rotary layer uses ``rotary_base`` and ``rotary_scaling``."""
    rotary_local_base: float = 10000.0
    """Base of the ``rotary_local_layers``' frequency ladder."""
    no_rotary_layers: list[int] | None = None
    """Rotary layers that apply no positional encoding at all (SmolLM3's NoPE layers);
    their ``hook_rot_q``/``hook_rot_k`` see the unrotated queries and keys."""
    sliding_window: int = 0
    """Causal attention sees only the last ``sliding_window`` positions (Mistral); 0: no window."""
    sliding_window_layers: list[int] | None = None
    """Layers the window applies to (Qwen2 windows only some); None means every layer."""
    embed_norm: bool = False
    """A norm (``ln_embed``) right after the embeddings, before block 0 (BLOOM, BERT)."""
    token_types: int = 0
    """Rows of a token-type (segment) embedding added to the stream (BERT: 2); 0: none."""
    norm_position: NormPosition = "pre"
    """``pre``: ``x + f(ln(x))`` (GPT-2...); ``post``: ``ln(x + f(x))`` per sublayer (BERT)."""
    final_norm: bool = True
    """A norm (``ln_final``) before the unembedding; BERT's encoder output has none."""
    has_lm_head: bool = True
    """The unembedding is a trained LM head; False (a bare encoder) refuses logits and loss."""
    causal: bool = True
    """Causal (decoder) attention; False gives bidirectional (encoder) attention."""
    parallel_attn_mlp: bool = False
    """Attention and MLP both read ``resid_pre`` and add into the stream together."""
    attn_qkv_bias: bool = True
    """Query/key/value projections carry biases."""
    attn_out_bias: bool = True
    """Attention output projection carries a bias."""
    mlp_bias: bool = True
    """MLP projections carry biases."""
    unembed_bias: bool = False
    """The unembedding carries a bias ``b_U``."""
    attn_scale: float = -1.0
    """Multiplier on ``q·k``; -1 means ``1/sqrt(d_head)``."""
    attention_backend: AttentionBackend = "auto"
    """``auto``: fused unless a hook needs scores/patterns; ``sdpa``/``eager`` force a path."""
    dtype: DType = "float32"
    """Dtype of the weights and activations."""
    architecture: str = "gpt2"
    """Family the weights came from (informational; used when loading and reporting)."""
    default_prepend_bos: bool = True
    """Whether ``to_tokens`` prepends the BOS token unless told otherwise."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Free-form provenance (source checkpoint, training run); never read by the forward."""
    attention_type: AttentionType = "mha"
    """``mha``: multi-head/grouped-query attention; ``mla``: DeepSeek-V2 latent attention;
    ``linear``: causal kernel linear attention (``elu + 1`` features; see
    ``mitk.model.linear_attention``); ``performer``: the same with FAVOR+ random features
    that approximate softmax attention (``performer_features``, ``performer_seed``).

    With ``mla``, ``d_head`` is the query/key head width (non-rotary + rotary parts),
    ``rotary_dim`` its trailing rotary part, and the fields below apply."""
    sparse_attention: SparsePattern = "none"
    """Sparse Transformer patterns (Child et al. 2019), one mask for every head of every layer
    (the union of the paper's two head types), on top of causality: ``strided``: the last
    ``sparse_block`` positions and every ``sparse_block``-th one before; ``fixed``: the
    query's own block of ``sparse_block`` positions and the last ``sparse_summary`` of
    every block. Runs fused (as an SDPA mask); ``hook_pattern`` shows the zeros."""
    sparse_block: int = 0
    """``strided``/``fixed``: the stride or block length ``l``."""
    sparse_summary: int = 1
    """``fixed``: positions at the end of each block that every later query sees (``c``)."""
    performer_features: int = 256
    """``performer``: random features per head (FAVOR+'s ``m``); more approximate softmax
    attention more closely."""
    performer_seed: int = 0
    """``performer``: seed of the fixed random feature directions (each layer draws its own)."""
    q_lora_rank: int = 0
    """MLA: rank of the low-rank query path (``W_q_b(norm(W_q_a x))``); 0: one ``W_q_packed``."""
    kv_lora_rank: int = 0
    """MLA: width of the joint key-value latent ``hook_kv_latent`` (must be > 0 for ``mla``)."""
    v_head_dim: int = -1
    """MLA: width of one value head (``hook_v``/``hook_z``); -1 means ``d_head``."""
    latent_norm_eps: float = 1e-6
    """MLA: epsilon of the RMSNorms on the query and key-value latents."""
    sandwich_norms: bool = False
    """Gemma-2: sublayer outputs are normalised (``ln1_post``, ``ln2_post``) before being added."""
    attn_softcap: float = 0.0
    """Attention scores become ``cap * tanh(scores / cap)`` (Gemma-2); 0: no soft-capping."""
    output_softcap: float = 0.0
    """Logits become ``cap * tanh(logits / cap)`` (Gemma-2); 0: no soft-capping."""
    pre_norms: bool = True
    """Sublayers read a normed stream (``ln1``/``ln2``); False (OLMo 2): they read the raw
    stream, there is no ``ln1``/``ln2``, and ``sandwich_norms`` norm their outputs."""
    qk_norm: QKNorm = "none"
    """RMSNorm on queries and keys before rotary (``attn.q_norm``/``attn.k_norm``): ``head``
    normalises each head's ``d_head`` (Qwen 3), ``projection`` all heads together (OLMo 2);
    ``head_layernorm``: a LayerNorm on each head, with weights of its own per head (Cohere,
    StableLM)."""
    attn_sinks: bool = False
    """Each head has a learned sink logit ``attn.sinks`` that joins every softmax (gpt-oss)."""
    moe: MoEConfig | None = None
    """Mixture-of-experts MLPs (router, top-k experts, shared expert); None: dense MLPs."""
    ssm: SSMConfig | None = None
    """Selective state-space (Mamba) mixers: the layers it names have one mixer block
    (``resid + mixer(ln1(resid))``) instead of attention and MLP; None: none."""
    rwkv: RWKVConfig | None = None
    """RWKV-4 blocks in every layer: time mixing (``blocks.L.mixer``) in place of attention,
    channel mixing (``blocks.L.mlp``, ``d_mlp`` wide) in place of the MLP; None: none."""
    longformer: LongformerConfig | None = None
    """Longformer attention in every layer: a sliding window plus global tokens (picked per
    input by ``forward``'s ``global_attention_mask``), which attend through projections of
    their own; needs a bidirectional encoder with learned positions. None: dense attention."""
    slot_positions: bool = False
    """Position ids are sequence slots (``0..n-1``, padding counted), as Hugging Face numbers
    them in BERT-style encoders; False: they count real tokens only. It matters where padded
    tokens reach real ones (Nyströmformer's landmarks and convolution)."""
    nystrom: NystromConfig | None = None
    """Nyströmformer attention in every layer (landmarks, an iterative pseudo-inverse and a
    convolution skip on the values; see ``NystromConfig``); None: exact attention."""
    block_sparse: BlockSparseConfig | None = None
    """BigBird's block-sparse attention in every layer (window, global and random blocks;
    see ``BlockSparseConfig``); None: dense attention."""
    device: str = field(default="cpu", compare=False)
    """Where the weights live (``"cpu"``, ``"cuda:0"``): a model is built there and keeps
    this up to date through ``model.to(...)``. Not part of ``==`` or of the saved JSON, so
    a model saved on a GPU loads on the CPU (``from_pretrained(..., device=)`` moves it)."""

    PLACEMENT_FIELDS: ClassVar[tuple[str, ...]] = ("device",)

    def __post_init__(self) -> None:
        # types first: the derived defaults below compute with the values
        check_types(type(self), {k: v for k, v in vars(self).items() if k != "device"})
        check_sizes(self, _SIZES)
        set_ = object.__setattr__  # frozen: fill the derived defaults once, here
        if self.d_head == -1 and self.n_heads > 0:
            set_(self, "d_head", self.d_model // self.n_heads)
        if self.d_mlp == -1:
            set_(self, "d_mlp", 4 * self.d_model)
        if self.n_key_value_heads == -1:
            set_(self, "n_key_value_heads", self.n_heads)
        if self.rotary_dim == -1:
            set_(self, "rotary_dim", self.d_head)
        if self.attn_scale == -1.0 and self.d_head > 0:
            set_(self, "attn_scale", self.d_head**-0.5)
        if self.v_head_dim == -1:
            set_(self, "v_head_dim", self.d_head)
        try:  # TransformerLens passes torch.device objects or "cuda"; keep torch's spelling
            set_(self, "device", str(torch.device(self.device)))
        except (RuntimeError, TypeError) as err:
            raise ConfigError(f"device must name a torch device, got {self.device!r}") from err
        self._validate()

    def _validate(self) -> None:
        check_positive_ints(self, ("d_model", "n_layers", "n_heads", "d_vocab", "n_ctx", "d_head"))
        if not isinstance(self.d_mlp, int) or self.d_mlp < 0:
            raise ConfigError(f"d_mlp must be >= 0 (0 = attention-only), got {self.d_mlp!r}")
        if self.n_key_value_heads <= 0 or self.n_heads % self.n_key_value_heads:
            raise ConfigError(
                f"n_heads ({self.n_heads}) must be a multiple of "
                f"n_key_value_heads ({self.n_key_value_heads})"
            )
        if self.positional == "rotary" and not (
            0 < self.rotary_dim <= self.d_head and self.rotary_dim % 2 == 0
        ):
            raise ConfigError(
                f"rotary_dim must be even and in (0, d_head={self.d_head}], got {self.rotary_dim}"
            )
        if self.sliding_window < 0:
            raise ConfigError(f"sliding_window must be >= 0 (0 = none), got {self.sliding_window}")
        if self.sliding_window_layers is not None and not all(
            0 <= layer < self.n_layers for layer in self.sliding_window_layers
        ):
            raise ConfigError(
                f"sliding_window_layers must lie in [0, {self.n_layers}), "
                f"got {self.sliding_window_layers}"
            )
        for name in ("rotary_local_layers", "no_rotary_layers"):
            layers = getattr(self, name)
            if layers is not None and (
                self.positional != "rotary"
                or self.attention_type != "mha"
                or not all(isinstance(i, int) and 0 <= i < self.n_layers for i in layers)
            ):
                raise ConfigError(
                    f"{name} needs positional='rotary', attention_type='mha' and layers in "
                    f"[0, {self.n_layers}), got {layers}"
                )
        if self.rotary_local_base <= 0:
            raise ConfigError(f"rotary_local_base must be positive, got {self.rotary_local_base}")
        if self.token_types < 0:
            raise ConfigError(f"token_types must be >= 0 (0 = none), got {self.token_types}")
        if self.norm_position == "post" and (not self.has_mlp or self.parallel_attn_mlp):
            raise ConfigError("norm_position='post' needs a sequential attention + MLP block")
        if self.attn_softcap < 0 or self.output_softcap < 0:
            raise ConfigError("attn_softcap and output_softcap must be >= 0 (0 = none)")
        if self.sandwich_norms and (self.parallel_attn_mlp or not self.has_mlp):
            raise ConfigError("sandwich_norms needs a sequential attention + MLP block")
        if self.norm_eps <= 0:
            raise ConfigError(f"norm_eps must be positive, got {self.norm_eps}")
        if self.attn_scale <= 0:
            raise ConfigError(f"attn_scale must be positive, got {self.attn_scale}")
        check_choices(self, _CHOICES)
        self._validate_variants()
        if self.attention_type == "mla":
            variant_checks.check_mla(self)
        if self.kernel_attention:
            variant_checks.check_kernel_attention(self)
        if self.sparse_attention != "none":
            variant_checks.check_sparse_patterns(self)

    def _validate_variants(self) -> None:
        scaling = self.rotary_scaling
        if scaling is not None and not isinstance(scaling, RotaryScaling):
            raise ConfigError(f"rotary_scaling must be a RotaryScaling or None, got {scaling!r}")
        if scaling is not None and (self.positional != "rotary" or self.attention_type != "mha"):
            raise ConfigError("rotary_scaling needs positional='rotary' and attention_type='mha'")
        if scaling is not None:
            scaling.check_rotary_dim(self.rotary_dim)
        if self.qk_norm != "none" and self.attention_type != "mha":
            raise ConfigError(f"qk_norm={self.qk_norm!r} needs attention_type='mha'")
        if self.attn_sinks and (self.attention_type != "mha" or self.positional == "alibi"):
            raise ConfigError("attn_sinks needs attention_type='mha' and no ALiBi bias")
        if self.moe is not None and not isinstance(self.moe, MoEConfig):
            raise ConfigError(f"moe must be a MoEConfig or None, got {self.moe!r}")
        if self.moe is not None and not all(
            isinstance(i, int) and 0 <= i < self.n_layers for i in self.moe.layers or ()
        ):
            raise ConfigError(f"moe layers must lie in [0, {self.n_layers}), got {self.moe.layers}")
        if self.ssm is not None:
            variant_checks.check_ssm(self)
        if self.rwkv is not None:
            variant_checks.check_rwkv(self)
        for kind, record in ENCODER_ATTENTION.items():
            if getattr(self, kind) is not None:
                variant_checks.check_encoder_attention(self, kind, record)
        if not self.pre_norms and not (self.sandwich_norms and self.norm_position == "pre"):
            raise ConfigError("pre_norms=False needs sandwich_norms=True and norm_position='pre'")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Self:
        """As ``JsonConfig.from_dict``; nested dicts become ``RotaryScaling``/``MoEConfig``."""
        records = (
            ("rotary_scaling", RotaryScaling), ("moe", MoEConfig), ("ssm", SSMConfig),
            ("rwkv", RWKVConfig), ("longformer", LongformerConfig),
            ("nystrom", NystromConfig),
            ("block_sparse", BlockSparseConfig),
        )  # fmt: skip
        for key, record in records:
            if isinstance(data.get(key), dict):
                check_types(record, data[key], prefix=f"{key}.")
                data = {**data, key: record.from_dict(data[key])}
        return super().from_dict(data)

    @property
    def has_mlp(self) -> bool:
        """True unless the model is attention-only."""
        return self.d_mlp > 0

    def window_of(self, layer: int) -> int:
        """The sliding window of ``layer``'s attention (0: it sees every earlier position)."""
        if self.sliding_window_layers is not None and layer not in self.sliding_window_layers:
            return 0
        return self.sliding_window

    def is_ssm_layer(self, layer: int) -> bool:
        """Whether ``layer``'s block is a state-space mixer (see ``ssm``)."""
        return self.ssm is not None and self.ssm.applies_to(layer)

    def has_mixer(self, layer: int) -> bool:
        """Whether ``layer`` mixes positions with a recurrent mixer (``blocks.L.mixer``, a
        Mamba or RWKV time-mixing layer) instead of attention."""
        return self.rwkv is not None or self.is_ssm_layer(layer)

    def is_moe_layer(self, layer: int) -> bool:
        """Whether ``layer``'s MLP is a mixture of experts (see ``moe``)."""
        return self.moe is not None and self.moe.applies_to(layer)

    def rotary_of(self, layer: int) -> tuple[float, RotaryScaling | None] | None:
        """``layer``'s rotary base and scaling, or None where it encodes no position by rotation.

        None for non-rotary models and ``no_rotary_layers``; ``rotary_local_layers``
        get ``(rotary_local_base, None)``; the rest ``(rotary_base, rotary_scaling)``.
        """
        if self.positional != "rotary" or layer in (self.no_rotary_layers or ()):
            return None
        if layer in (self.rotary_local_layers or ()):
            return self.rotary_local_base, None
        return self.rotary_base, self.rotary_scaling

    @property
    def kernel_attention(self) -> bool:
        """Whether attention weighs keys by ``phi(q) . phi(k)`` (``linear``, ``performer``):
        no bilinear QK form, and a recurrent state instead of keys and values."""
        return self.attention_type in ("linear", "performer")

    @property
    def kv_group_size(self) -> int:
        """Query heads sharing one key/value head (1 for plain multi-head attention)."""
        return self.n_heads // self.n_key_value_heads


_SIZES = ("d_model", "n_layers", "n_heads", "d_vocab", "n_ctx", "d_head", "d_mlp", "token_types")
"""Fields refused above ``field_types.MAX_SIZE``: no real model is that large in any of them."""
ENCODER_ATTENTION: dict[str, type] = {
    "longformer": LongformerConfig,
    "nystrom": NystromConfig,
    "block_sparse": BlockSparseConfig,
}
"""The attention kinds that replace bidirectional attention's computation, and their records."""
_CHOICES: dict[str, Any] = {
    "act_fn": ActFn,
    "normalization": Normalization,
    "positional": Positional,
    "rotary_style": RotaryStyle,
    "attention_backend": AttentionBackend,
    "dtype": DType,
    "attention_type": AttentionType,
    "norm_position": NormPosition,
    "qk_norm": QKNorm,
    "sparse_attention": SparsePattern,
}

__all__ = [
    "ActFn", "AttentionBackend", "AttentionType", "DType", "JsonConfig", "LongformerConfig",
    "MoEConfig",
    "NormPosition", "Normalization", "Positional", "QKNorm", "RWKVConfig", "RotaryScaling",
    "RotaryScalingKind", "RotaryStyle", "SSMConfig", "TransformerConfig", "check_choices",
    "check_positive_ints", "json_object", "loading_overrides", "torch_dtype",
]  # fmt: skip
