"""Synthetic token sequences with repeated random segments: induction training data and probes."""

from __future__ import annotations

import torch
from torch import Tensor

from mitk.shapes import Int


def periodic_segments(
    batch: int,
    seq_len: int,
    d_vocab: int,
    generator: torch.Generator,
    min_period: int = 4,
    max_period: int | None = None,
    bos: int = 0,
) -> Int[Tensor, "batch seq_len"]:
    """BOS, then a random segment repeated until the row is full, entered at a random phase.

    The period varies per row, so no fixed positional offset predicts the
    next token: after one period the model must find the earlier occurrence
    of the current token and copy what followed it (an induction circuit).
    Everything after the first period is predictable that way, which makes
    the circuit form within a few hundred steps. Token ids are drawn from
    ``[1, d_vocab)``; id ``bos`` starts every row.
    """
    max_period = max_period if max_period is not None else (seq_len - 1) // 2
    if not 1 <= min_period <= max_period:
        raise ValueError(f"no period fits: min_period={min_period}, max_period={max_period}")
    tokens = torch.full((batch, seq_len), bos, dtype=torch.long)
    periods = torch.randint(min_period, max_period + 1, (batch,), generator=generator)
    for row, period in enumerate(periods.tolist()):
        segment = torch.randint(1, d_vocab, (period,), generator=generator)
        phase = int(torch.randint(0, period, (1,), generator=generator))
        repeats = segment.repeat(seq_len // period + 2)
        tokens[row, 1:] = repeats[phase : phase + seq_len - 1]
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
