"""Rotary settings of a Hugging Face config: base, partial width and scaling, checked.

Reads the old (``rope_theta``, ``rope_scaling``) and the new (``rope_parameters``)
layouts, resolves each ``rope_type``'s defaults as Hugging Face does, and refuses
a type or parameter it does not implement rather than compute other positions.
"""

from __future__ import annotations

import math
from typing import Any

from mitk.config import RotaryScaling
from mitk.errors import UnsupportedModelError

ROPE_PARAMETERS: dict[str, frozenset[str]] = {
    "default": frozenset(),
    "linear": frozenset({"factor"}),
    "dynamic": frozenset({"factor"}),
    "llama3": frozenset({"factor", "low_freq_factor", "high_freq_factor",
                         "original_max_position_embeddings"}),
    "yarn": frozenset({"factor", "original_max_position_embeddings", "attention_factor",
                       "beta_fast", "beta_slow", "mscale", "mscale_all_dim", "truncate"}),
    "longrope": frozenset({"short_factor", "long_factor", "factor", "attention_factor",
                           "original_max_position_embeddings"}),
}  # fmt: skip
"""The ``rope_parameters`` keys each supported ``rope_type`` reads, besides theta and type."""
_ROPE_COMMON = frozenset({"rope_type", "type", "rope_theta", "partial_rotary_factor"})
LONGROPE_RERUNS_AT_SWITCH = frozenset({"phi3"})
"""Families whose HF ``generate`` reruns the sequence once LongRoPE takes its long factors
(``RotaryScaling.recompute_at_switch``); the others (LLaMA) keep the keys they cached."""


def rope_fields(
    hf: dict[str, Any], d_head: int, default_fraction: float = 1.0, *, scaled: bool = False
) -> dict[str, Any]:
    """``positional``, ``rotary_dim``, ``rotary_base`` (and ``rotary_scaling``) for a HF config.

    Reads the old (``rope_theta``, ``rope_scaling``) and the new
    (``rope_parameters``) layout. Families whose attention applies scaling pass
    ``scaled=True`` and get ``linear``/``dynamic``/``yarn``/``llama3``/``longrope``; any
    other ``rope_type``, or an unknown key of a supported one, raises
    ``UnsupportedModelError`` rather than silently computing different positions.
    """
    params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    rope_type = params.get("rope_type", params.get("type", "default"))
    supported = sorted(ROPE_PARAMETERS) if scaled else ["default"]
    if rope_type not in supported:
        raise UnsupportedModelError(
            f"rope scaling {rope_type!r} is not supported for {hf.get('model_type')}; "
            f"supported: {', '.join(repr(t) for t in supported)}"
        )
    unknown = sorted(set(params) - _ROPE_COMMON - ROPE_PARAMETERS[rope_type])
    if unknown:
        raise UnsupportedModelError(f"rope_type {rope_type!r} parameter(s) {unknown} unsupported")
    base = params.get("rope_theta", hf.get("rope_theta", hf.get("rotary_emb_base", 10000.0)))
    fraction = params.get(
        "partial_rotary_factor", hf.get("partial_rotary_factor", hf.get("rotary_pct"))
    )
    fraction = default_fraction if fraction is None else fraction
    fields = {"positional": "rotary", "rotary_dim": int(d_head * fraction), "rotary_base": base}
    if rope_type == "longrope":
        _check_per_pair_factors(params, fields["rotary_dim"])
    if rope_type != "default":
        fields["rotary_scaling"] = rotary_scaling(hf, params, rope_type)
    return fields


def _check_per_pair_factors(params: dict[str, Any], rotary_dim: int) -> None:
    """LongRoPE's factor lists hold one positive number per rotated pair, or are refused."""
    for key in ("short_factor", "long_factor"):
        factors = params.get(key)
        if not isinstance(factors, list) or not all(
            isinstance(x, int | float) and not isinstance(x, bool) and x > 0 for x in factors
        ):
            raise UnsupportedModelError(
                f"longrope {key} must be a list of positive numbers, got {factors!r}"
            )
        if len(factors) != rotary_dim // 2:
            raise UnsupportedModelError(
                f"longrope {key} has {len(factors)} entries; the rotary part has "
                f"rotary_dim / 2 = {rotary_dim // 2} pairs"
            )


def rotary_scaling(hf: dict[str, Any], params: dict[str, Any], rope_type: str) -> RotaryScaling:
    """Hugging Face's scaling parameters with its defaults resolved (see ``RotaryScaling``)."""
    n_ctx = hf["max_position_embeddings"]
    # HF prefers a top-level original_max_position_embeddings (Phi-3) to the rope dict's
    original = hf.get("original_max_position_embeddings") or params.get(
        "original_max_position_embeddings", n_ctx
    )
    if rope_type == "dynamic":  # rescales past max_position_embeddings, whatever else is set
        return RotaryScaling(kind="dynamic", factor=float(params["factor"]), original_context=n_ctx)
    if rope_type == "linear":
        return RotaryScaling(kind="linear", factor=float(params["factor"]))
    if rope_type == "longrope":
        return _longrope_scaling(hf, params, original)
    if rope_type == "llama3":
        return RotaryScaling(
            kind="llama3",
            factor=float(params["factor"]),
            original_context=original,
            low_freq_factor=float(params["low_freq_factor"]),
            high_freq_factor=float(params["high_freq_factor"]),
        )
    factor = params.get("factor") or n_ctx / original
    attention_factor = params.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all_dim = params.get("mscale"), params.get("mscale_all_dim")
        attention_factor = (
            _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim)
            if mscale and mscale_all_dim
            else _yarn_mscale(factor, 1.0)
        )
    return RotaryScaling(
        kind="yarn",
        factor=float(factor),
        original_context=original,
        beta_fast=float(params.get("beta_fast") or 32),
        beta_slow=float(params.get("beta_slow") or 1),
        attention_factor=float(attention_factor),
        truncate=bool(params.get("truncate", True)),
    )


def _longrope_scaling(hf: dict[str, Any], params: dict[str, Any], original: int) -> RotaryScaling:
    """LongRoPE's per-pair factors; its attention factor defaults to HF's
    ``sqrt(1 + ln(factor) / ln(original))``, ``factor = max_position_embeddings / original``."""
    factor = params.get("factor") or hf["max_position_embeddings"] / original
    attention_factor = params.get("attention_factor")
    if attention_factor is None:
        extends = factor > 1
        attention_factor = math.sqrt(1 + math.log(factor) / math.log(original)) if extends else 1.0
    return RotaryScaling(
        kind="longrope",
        factor=float(factor),
        original_context=original,
        attention_factor=float(attention_factor),
        short_factor=[float(x) for x in params["short_factor"]],
        long_factor=[float(x) for x in params["long_factor"]],
        recompute_at_switch=hf.get("model_type") in LONGROPE_RERUNS_AT_SWITCH,
    )


def _yarn_mscale(factor: float, mscale: float) -> float:
    """YaRN's magnitude correction ``0.1 * mscale * ln(factor) + 1`` (1 when not extending)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0
