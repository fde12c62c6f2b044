"""Add-k smoothed unigram and bigram baselines over token ids, for judging a language model.

Fit on a training token stream; ``k`` is chosen from a small grid by fitting on
the first 90% of that stream and scoring the last 10%, then the counts are refit
on all of it. Only the training stream is ever looked at.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from mitk.shapes import Float, Int

K_GRID = (1.0, 0.3, 0.1, 0.03, 0.01, 0.003)


@dataclass(frozen=True)
class NgramCounts:
    """Unigram counts and sorted bigram keys (``prev * vocab + next``) with their counts."""

    vocab: int
    unigram: Int[Tensor, " vocab"]
    context: Int[Tensor, " vocab"]
    """How often each id occurs as the previous token of a pair."""
    pair_keys: Int[Tensor, " pairs"]
    pair_counts: Int[Tensor, " pairs"]

    @classmethod
    def fit(cls, stream: Int[Tensor, " n"], vocab: int) -> NgramCounts:
        """Counts of every id and of every adjacent pair in ``stream``."""
        keys, counts = torch.unique(stream[:-1] * vocab + stream[1:], return_counts=True)
        return cls(
            vocab=vocab,
            unigram=torch.bincount(stream, minlength=vocab),
            context=torch.bincount(stream[:-1], minlength=vocab),
            pair_keys=keys,
            pair_counts=counts,
        )

    def unigram_nll(self, targets: Int[Tensor, " n"], k: float) -> Float[Tensor, " n"]:
        """``-log p(target)`` under add-``k`` unigram probabilities."""
        total = self.unigram.sum().double() + k * self.vocab
        return -torch.log((self.unigram[targets].double() + k) / total)

    def bigram_nll(
        self, previous: Int[Tensor, " n"], targets: Int[Tensor, " n"], k: float
    ) -> Float[Tensor, " n"]:
        """``-log p(target | previous)`` under add-``k`` bigram probabilities."""
        keys = previous * self.vocab + targets
        where = torch.searchsorted(self.pair_keys, keys).clamp(max=len(self.pair_keys) - 1)
        pair = torch.where(self.pair_keys[where] == keys, self.pair_counts[where], 0).double()
        return -torch.log((pair + k) / (self.context[previous].double() + k * self.vocab))


@dataclass(frozen=True)
class NgramBaselines:
    """Unigram and bigram models with their chosen smoothing constants."""

    counts: NgramCounts
    unigram_k: float
    bigram_k: float

    @classmethod
    def fit(cls, stream: Int[Tensor, " n"], vocab: int) -> NgramBaselines:
        """Choose each ``k`` on a 90/10 split of ``stream``, then fit on all of it."""
        cut = int(0.9 * len(stream))
        head, tail = NgramCounts.fit(stream[:cut], vocab), stream[cut:]
        unigram_k = min(K_GRID, key=lambda k: head.unigram_nll(tail, k).mean().item())
        bigram_k = min(K_GRID, key=lambda k: head.bigram_nll(tail[:-1], tail[1:], k).mean().item())
        return cls(NgramCounts.fit(stream, vocab), unigram_k, bigram_k)

    def unigram_nll(self, targets: Int[Tensor, " n"]) -> Float[Tensor, " n"]:
        """Per-token unigram loss in nats."""
        return self.counts.unigram_nll(targets, self.unigram_k)

    def bigram_nll(
        self, previous: Int[Tensor, " n"], targets: Int[Tensor, " n"]
    ) -> Float[Tensor, " n"]:
        """Per-token bigram loss in nats, given each target's previous token."""
        return self.counts.bigram_nll(previous, targets, self.bigram_k)
