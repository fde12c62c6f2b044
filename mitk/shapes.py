"""The axis vocabulary: jaxtyping aliases used in every public signature.

Axis names, written once so every module spells them the same way:
``batch``, ``pos`` (query position), ``key_pos``, ``head``, ``kv_head``,
``d_model``, ``d_head``, ``d_mlp``, ``d_vocab``, ``layer``, ``component``.
"""

from __future__ import annotations

from jaxtyping import Bool, Float, Int
from torch import Tensor

# a 0-d tensor (a loss, a metric): the only composite alias public signatures use
Scalar = Float[Tensor, ""]

__all__ = ["Bool", "Float", "Int", "Scalar", "Tensor"]
