"""Next-token cross-entropy computed in chunks of tokens, never holding all the logits."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
import torch.nn.functional as F

from mitk.shapes import Float, Int, Scalar

LOSS_CHUNK = 256
"""Predicting positions (over the whole batch) unembedded at once."""


def next_token_loss(
    hidden: Float[Tensor, "batch pos d_model"],
    tokens: Int[Tensor, "batch pos"],
    key_valid: Tensor | None,
    unembed: Callable[[Tensor], Tensor],
    chunk: int = LOSS_CHUNK,
) -> Scalar:
    """Mean cross-entropy of predicting ``tokens[:, i + 1]`` from position ``i``.

    Only pairs where both positions are real tokens count. The predicting
    positions of the whole batch are unembedded ``chunk`` at a time (in fp32
    for a stable log-softmax), so memory stays flat in both batch and context.
    """
    if tokens.shape[1] < 2:
        raise ValueError("return_type='loss' needs at least two positions")
    inputs = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    targets = tokens[:, 1:].reshape(-1)
    if key_valid is not None:  # padding pairs cost nothing: drop them before unembedding
        keep = (key_valid[:, 1:] & key_valid[:, :-1]).reshape(-1)
        inputs, targets = inputs[keep], targets[keep]
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, targets.shape[0], chunk):
        part = slice(start, start + chunk)
        logits = unembed(inputs[None, part]).float()[0]  # the unembed reads [batch, pos, d]
        total = total + F.cross_entropy(logits, targets[part], reduction="sum")
    return total / targets.shape[0]
