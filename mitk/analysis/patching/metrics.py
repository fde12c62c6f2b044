"""Patching metrics: one number per prompt from the logits at each prompt's answer position.

A ready-made metric reads logits at one position per prompt (``positions``),
which lets the patching engine unembed only those positions. Any plain
callable ``f(logits [batch, pos, d_vocab]) -> [batch]`` works too; the engine
then computes every position's logits. Either way a metric always sees one
prompt batch, exactly as in a single unpatched run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from mitk.analysis.patching.kl import NextTokenReference
from mitk.shapes import Float, Int


def _per_prompt(values: Tensor | int | list[int]) -> Int[Tensor, " batch"]:
    return torch.as_tensor(values).long().reshape(-1)


@dataclass
class PositionMetric:
    """Base for metrics of the logits at one position per prompt.

    ``positions`` is one index for every prompt or one per prompt (e.g. the
    last real token under right padding); negative indices count from the end.
    """

    positions: Int[Tensor, " batch"] | int = -1

    def index(self, batch: int, seq: int) -> Int[Tensor, " batch"]:
        """Absolute answer positions, one per prompt."""
        pos = _per_prompt(self.positions)
        pos = pos.expand(batch) if pos.numel() == 1 else pos
        if pos.shape[0] != batch:
            raise ValueError(f"metric has {pos.shape[0]} positions for a batch of {batch}")
        return pos % seq

    def prepare(self, clean_logits: Float[Tensor, "batch d_vocab"]) -> None:
        """Called once with the clean run's logits at the answer positions (a hook for KL)."""

    def __call__(self, logits: Float[Tensor, "batch d_vocab"]) -> Float[Tensor, " batch"]:
        raise NotImplementedError


@dataclass
class LogitDiff(PositionMetric):
    """``logit[answer] - logit[wrong]`` per prompt."""

    answer: Any = None
    wrong: Any = None

    def __call__(self, logits: Float[Tensor, "batch d_vocab"]) -> Float[Tensor, " batch"]:
        rows = torch.arange(logits.shape[0], device=logits.device)
        answer = _per_prompt(self.answer).to(logits.device)
        wrong = _per_prompt(self.wrong).to(logits.device)
        return logits[rows, answer] - logits[rows, wrong]


@dataclass
class LogProb(PositionMetric):
    """``log p(answer)`` per prompt."""

    answer: Any = None

    def __call__(self, logits: Float[Tensor, "batch d_vocab"]) -> Float[Tensor, " batch"]:
        rows = torch.arange(logits.shape[0], device=logits.device)
        answer = _per_prompt(self.answer).to(logits.device)
        return logits.float().log_softmax(-1)[rows, answer]


@dataclass
class Prob(LogProb):
    """``p(answer)`` per prompt."""

    def __call__(self, logits: Float[Tensor, "batch d_vocab"]) -> Float[Tensor, " batch"]:
        return super().__call__(logits).exp()


@dataclass
class KLToClean(PositionMetric):
    """``KL(clean || patched)`` of the next-token distributions, per prompt.

    0 when identical, to float32 rounding (a few 1e-7); see ``mitk.analysis.patching.kl``.
    """

    clean: NextTokenReference | None = field(default=None, repr=False)

    def prepare(self, clean_logits: Float[Tensor, "batch d_vocab"]) -> None:
        self.clean = NextTokenReference(clean_logits)

    def __call__(self, logits: Float[Tensor, "batch d_vocab"]) -> Float[Tensor, " batch"]:
        if self.clean is None:
            raise RuntimeError("KLToClean needs prepare(clean_logits) first")
        return self.clean.kl(logits)


def logit_diff(answer: Any, wrong: Any, pos: Any = -1) -> LogitDiff:
    """Metric: answer logit minus wrong-answer logit (per prompt) at ``pos``."""
    return LogitDiff(positions=pos, answer=answer, wrong=wrong)


def log_prob(answer: Any, pos: Any = -1) -> LogProb:
    """Metric: log-probability of the answer at ``pos``."""
    return LogProb(positions=pos, answer=answer)


def prob(answer: Any, pos: Any = -1) -> Prob:
    """Metric: probability of the answer at ``pos``."""
    return Prob(positions=pos, answer=answer)


def kl_to_clean(pos: Any = -1) -> KLToClean:
    """Metric: KL divergence from the clean run's next-token distribution at ``pos``."""
    return KLToClean(positions=pos)
