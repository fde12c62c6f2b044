"""The clean/corrupted prompt pair every patching method starts from: checks, runs, baselines."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from mitk.analysis.patching.engine import metric_fn
from mitk.analysis.patching.metrics import PositionMetric
from mitk.errors import ShapeMismatchError
from mitk.shapes import Float, Int

Direction = Literal["denoising", "noising"]


def check_patch_inputs(
    clean: Tensor, corrupted: Tensor, mask: Tensor | None, direction: str
) -> None:
    """Clear errors for a pair that cannot be patched position by position."""
    if direction not in ("denoising", "noising"):
        raise ValueError(f"direction must be 'denoising' or 'noising', got {direction!r}")
    if clean.shape != corrupted.shape:
        raise ShapeMismatchError(
            f"clean tokens {tuple(clean.shape)} and corrupted tokens {tuple(corrupted.shape)} "
            "must have the same [batch, pos] shape so positions line up"
        )
    if mask is not None and tuple(mask.shape) != tuple(clean.shape):
        raise ShapeMismatchError(
            f"attention_mask {tuple(mask.shape)} must match the tokens {tuple(clean.shape)}"
        )


def metric_at(
    fn: Callable[[Tensor], Tensor], logits: Tensor, answer_pos: Int[Tensor, " batch"] | None
) -> Float[Tensor, " batch"]:
    """Apply a metric to full logits, or to each prompt's logits at its answer position."""
    if answer_pos is None:
        return fn(logits)
    rows = torch.arange(logits.shape[0], device=logits.device)
    return fn(logits[rows, answer_pos.to(logits.device)])


@dataclass(frozen=True)
class PairRuns:
    """Both unpatched runs: caches, logits (at the answer positions when the metric has them)."""

    clean_cache: Any
    corrupt_cache: Any
    clean_logits: Tensor
    corrupt_logits: Tensor
    clean_metric: Float[Tensor, " batch"]
    corrupt_metric: Float[Tensor, " batch"]
    fn: Callable[[Tensor], Tensor]
    answer_pos: Int[Tensor, " batch"] | None

    def base_and_source(self, direction: str) -> tuple[Any, Any]:
        """(cache of the run being patched, cache of the run patched in from)."""
        if direction == "denoising":
            return self.corrupt_cache, self.clean_cache
        return self.clean_cache, self.corrupt_cache


def run_pair(
    model: Any,
    clean: Int[Tensor, "batch pos"],
    corrupted: Int[Tensor, "batch pos"],
    metric: Any,
    names: Sequence[str],
    mask: Tensor | None,
    global_mask: Tensor | None = None,
) -> PairRuns:
    """Run both prompts caching ``names`` and compute both baselines (``prepare`` sees clean).

    ``global_mask`` is a Longformer's ``global_attention_mask``, shared by both prompts.
    """
    extra = {} if global_mask is None else {"global_attention_mask": global_mask}
    batch, seq = clean.shape
    fn, answer_pos = metric_fn(metric, batch, seq)
    with torch.no_grad():
        names = sorted(set(names))
        clean_logits, clean_cache = model.run_with_cache(
            clean, attention_mask=mask, names_filter=names, **extra
        )
        corrupt_logits, corrupt_cache = model.run_with_cache(
            corrupted, attention_mask=mask, names_filter=names, **extra
        )
    if answer_pos is not None:
        rows = torch.arange(batch, device=clean_logits.device)
        answer_pos = answer_pos.to(clean_logits.device)
        clean_logits, corrupt_logits = (
            clean_logits[rows, answer_pos],
            corrupt_logits[rows, answer_pos],
        )
        if isinstance(metric, PositionMetric):
            metric.prepare(clean_logits)
    return PairRuns(
        clean_cache, corrupt_cache, clean_logits, corrupt_logits,
        fn(clean_logits).detach(), fn(corrupt_logits).detach(), fn, answer_pos,
    )  # fmt: skip
