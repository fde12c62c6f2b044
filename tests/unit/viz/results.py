"""Small hand-built result objects: figures are checked against numbers known in advance."""

from __future__ import annotations

import torch

from mitk.analysis.dla import Attribution
from mitk.analysis.lens import LogitLens
from mitk.analysis.patching import PatchResult
from mitk.sae.evaluate import SAEEvaluation
from mitk.sae.features import LatentExamples, LogitEffects


def attribution() -> Attribution:
    values = torch.tensor([[1.0, 3.0], [-2.0, -2.0], [0.5, 0.5], [4.0, 0.0], [0.0, 1.0]])
    return Attribution(values, ["embed", "L0H0", "L0H1", "L1H1", "b_U"], values.sum(0))


def patch_result(per: str, shape: tuple[int, ...], layers: list[int] | None = None) -> PatchResult:
    """Two prompts whose metric means are ``arange``; clean mean 4, corrupted mean 0."""
    values = torch.arange(float(torch.Size(shape).numel())).reshape(shape)
    per_prompt = torch.stack([values - 1, values + 1])
    return PatchResult(
        per_prompt=per_prompt, clean=torch.tensor([3.0, 5.0]), corrupted=torch.tensor([0.0, 0.0]),
        site="z", per=per, direction="denoising", layers=layers or list(range(shape[0])),
    )  # fmt: skip


def lens() -> tuple[LogitLens, torch.Tensor]:
    """Three snapshots over one prompt of two positions and a vocabulary of four."""
    logits = torch.tensor([
        [[0.0, 1.0, 2.0, 3.0], [3.0, 2.0, 1.0, 0.0]],
        [[0.0, 3.0, 2.0, 1.0], [1.0, 3.0, 2.0, 0.0]],
        [[3.0, 0.0, 2.0, 1.0], [0.0, 1.0, 3.0, 2.0]],
    ])[:, None]  # fmt: skip
    targets = torch.tensor([[1, 2]])
    return LogitLens(logits, ["0_pre", "1_pre", "final_post"]), targets


def examples(with_strings: bool = True) -> LatentExamples:
    window_tokens = torch.tensor([[5, 6, 7], [-1, 8, 9]])
    strings = [["the", "cat", "sat"], ["", "dog", "ran"]] if with_strings else None
    return LatentExamples(
        latent=3, activations=torch.tensor([2.0, 1.0]), sequences=torch.tensor([0, 4]),
        positions=torch.tensor([1, 0]), offsets=torch.tensor([-1, 0, 1]),
        window_tokens=window_tokens,
        window_activations=torch.tensor([[0.0, 2.0, 0.5], [0.0, 1.0, 0.0]]),
        str_tokens=strings,
    )  # fmt: skip


def effects() -> LogitEffects:
    return LogitEffects(
        latent=3, effects=torch.zeros(10), top_tokens=torch.tensor([1, 2]),
        top_values=torch.tensor([0.9, 0.4]), bottom_tokens=torch.tensor([7, 8]),
        bottom_values=torch.tensor([-0.8, -0.1]), top_str_tokens=[" Paris", " France"],
        bottom_str_tokens=[" banana", " the"],
    )  # fmt: skip


def evaluation(
    hook: str = "blocks.0.hook_resid_post", l0: float = 8.0, fvu: float = 0.1
) -> SAEEvaluation:
    return SAEEvaluation(
        hook_name=hook, rows=100, l0=l0, fvu=fvu, explained_variance=1 - fvu, mse=0.5,
        dead_fraction=0.25, dense_fraction=0.0,
        latent_frequencies=torch.tensor([0.0, 0.001, 0.01, 0.1]),
    )  # fmt: skip
