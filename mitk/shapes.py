"""The axis vocabulary: jaxtyping aliases used in every public signature.

Axis names, written once so every module spells them the same way:
``batch``, ``pos`` (query position), ``key_pos``, ``head``, ``kv_head``,
``d_model``, ``d_head``, ``d_mlp``, ``d_vocab``, ``layer``, ``component``.
"""

from __future__ import annotations

from jaxtyping import Bool, Float, Int
from torch import Tensor

Tokens = Int[Tensor, "batch pos"]
AttentionMask = Int[Tensor, "batch pos"]
Residual = Float[Tensor, "batch pos d_model"]
Logits = Float[Tensor, "batch pos d_vocab"]
PerHead = Float[Tensor, "batch pos head d_head"]
Pattern = Float[Tensor, "batch head pos key_pos"]
Neurons = Float[Tensor, "batch pos d_mlp"]
Scalar = Float[Tensor, ""]

__all__ = [
    "AttentionMask",
    "Bool",
    "Float",
    "Int",
    "Logits",
    "Neurons",
    "Pattern",
    "PerHead",
    "Residual",
    "Scalar",
    "Tensor",
    "Tokens",
]
