"""Sequences that contain a repeated random segment: what induction heads are trained and probed on."""

from __future__ import annotations

import torch
from torch import Tensor

from mitk.shapes import Int


def repeated_segments(
    batch: int,
    seq_len: int,
    d_vocab: int,
    generator: torch.Generator,
    min_segment: int = 8,
    max_offset: int = 8,
    bos: int = 0,
) -> Int[Tensor, "batch seq_len"]:
    """BOS, up to ``max_offset`` random tokens, a random segment, the same segment again, filler.

    Segment length and offset vary per row, so no fixed positional offset
    predicts the repeat: the model has to find the earlier occurrence of the
    current token and copy what followed it (an induction circuit). Token ids
    are drawn from ``[1, d_vocab)``; id ``bos`` starts every row.
    """
    max_segment = (seq_len - 1) // 2
    if max_segment < min_segment:
        raise ValueError(f"seq_len={seq_len} leaves no room for two segments of {min_segment}")
    tokens = torch.randint(1, d_vocab, (batch, seq_len), generator=generator)
    tokens[:, 0] = bos
    lengths = torch.randint(min_segment, max_segment + 1, (batch,), generator=generator)
    for row, length in enumerate(lengths.tolist()):
        last_start = min(1 + max_offset, seq_len - 2 * length)
        start = int(torch.randint(1, last_start + 1, (1,), generator=generator))
        tokens[row, start + length : start + 2 * length] = tokens[row, start : start + length]
    return tokens


def repeated_random_tokens(
    batch: int, half: int, d_vocab: int, generator: torch.Generator, bos: int = 0
) -> Int[Tensor, "batch pos"]:
    """BOS followed by ``half`` random tokens twice: ``[batch, 1 + 2 * half]``.

    The standard probe for induction: loss on the second half falls far below
    the first when the model has an induction circuit.
    """
    first = torch.randint(1, d_vocab, (batch, half), generator=generator)
    bos_column = torch.full((batch, 1), bos, dtype=first.dtype)
    return torch.cat([bos_column, first, first], dim=1)
