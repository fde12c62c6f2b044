"""The spec's metric name as a patching metric for one batch of prompt pairs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from mitk.analysis.patching import PositionMetric, kl_to_clean, log_prob, logit_diff, prob
from mitk.shapes import Float
from mitk.sweeps.batch import PairBatch


@dataclass
class AnswerLogit(PositionMetric):
    """``logit[answer]`` per prompt (the raw logit, no softmax)."""

    answer: Any = None

    def __call__(self, logits: Float[Tensor, "batch d_vocab"]) -> Float[Tensor, " batch"]:
        rows = torch.arange(logits.shape[0], device=logits.device)
        return logits[rows, torch.as_tensor(self.answer).to(logits.device)]


def metric_for(name: str, batch: PairBatch) -> PositionMetric:
    """A fresh metric reading each prompt's answer position (metrics hold per-batch state)."""
    pos = batch.answer_pos
    if name == "kl_to_clean":
        return kl_to_clean(pos)
    if batch.answer is None:
        raise ValueError(f"metric {name} needs answers")  # pairs.read_pairs checks this first
    if name == "logit_diff":
        return logit_diff(batch.answer, batch.wrong, pos)
    if name == "logit":
        return AnswerLogit(positions=pos, answer=batch.answer)
    if name == "prob":
        return prob(batch.answer, pos)
    return log_prob(batch.answer, pos)
