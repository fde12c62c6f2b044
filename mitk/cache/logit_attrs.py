"""Logit attributions of a stack of stream components (TransformerLens's ``logit_attrs``).

Each component, pushed through the final norm with its cached scale, is
dotted with the unembedding direction of a token (or of a token minus an
incorrect token). The model supplies the directions
(``tokens_to_residual_directions``) and, for string tokens, the token ids
(``to_single_token``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from mitk.cache.norm import apply_ln_to_stack
from mitk.cache.selection import SliceLike
from mitk.errors import ShapeMismatchError, UnsupportedModelError

if TYPE_CHECKING:
    from mitk.cache.activation_cache import ActivationCache

TokenLike = str | int | Tensor
"""One token (a one-token string, an id, a 0-d tensor), or ids ``[batch]``/``[batch, pos]``."""


def _model_method(cache: ActivationCache, method: str) -> Any:
    found = getattr(cache.model, method, None)
    if found is None:
        raise UnsupportedModelError(f"logit_attrs needs the model's {method}(), which it lacks")
    return found


def _token_ids(cache: ActivationCache, tokens: TokenLike) -> Tensor:
    if isinstance(tokens, str):
        return torch.as_tensor(_model_method(cache, "to_single_token")(tokens))
    return torch.as_tensor(tokens)


def logit_attrs(
    cache: ActivationCache,
    residual_stack: Tensor,
    tokens: TokenLike,
    incorrect_tokens: TokenLike | None = None,
    pos_slice: SliceLike = None,
    batch_slice: SliceLike = None,
    has_batch_dim: bool = True,
) -> Tensor:
    """How much each component of ``residual_stack`` moves the logit of ``tokens``.

    Returns ``[component, *lead]``.

    With ``incorrect_tokens`` (same shape as ``tokens``), the logit difference.
    ``pos_slice``/``batch_slice``/``has_batch_dim`` say how the stack was
    sliced (see ``apply_ln_to_stack``). Raises ``ShapeMismatchError`` (a
    ``ValueError``) when the token shapes differ or do not line up with the stack.
    """
    ids = _token_ids(cache, tokens)
    directions = _model_method(cache, "tokens_to_residual_directions")(ids)
    if incorrect_tokens is not None:
        wrong = _token_ids(cache, incorrect_tokens)
        if ids.shape != wrong.shape:
            raise ShapeMismatchError(
                "tokens and incorrect_tokens must have the same shape, got "
                f"{tuple(ids.shape)} and {tuple(wrong.shape)}"
            )
        directions = directions - _model_method(cache, "tokens_to_residual_directions")(wrong)
    scaled = apply_ln_to_stack(
        cache, residual_stack, -1, pos_slice=pos_slice, batch_slice=batch_slice,
        has_batch_dim=has_batch_dim,
    )  # fmt: skip
    try:
        torch.broadcast_shapes(scaled.shape, directions.shape)
    except RuntimeError:
        raise ShapeMismatchError(
            f"token directions {tuple(directions.shape)} do not line up with the stack "
            f"{tuple(scaled.shape)}; give one token per (batch, pos) the stack keeps"
        ) from None
    return (scaled * directions).sum(-1)
