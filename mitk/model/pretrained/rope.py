"""Rotary settings from a Hugging Face config, old (``rope_theta``) or new (``rope_parameters``)."""

from __future__ import annotations

from typing import Any

from mitk.errors import UnsupportedModelError


def rope_fields(hf: dict[str, Any], d_head: int, default_fraction: float = 1.0) -> dict[str, Any]:
    """``positional``, ``rotary_dim`` and ``rotary_base`` for a rotary HF config.

    Only unscaled rotary embeddings are supported: any ``rope_scaling`` type
    other than ``default`` raises ``UnsupportedModelError`` rather than
    silently computing different positions.
    """
    params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type != "default":
        raise UnsupportedModelError(
            f"rope scaling {rope_type!r} is not supported; supported: 'default' (unscaled)"
        )
    base = params.get("rope_theta", hf.get("rope_theta", hf.get("rotary_emb_base", 10000.0)))
    fraction = params.get(
        "partial_rotary_factor", hf.get("partial_rotary_factor", hf.get("rotary_pct"))
    )
    fraction = default_fraction if fraction is None else fraction
    return {"positional": "rotary", "rotary_dim": int(d_head * fraction), "rotary_base": base}
