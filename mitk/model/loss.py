"""Next-token cross-entropy computed in chunks of tokens, never holding all the logits."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
import torch.nn.functional as F

from mitk.errors import ShapeMismatchError
from mitk.shapes import Float, Int, Scalar

LOSS_CHUNK = 256
"""Predicting positions (over the whole batch) unembedded at once."""


def next_token_loss(
    hidden: Float[Tensor, "batch pos d_in"],
    tokens: Int[Tensor, "batch pos"],
    key_valid: Tensor | None,
    unembed: Callable[[Tensor], Tensor],
    chunk: int | None = None,
) -> Scalar:
    """Mean cross-entropy of predicting ``tokens[:, i + 1]`` from position ``i`` (fp32).

    Only pairs where both positions are real tokens (``key_valid``, True at
    real tokens; None: all real) count. The predicting positions of the whole
    batch are unembedded ``chunk`` (default ``LOSS_CHUNK``) at a time (in fp32 for a stable
    log-softmax), so memory stays flat in both batch and context. Pass
    ``unembed=identity`` (``loss_from_logits``) when ``hidden`` already holds logits.
    """
    losses, _ = _pair_losses(hidden, tokens, key_valid, unembed, chunk)
    return losses.sum() / losses.shape[0]


def next_token_losses(
    hidden: Float[Tensor, "batch pos d_in"],
    tokens: Int[Tensor, "batch pos"],
    key_valid: Tensor | None,
    unembed: Callable[[Tensor], Tensor],
    chunk: int | None = None,
) -> Float[Tensor, "batch pos_minus_1"]:
    """Per-pair losses ``[batch, pos - 1]`` (fp32), as TransformerLens's ``per_token=True``.

    Entry ``[b, i]`` is the loss of predicting ``tokens[b, i + 1]`` from
    position ``i``; pairs touching padding are 0. Same chunked computation as
    ``next_token_loss``.
    """
    losses, keep = _pair_losses(hidden, tokens, key_valid, unembed, chunk)
    batch, pos = tokens.shape
    if keep is None:
        return losses.view(batch, pos - 1)
    out = losses.new_zeros(batch * (pos - 1))
    out[keep] = losses
    return out.view(batch, pos - 1)


def loss_from_logits(
    logits: Float[Tensor, "..."],
    tokens: Int[Tensor, "..."],
    attention_mask: Tensor | None = None,
    per_token: bool = False,
) -> Float[Tensor, "*loss_shape"]:
    """TransformerLens's ``loss_fn`` on logits already computed: mean, or ``[batch, pos - 1]``.

    ``logits`` ``[batch, pos, d_vocab]``, ``tokens`` ``[batch, pos]``;
    ``attention_mask`` ``[batch, pos]`` (1 or True at real tokens) drops pairs
    touching padding. Mismatched shapes raise ``ShapeMismatchError``.
    """
    if logits.ndim != 3 or tuple(logits.shape[:2]) != tuple(tokens.shape):
        raise ShapeMismatchError(
            f"logits {tuple(logits.shape)} must be [batch, pos, d_vocab] for tokens "
            f"{tuple(tokens.shape)} [batch, pos]"
        )
    if attention_mask is not None and tuple(attention_mask.shape) != tuple(tokens.shape):
        raise ShapeMismatchError(
            "attention_mask must have the same shape as tokens, "
            f"got {tuple(attention_mask.shape)} and {tuple(tokens.shape)}"
        )
    valid = None if attention_mask is None else attention_mask.to(logits.device).bool()
    tokens = tokens.to(logits.device)
    pick = next_token_losses if per_token else next_token_loss
    return pick(logits, tokens, valid, _identity)


def _identity(logits: Tensor) -> Tensor:
    return logits


def _pair_losses(
    hidden: Tensor,
    tokens: Tensor,
    key_valid: Tensor | None,
    unembed: Callable[[Tensor], Tensor],
    chunk: int | None,
) -> tuple[Tensor, Tensor | None]:
    """Losses of the pairs that count, flat, and which flat pairs they are (None: all)."""
    chunk = chunk or LOSS_CHUNK
    if tokens.shape[1] < 2:
        raise ValueError("a next-token loss needs at least two positions")
    inputs = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    targets = tokens[:, 1:].reshape(-1)
    keep = None
    if key_valid is not None:  # padding pairs cost nothing: drop them before unembedding
        keep = (key_valid[:, 1:] & key_valid[:, :-1]).reshape(-1)
        inputs, targets = inputs[keep], targets[keep]
    parts = [hidden.new_zeros(0, dtype=torch.float32)]
    for start in range(0, targets.shape[0], chunk):
        part = slice(start, start + chunk)
        logits = unembed(inputs[None, part]).float()[0]  # the unembed reads [batch, pos, d]
        parts.append(F.cross_entropy(logits, targets[part], reduction="none"))
    return torch.cat(parts), keep
