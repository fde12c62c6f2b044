"""Guards around every conversion: HF config field types, converted tensors' names and shapes.

One central check instead of one per family: the converters read ``config.json``
fields and tensors trusting them, so their types, ranges and shapes are checked
here, before and after conversion, and failures name the field or the tensor.
"""

from __future__ import annotations

from collections.abc import Callable
import math
import numbers
from typing import Any

from torch import Tensor

from mitk.config.field_types import MAX_SIZE
from mitk.errors import ConfigError, MitkError, ModelFileError

SIZE_FIELDS = frozenset({
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "max_position_embeddings", "n_embd", "n_embed",
    "n_layer", "n_head", "n_inner", "n_positions", "n_ctx", "num_layers", "num_heads",
    "num_decoder_layers", "d_model", "d_kv", "d_ff", "rotary_dim", "sliding_window",
    "window_size", "max_window_layers", "type_vocab_size", "seq_length", "num_experts",
    "num_local_experts", "num_experts_per_tok", "experts_per_token", "moe_intermediate_size",
    "shared_expert_intermediate_size", "n_routed_experts", "n_shared_experts", "n_group",
    "topk_group", "first_k_dense_replace", "kv_lora_rank", "q_lora_rank", "qk_rope_head_dim",
    "qk_nope_head_dim", "v_head_dim", "decoder_sparse_step", "no_rope_layer_interval",
    "relative_attention_num_buckets", "relative_attention_max_distance",
    "original_max_position_embeddings", "sliding_window_pattern", "_sliding_window_pattern",
    "attention_hidden_size", "context_length", "mamba_n_heads", "mamba_n_groups",
    "mamba_d_state", "mamba_d_conv", "mamba_expand", "mamba_chunk_size",
    "num_landmarks", "segment_means_seq_len", "conv_kernel_size", "block_size",
    "num_random_blocks",
})  # fmt: skip
"""Hugging Face fields holding a size or count: an int in ``[0, MAX_SIZE]`` (or null)."""
POSITIVE_REALS = frozenset({
    "layer_norm_eps", "layer_norm_epsilon", "rms_norm_eps", "norm_eps", "rope_theta",
    "rotary_emb_base", "rope_local_base_freq", "query_pre_attn_scalar",
})  # fmt: skip
"""Fields that must be finite positive numbers (or null)."""
REALS = frozenset({
    "partial_rotary_factor", "rotary_pct", "routed_scaling_factor", "logit_scale",
    "attention_multiplier", "embedding_multiplier", "residual_multiplier", "logits_scaling",
    "final_logit_softcapping", "attn_logit_softcapping", "swiglu_limit", "swiglu_alpha",
    "clip_qkv",
})  # fmt: skip
"""Fields that must be finite numbers (or null)."""
INT_LISTS = frozenset({"mlp_only_layers", "no_rope_layers", "attn_layer_indices"})
STR_LISTS = frozenset({"layer_types", "attention_types"})
OBJECTS = frozenset({"rope_scaling", "rope_parameters"})


def check_hf_fields(hf: dict[str, Any]) -> None:
    """Raise ``ConfigError`` naming the first known field of ``hf`` of the wrong type or range."""
    for name, value in hf.items():
        if value is None:
            continue
        if name in SIZE_FIELDS and not _is_size(value):
            raise ConfigError(f"field {name!r} must be an int in [0, {MAX_SIZE}], got {value!r}")
        if name in POSITIVE_REALS and not (_is_real(value) and value > 0):
            raise ConfigError(f"field {name!r} must be a positive number, got {value!r}")
        if name in REALS and not _is_real(value):
            raise ConfigError(f"field {name!r} must be a finite number, got {value!r}")
        if name in INT_LISTS and not (isinstance(value, list) and all(_is_size(v) for v in value)):
            raise ConfigError(f"field {name!r} must be a list of layer numbers, got {value!r}")
        if name in STR_LISTS and not (
            isinstance(value, list) and all(isinstance(v, str | list) for v in value)
        ):
            raise ConfigError(f"field {name!r} must be a list of strings, got {value!r}")
        if name in OBJECTS and not isinstance(value, dict):
            raise ConfigError(f"field {name!r} must be an object, got {value!r}")
        if name in OBJECTS:
            _check_rope_object(name, value)


def _check_rope_object(name: str, rope: dict[str, Any]) -> None:
    for key, value in rope.items():
        if key in ("rope_type", "type") and not isinstance(value, str):
            raise ConfigError(f"field {name}.{key} must be a string, got {value!r}")
        if key == "rope_theta" and not (_is_real(value) and value > 0):
            raise ConfigError(f"field {name}.{key} must be a positive number, got {value!r}")
        numeric = key.endswith(("factor", "_freq", "_fast", "_slow"))
        if numeric and value is not None and not isinstance(value, list) and not _is_real(value):
            raise ConfigError(f"field {name}.{key} must be a finite number, got {value!r}")


def checked_conversion(convert: Callable[[], dict[str, Tensor]], where: str) -> dict[str, Tensor]:
    """``convert()``, with a missing or mis-shaped source tensor a ``ModelFileError`` naming it."""
    try:
        return convert()
    except MitkError:
        raise
    except KeyError as err:
        raise ModelFileError(f"{where} lack tensor {err}") from err
    except (RuntimeError, ValueError, IndexError, TypeError) as err:
        raise ModelFileError(
            f"{where}: a tensor has the wrong shape or type ({type(err).__name__}: {err})"
        ) from err


def check_state_shapes(expected: dict[str, Tensor], state: dict[str, Tensor], where: str) -> None:
    """Raise ``ModelFileError`` naming tensors missing, unexpected or of the wrong shape."""
    missing = sorted(set(expected) - set(state))
    if missing:
        raise ModelFileError(f"{where} lack tensor(s) {', '.join(missing[:5])}")
    unexpected = sorted(set(state) - set(expected))
    if unexpected:
        raise ModelFileError(
            f"{where} hold tensor(s) the model has no place for: {', '.join(unexpected[:5])}"
        )
    for name, tensor in state.items():
        if tensor.shape != expected[name].shape:
            raise ModelFileError(
                f"{where}: tensor {name!r} has shape {tuple(tensor.shape)}, "
                f"expected {tuple(expected[name].shape)}"
            )
        if not (tensor.is_floating_point() or tensor.dtype == expected[name].dtype):
            raise ModelFileError(
                f"{where}: tensor {name!r} has dtype {tensor.dtype}, expected floating point"
            )


def _is_size(value: Any) -> bool:
    return (
        isinstance(value, numbers.Integral)
        and not isinstance(value, bool)
        and 0 <= int(value) <= MAX_SIZE
    )


def _is_real(value: Any) -> bool:
    return (
        isinstance(value, numbers.Real)
        and not isinstance(value, bool)
        and math.isfinite(float(value))
    )
