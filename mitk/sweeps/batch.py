"""A slice of prompt pairs as the tensors activation patching takes, padded as the spec says."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from mitk.shapes import Int
from mitk.sweeps.pairs import PromptPair


@dataclass(frozen=True)
class PairBatch:
    """Token tensors for one work unit; ``mask`` is None when nothing is padded."""

    clean: Int[Tensor, "batch pos"]
    corrupted: Int[Tensor, "batch pos"]
    mask: Int[Tensor, "batch pos"] | None
    answer_pos: Int[Tensor, " batch"]  # each prompt's last real position: the metric reads there
    answer: Int[Tensor, " batch"] | None
    wrong: Int[Tensor, " batch"] | None


def batch_pairs(pairs: Sequence[PromptPair], align: str, pad_id: int) -> PairBatch:
    """Stack ``pairs`` into ``[batch, pos]`` tensors, padding to the longest prompt.

    ``right-pad`` puts each prompt at the start, ``left-pad`` at the end, and
    the shared mask hides positions padded in both prompts of a pair. Under
    ``left-pad`` a pair whose prompts differ in length gets the shorter one
    filled with ``pad_id`` at visible positions (one mask serves both runs, so
    it cannot hide a position in one run only).
    """
    width = max(max(len(p.clean), len(p.corrupted)) for p in pairs)
    clean = torch.full((len(pairs), width), pad_id, dtype=torch.long)
    corrupted = clean.clone()
    mask = torch.zeros_like(clean)
    answer_pos = torch.empty(len(pairs), dtype=torch.long)
    for row, pair in enumerate(pairs):
        longest = max(len(pair.clean), len(pair.corrupted))
        if align == "left-pad":
            clean[row, width - len(pair.clean) :] = torch.tensor(pair.clean)
            corrupted[row, width - len(pair.corrupted) :] = torch.tensor(pair.corrupted)
            mask[row, width - longest :] = 1
            answer_pos[row] = width - 1
        else:  # right-pad, or no padding at all: pairs then all have one length
            clean[row, : len(pair.clean)] = torch.tensor(pair.clean)
            corrupted[row, : len(pair.corrupted)] = torch.tensor(pair.corrupted)
            mask[row, :longest] = 1
            answer_pos[row] = longest - 1
    return PairBatch(
        clean=clean,
        corrupted=corrupted,
        mask=None if bool(mask.all()) else mask,
        answer_pos=answer_pos,
        answer=_ids([p.answer for p in pairs]),
        wrong=_ids([p.wrong for p in pairs]),
    )


def _ids(values: list[int | None]) -> Tensor | None:
    if any(v is None for v in values):
        return None
    return torch.tensor(values, dtype=torch.long)
