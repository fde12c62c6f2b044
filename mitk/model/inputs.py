"""Checks on what callers pass to a forward, so mistakes fail loudly and early."""

from __future__ import annotations

import torch
from torch import Tensor

from mitk.config import TransformerConfig
from mitk.errors import InvalidTokensError, SequenceTooLongError, ShapeMismatchError

_INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def checked_tokens(tokens: object, cfg: TransformerConfig) -> Tensor:
    """``tokens`` as a ``[batch, pos]`` int64 tensor, or a clear error.

    A 1-D tensor is taken as one sequence. Fails on floats, wrong rank, an empty
    sequence, ids outside ``[0, d_vocab)`` and, for learned positions, sequences
    longer than ``n_ctx``.
    """
    if not isinstance(tokens, Tensor):
        raise InvalidTokensError(
            f"tokens must be a tensor of token ids (or a string / list of strings when the "
            f"model has a tokenizer), got {type(tokens).__name__}"
        )
    if tokens.dtype not in _INT_DTYPES:
        raise InvalidTokensError(
            f"tokens must have an integer dtype, got {tokens.dtype}; "
            "to feed a residual stream use start_at_layer"
        )
    if tokens.ndim == 1:
        tokens = tokens[None]
    if tokens.ndim != 2:
        raise InvalidTokensError(
            f"tokens must be [batch, pos] (or [pos]), "
            f"got rank {tokens.ndim} shape {tuple(tokens.shape)}"
        )
    if tokens.shape[1] == 0:
        raise InvalidTokensError("tokens has no positions")
    low, high = int(tokens.min()), int(tokens.max())
    if low < 0 or high >= cfg.d_vocab:
        bad = low if low < 0 else high
        where = (tokens == bad).nonzero()[0].tolist()
        raise InvalidTokensError(
            f"token id {bad} at [batch, pos] = {where} is outside the vocabulary [0, {cfg.d_vocab})"
        )
    check_length(tokens.shape[1], cfg)
    return tokens.long()


def check_length(seq_len: int, cfg: TransformerConfig) -> None:
    """Refuse sequences longer than learned positions cover."""
    if cfg.positional == "learned" and seq_len > cfg.n_ctx:
        raise SequenceTooLongError(
            f"sequence length {seq_len} exceeds n_ctx={cfg.n_ctx}, the number of learned positions"
        )


def checked_attention_mask(mask: object, shape: tuple[int, int]) -> Tensor | None:
    """A ``[batch, pos]`` 0/1 mask matching the tokens, or None when it masks nothing."""
    if mask is None:
        return None
    if isinstance(mask, str):  # TransformerLens's forward takes return_type second
        raise ShapeMismatchError(
            f"attention_mask must be a tensor, got the string {mask!r}: mitk's second "
            "positional argument is attention_mask; pass return_type= by keyword"
        )
    if not isinstance(mask, Tensor):
        raise ShapeMismatchError(f"attention_mask must be a tensor, got {type(mask).__name__}")
    if mask.ndim == 1:
        mask = mask[None]
    if tuple(mask.shape) != shape:
        raise ShapeMismatchError(
            f"attention_mask has shape {tuple(mask.shape)} but the input is {shape} [batch, pos]"
        )
    if mask.dtype != torch.bool and bool(((mask != 0) & (mask != 1)).any()):
        raise ShapeMismatchError("attention_mask must hold only 0 (padding) and 1 (real token)")
    mask = mask.bool()
    if not bool(mask.any(-1).all()):
        empty = (~mask.any(-1)).nonzero()[0].item()
        raise ShapeMismatchError(f"attention_mask row {empty} masks every position")
    return None if bool(mask.all()) else mask


def global_tokens_of(
    global_attention_mask: object,
    cfg: TransformerConfig,
    shape: tuple[int, int],
    key_valid: Tensor | None,
) -> Tensor | None:
    """Longformer's ``[batch, pos]`` global tokens (True), or None when there is none.

    Hugging Face multiplies the mask by ``attention_mask``, so a padded position is
    never global; models without ``cfg.longformer`` refuse the argument.
    """
    if global_attention_mask is None:
        return None
    if cfg.longformer is None:
        raise ValueError("global_attention_mask given, but this model has no Longformer attention")
    if not isinstance(global_attention_mask, Tensor):
        raise ShapeMismatchError(
            f"global_attention_mask must be a tensor, got {type(global_attention_mask).__name__}"
        )
    mask = global_attention_mask[None] if global_attention_mask.ndim == 1 else global_attention_mask
    if tuple(mask.shape) != shape:
        raise ShapeMismatchError(
            f"global_attention_mask has shape {tuple(mask.shape)} but the input is {shape} "
            "[batch, pos]"
        )
    if mask.dtype != torch.bool and bool(((mask != 0) & (mask != 1)).any()):
        raise ShapeMismatchError("global_attention_mask must hold only 0 (local) and 1 (global)")
    mask = mask.bool().to(cfg.device)
    if key_valid is not None:
        mask = mask & key_valid.to(mask.device)
    return mask if bool(mask.any()) else None


def checked_residual(resid: object, cfg: TransformerConfig) -> Tensor:
    """A ``[batch, pos, d_model]`` float tensor to start a forward from mid-model."""
    if not isinstance(resid, Tensor) or not resid.is_floating_point():
        raise ShapeMismatchError(
            "start_at_layer needs a float residual stream [batch, pos, d_model]"
        )
    if resid.ndim != 3 or resid.shape[-1] != cfg.d_model:
        raise ShapeMismatchError(
            f"residual stream must be [batch, pos, {cfg.d_model}], got {tuple(resid.shape)}"
        )
    check_length(resid.shape[1], cfg)
    return resid
