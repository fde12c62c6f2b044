"""Hugging Face Gemma 3 text checkpoints (``gemma3_text``) to mitk weights.

Gemma-2's conversion (see ``gemma.py``: ``1 + w`` norm weights folded at load,
embedding scale folded into ``W_E``, sandwich norms, ``query_pre_attn_scalar``,
soft-caps when configured) plus:

- per-head q/k RMSNorms (``cfg.qk_norm = "head"``), whose ``1 + w`` weight is
  folded like the other norms;
- local (sliding-window) and global layers by ``layer_types`` (or, in older
  configs, every ``sliding_window_pattern``-th layer global);
- a rotary base per layer kind: local layers use ``rope_local_base_freq``
  unscaled (``cfg.rotary_local_layers``/``rotary_local_base``), global layers
  ``rope_theta`` with any ``rope_scaling``. transformers 5 writes both as
  ``rope_parameters`` keyed by layer type; older configs use the flat fields.
"""

from __future__ import annotations

from typing import Any

from mitk.config import TransformerConfig
from mitk.errors import UnsupportedModelError
from mitk.model.pretrained import mappings, rope
from mitk.model.pretrained.gemma import gemma_config, gemma_state_dict

KNOWN_FIELDS = frozenset({
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
    "num_attention_heads", "num_key_value_heads", "head_dim", "hidden_activation",
    "hidden_act", "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings",
    "rope_parameters", "rope_scaling", "rope_theta", "rope_local_base_freq", "attention_bias",
    "query_pre_attn_scalar", "sliding_window", "sliding_window_pattern",
    "_sliding_window_pattern", "layer_types", "final_logit_softcapping",
    "attn_logit_softcapping", "use_bidirectional_attention",
    "cache_implementation",  # which KV cache generate() builds: not the forward
})  # fmt: skip
"""``config.json`` fields the conversion reads or knows to be inert; others are refused."""
LOCAL, GLOBAL = "sliding_attention", "full_attention"


def gemma3_config(hf: dict[str, Any], **overrides: Any) -> TransformerConfig:
    """TransformerConfig equivalent to a Gemma 3 text ``config.json``.

    Raises ``UnsupportedModelError`` for unknown fields, layer types other than
    local and global, and scaling of the local layers' rotary.
    """
    mappings.refuse_unknown_fields(hf, KNOWN_FIELDS)
    layer_types = _layer_types(hf)
    global_params, local_params = _rope_parameters(hf)
    d_head = hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"]
    # the same reading as the global layers', without scaling: a scaled local ladder is refused
    local_hf = {"model_type": hf["model_type"], "rope_parameters": local_params}
    local = rope.rope_fields(local_hf, d_head)
    fields = {
        "qk_norm": "head",
        "rotary_local_layers": [i for i, kind in enumerate(layer_types) if kind == LOCAL],
        "rotary_local_base": float(local["rotary_base"]),
    }
    # what gemma_config (through llama_config) reads: the global ladder in the flat layout
    flat = {**hf, "layer_types": layer_types, "rope_parameters": global_params}
    flat["rope_scaling"] = None
    return gemma_config(flat, **{**fields, **overrides})


def _layer_types(hf: dict[str, Any]) -> list[str]:
    """Each layer's kind, from ``layer_types`` or every ``sliding_window_pattern``-th global."""
    layer_types = hf.get("layer_types")
    if layer_types is None:
        pattern = hf.get("sliding_window_pattern") or hf.get("_sliding_window_pattern") or 6
        n_layers = hf["num_hidden_layers"]
        layer_types = [LOCAL if (i + 1) % pattern else GLOBAL for i in range(n_layers)]
    unknown = sorted(set(layer_types) - {LOCAL, GLOBAL})
    if unknown:
        raise UnsupportedModelError(f"gemma3_text layer types {unknown} are not supported")
    return list(layer_types)


def _rope_parameters(hf: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The global and the local layers' rope parameters, from either config layout."""
    params = hf.get("rope_parameters") or {}
    if GLOBAL in params or LOCAL in params:
        default = {"rope_type": "default"}
        return dict(params.get(GLOBAL) or default), dict(params.get(LOCAL) or default)
    global_params = {**(hf.get("rope_scaling") or {}), **params}
    global_params.setdefault("rope_theta", hf.get("rope_theta", 1_000_000.0))
    local_theta = hf.get("rope_local_base_freq", 10_000.0)
    return global_params, {"rope_type": "default", "rope_theta": local_theta}


gemma3_state_dict = gemma_state_dict
"""Gemma 3's weights are Gemma-2's plus ``q_norm``/``k_norm``, which ``gemma_state_dict``
reads (through ``llama_state_dict``) and folds (``1 + w``) with the other norms."""
