"""Next-token cross-entropy computed in position chunks, never holding all the logits."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
import torch.nn.functional as F

from mitk.shapes import Float, Int, Scalar

LOSS_CHUNK = 256


def next_token_loss(
    hidden: Float[Tensor, "batch pos d_model"],
    tokens: Int[Tensor, "batch pos"],
    key_valid: Tensor | None,
    unembed: Callable[[Tensor], Tensor],
    chunk: int = LOSS_CHUNK,
) -> Scalar:
    """Mean cross-entropy of predicting ``tokens[:, i + 1]`` from position ``i``.

    Only pairs where both positions are real tokens count. Logits exist for
    ``chunk`` positions at a time (in fp32 for a stable log-softmax), so memory
    stays flat at long context.
    """
    if tokens.shape[1] < 2:
        raise ValueError("return_type='loss' needs at least two positions")
    inputs, targets = hidden[:, :-1], tokens[:, 1:]
    valid = None if key_valid is None else key_valid[:, 1:] & key_valid[:, :-1]
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, targets.shape[1], chunk):
        part = slice(start, start + chunk)
        logits = unembed(inputs[:, part]).float()
        nll = F.cross_entropy(logits.flatten(0, 1), targets[:, part].flatten(), reduction="none")
        if valid is not None:
            nll = nll * valid[:, part].flatten()
        total = total + nll.sum()
    count = targets.numel() if valid is None else int(valid.sum())
    return total / count
