"""TransformerLens's ``HookedTransformerConfig`` to mitk's ``TransformerConfig`` and back.

Each direction refuses, with ``UnsupportedModelError`` naming the field and its
value, what the other library cannot compute the same way. Two conventions
differ: TransformerLens divides the scores by its ``attn_scale`` (mitk
multiplies), and it gives every layer every bias, so mitk's bias switches are
read from the values (a group that is zero everywhere is no bias).
"""

from __future__ import annotations

from collections.abc import Callable
import math
from typing import Any

from torch import Tensor

from mitk.config import DTYPE_NAMES, TORCH_DTYPES, TransformerConfig
from mitk.errors import UnsupportedModelError
from mitk.model.pretrained.mappings import hf_activation
from mitk.model.pretrained.tl_interop.names import BIAS_FIELDS

TL_ACTIVATIONS = {"gelu": "gelu", "gelu_tanh": "gelu_new", "relu": "relu", "silu": "silu"}
"""mitk activation -> TransformerLens's name (TransformerLens's others are Hugging Face's)."""
TL_POSITIONAL = {"standard": "learned", "rotary": "rotary", "alibi": "alibi"}
"""TransformerLens ``positional_embedding_type`` -> mitk ``positional``."""
_OLMO = ("OlmoeForCausalLM", "Olmo2ForCausalLM", "Olmo3ForCausalLM")
# (TransformerLens config field, is this value one mitk cannot reproduce?, what it is)
_REFUSED: tuple[tuple[str, Callable[[Any], bool], str], ...] = (
    ("normalization_type", lambda v: v not in ("LN", "LNPre", "RMS", "RMSPre"),
     "mitk has LayerNorm and RMSNorm (folded or not), not blocks without norms"),
    ("positional_embedding_type", lambda v: v not in TL_POSITIONAL,
     f"mitk supports {sorted(TL_POSITIONAL)}"),
    ("attention_dir", lambda v: v not in ("causal", "bidirectional"), "an unknown direction"),
    ("scale_attn_by_inverse_layer_idx", bool, "per-layer attention scaling is not supported"),
    ("use_qk_norm", bool, "query/key norms are not supported"),
    ("clip_qkv", lambda v: v is not None, "clamping q/k/v is not supported"),
    ("use_logn_attn", bool, "log-n query scaling is not supported"),
    ("use_dynamic_ntk_rope", bool, "dynamic NTK rotary scaling is not supported"),
    ("use_NTK_by_parts_rope", bool, "NTK-by-parts rotary scaling is not supported"),
    ("use_yarn_rope", bool, "YaRN rotary scaling is not supported"),
    ("rotary_scaling_factor", lambda v: v != 1.0, "scaled rotary positions are not supported"),
    ("rotary_base_local", lambda v: v is not None, "a second rotary base is not supported"),
    ("use_attention_sinks", bool, "attention sinks are not supported"),
    ("num_experts", lambda v: v is not None, "mixture-of-experts MLPs are not supported"),
    ("load_in_4bit", bool, "4-bit quantised weights are not supported"),
    ("original_architecture", lambda v: v in _OLMO,
     "OLMo's post-norm blocks and query/key norms are not supported"),
)  # fmt: skip


def _refuse(field: str, value: Any, why: str) -> UnsupportedModelError:
    return UnsupportedModelError(f"TransformerLens config {field}={value!r}: {why}")


def mitk_config(tl: Any, params: dict[str, Tensor]) -> TransformerConfig:
    """The ``TransformerConfig`` of a TransformerLens config and its parameters (for the biases).

    Raises ``UnsupportedModelError`` naming the field for anything mitk cannot reproduce.
    """
    for field, refused, why in _REFUSED:
        if hasattr(tl, field) and refused(getattr(tl, field)):  # older releases lack some
            raise _refuse(field, getattr(tl, field), why)
    norm = tl.normalization_type
    if getattr(tl, "final_rms", False) and not norm.startswith("RMS"):
        raise _refuse("final_rms", True, f"an RMSNorm at the end of {norm} blocks")
    if tl.d_vocab_out not in (-1, tl.d_vocab):
        raise _refuse("d_vocab_out", tl.d_vocab_out, f"mitk unembeds to d_vocab={tl.d_vocab}")
    if tl.dtype not in DTYPE_NAMES:
        raise _refuse("dtype", tl.dtype, f"mitk supports {sorted(map(str, DTYPE_NAMES))}")
    positional = TL_POSITIONAL[tl.positional_embedding_type]
    if tl.post_embedding_ln and (positional == "learned" or norm.startswith("RMS")):
        # TransformerLens norms the token embedding alone with a LayerNorm; mitk's ln_embed
        # norms the sum with the model's own norm: equal only without added positions
        raise _refuse("post_embedding_ln", True, f"with {positional} positions and {norm} norms")
    fields: dict[str, Any] = {
        "d_model": tl.d_model,
        "n_layers": tl.n_layers,
        "n_heads": tl.n_heads,
        "d_head": tl.d_head,
        "d_vocab": tl.d_vocab,
        "n_ctx": tl.n_ctx,
        "d_mlp": 0 if tl.attn_only else tl.d_mlp,
        "n_key_value_heads": tl.n_key_value_heads or tl.n_heads,
        "gated_mlp": bool(tl.gated_mlp),
        "normalization": "rmsnorm" if norm.startswith("RMS") else "layernorm",
        "norm_eps": float(tl.eps),
        "positional": positional,
        "embed_norm": bool(tl.post_embedding_ln),
        "causal": tl.attention_dir == "causal",
        "parallel_attn_mlp": bool(tl.parallel_attn_mlp) and not tl.attn_only,
        "sandwich_norms": bool(tl.use_normalization_before_and_after),
        "attn_softcap": max(float(tl.attn_scores_soft_cap), 0.0),
        "output_softcap": max(float(tl.output_logits_soft_cap), 0.0),
        "dtype": DTYPE_NAMES[tl.dtype],
        "default_prepend_bos": bool(tl.default_prepend_bos),
        "architecture": "transformer_lens",
        "extra": {
            "source": "transformer_lens",
            "model_name": tl.model_name,
            "original_architecture": tl.original_architecture,
            **({"processing": ["fold_ln"]} if norm.endswith("Pre") else {}),
        },
        **_scale_fields(tl),
        **_bias_fields(tl, params),
    }
    try:
        fields["act_fn"] = hf_activation(tl.act_fn)
    except UnsupportedModelError as err:
        if not tl.attn_only:  # an attention-only model never applies it
            raise _refuse("act_fn", tl.act_fn, str(err)) from err
    if positional == "rotary":
        fields |= {
            "rotary_dim": tl.rotary_dim,
            "rotary_base": float(tl.rotary_base),
            "rotary_style": "gptj" if tl.rotary_adjacent_pairs else "neox",
        }
    if tl.use_local_attn:
        fields |= _window_fields(tl)
    return TransformerConfig(**fields)


def _scale_fields(tl: Any) -> dict[str, float]:
    """mitk multiplies the scores by ``attn_scale``; TransformerLens divides by its own."""
    if not tl.use_attn_scale:
        return {"attn_scale": 1.0}
    if tl.attn_scale == math.sqrt(tl.d_head):
        return {}  # mitk's default, 1/sqrt(d_head)
    return {"attn_scale": 1.0 / float(tl.attn_scale)}


def _bias_fields(tl: Any, params: dict[str, Tensor]) -> dict[str, bool]:
    """Each bias group is in mitk's model if TransformerLens's is anywhere non-zero."""
    fields: dict[str, bool] = {}
    for name, value in params.items():
        field = BIAS_FIELDS.get(name.rsplit(".", 1)[-1])
        if field is not None:
            fields[field] = fields.get(field, False) or bool(value.detach().any())
    gated_b_in = [n for n, v in params.items() if n.endswith("mlp.b_in") and bool(v.any())]
    if tl.gated_mlp and gated_b_in:
        raise _refuse(
            "gated_mlp", True, f"with a non-zero {gated_b_in[0]}: TransformerLens adds b_in after "
            "the gate product, mitk to the linear branch",
        )  # fmt: skip
    if tl.attn_only:
        fields.pop("mlp_bias", None)  # no MLP: keep mitk's default
    return fields


def _window_fields(tl: Any) -> dict[str, Any]:
    """TransformerLens's local layers (``q - k < window_size``) as mitk's sliding window."""
    kinds = list(tl.attn_types)
    if set(kinds) - {"global", "local"} or len(kinds) != tl.n_layers:
        raise _refuse("attn_types", kinds, f"one of 'global'/'local' per layer ({tl.n_layers})")
    local = [i for i, kind in enumerate(kinds) if kind == "local"]
    if not local:
        return {}
    return {
        "sliding_window": tl.window_size,
        "sliding_window_layers": None if len(local) == tl.n_layers else local,
    }


def tl_config_fields(cfg: TransformerConfig, folded: bool) -> dict[str, Any]:
    """``HookedTransformerConfig`` arguments for ``cfg``; ``folded``: norms as ``LNPre``/``RMSPre``.

    Raises ``UnsupportedModelError`` naming the mitk field TransformerLens has no equivalent for.
    """
    _check_tl_can_compute(cfg)
    norm = "RMS" if cfg.normalization == "rmsnorm" else "LN"
    positional = {mk: tl for tl, mk in TL_POSITIONAL.items()}[cfg.positional]
    fields: dict[str, Any] = {
        "d_model": cfg.d_model,
        "d_head": cfg.d_head,
        "n_layers": cfg.n_layers,
        "n_ctx": cfg.n_ctx,
        "n_heads": cfg.n_heads,
        "d_vocab": cfg.d_vocab,
        "d_mlp": cfg.d_mlp if cfg.has_mlp else None,
        "attn_only": not cfg.has_mlp,
        "act_fn": TL_ACTIVATIONS[cfg.act_fn],
        "eps": cfg.norm_eps,
        "normalization_type": f"{norm}Pre" if folded else norm,
        "positional_embedding_type": positional,
        "n_key_value_heads": None if cfg.kv_group_size == 1 else cfg.n_key_value_heads,
        "gated_mlp": cfg.gated_mlp,
        "parallel_attn_mlp": cfg.parallel_attn_mlp,
        "attention_dir": "causal" if cfg.causal else "bidirectional",
        "post_embedding_ln": cfg.embed_norm,
        "use_normalization_before_and_after": cfg.sandwich_norms,
        "attn_scores_soft_cap": cfg.attn_softcap or -1.0,
        "output_logits_soft_cap": cfg.output_softcap or -1.0,
        "dtype": TORCH_DTYPES[cfg.dtype],
        "default_prepend_bos": cfg.default_prepend_bos,
        "model_name": cfg.architecture,
    }
    if cfg.attn_scale != cfg.d_head**-0.5:  # otherwise TransformerLens's default, sqrt(d_head)
        fields["attn_scale"] = 1.0 / cfg.attn_scale
    if cfg.positional == "rotary":
        fields |= {
            "rotary_dim": cfg.rotary_dim,
            "rotary_base": cfg.rotary_base,
            "rotary_adjacent_pairs": cfg.rotary_style == "gptj",
        }
    if cfg.sliding_window:
        kinds = ["local" if cfg.window_of(i) else "global" for i in range(cfg.n_layers)]
        fields |= {"use_local_attn": True, "window_size": cfg.sliding_window, "attn_types": kinds}
    return fields


def _check_tl_can_compute(cfg: TransformerConfig) -> None:
    def refuse(field: str, why: str) -> UnsupportedModelError:
        value = getattr(cfg, field)
        return UnsupportedModelError(f"mitk config {field}={value!r}: TransformerLens {why}")

    if cfg.ssm is not None:
        raise refuse("ssm", "HookedTransformer has no state-space (Mamba) layers")
    if cfg.rwkv is not None:
        raise refuse("rwkv", "HookedTransformer has no RWKV (time/channel-mixing) layers")
    if cfg.positional not in TL_POSITIONAL.values():
        raise refuse("positional", f"supports {sorted(TL_POSITIONAL.values())} positions")
    if cfg.token_types:
        raise refuse("token_types", "HookedTransformer has no token-type embedding")
    if cfg.norm_position != "pre":
        raise refuse("norm_position", "HookedTransformer has pre-norm blocks only")
    if not cfg.final_norm or not cfg.has_lm_head:
        raise refuse("has_lm_head" if cfg.final_norm else "final_norm",
                     "HookedTransformer is a language model with a final norm")  # fmt: skip
    if cfg.attention_type != "mha":
        raise refuse("attention_type", "has dense softmax multi-head attention only")
    if cfg.sparse_attention != "none":
        raise refuse("sparse_attention", "has no Sparse Transformer masks")
    if cfg.embed_norm and (cfg.positional == "learned" or cfg.normalization != "layernorm"):
        raise refuse("embed_norm", "norms the token embedding alone, with a LayerNorm")
    if cfg.sandwich_norms and cfg.normalization != "rmsnorm":
        raise refuse("sandwich_norms", "builds sublayer output norms for RMSNorm models only")
    if not cfg.pre_norms:
        raise refuse("pre_norms", "HookedTransformer norms the stream before each sublayer")
    if cfg.qk_norm != "none":
        raise refuse("qk_norm", "HookedTransformer (3.x) has no query/key norms")
    if cfg.rotary_scaling is not None:
        raise refuse("rotary_scaling", "HookedTransformer's rotary scaling is not mapped here")
    if cfg.no_rotary_layers:
        raise refuse("no_rotary_layers", "HookedTransformer rotates every layer")
    if cfg.rotary_local_layers:
        raise refuse("rotary_local_layers", "HookedTransformer has one rotary base for all layers")
    if cfg.attn_sinks:
        raise refuse("attn_sinks", "HookedTransformer has no attention sinks")
    if cfg.moe is not None:
        raise refuse("moe", "mixture-of-experts layers are not mapped to HookedTransformer's")
