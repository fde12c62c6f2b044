"""Gated, Matryoshka and transcoder training: resume is bit-identical, known dictionaries return.

Ground truth for a transcoder: sparse codes ``c`` of 64 features give the input
``x = c D_in`` (32 dimensions) and the target ``y = c D_out`` (24 dimensions);
the transcoder's decoder rows must recover ``D_out``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from mitk.sae import (
    SAEConfig,
    SparseDictionaryData,
    TensorActivations,
    mean_max_cosine_similarity,
    train,
)
import mitk.sae.losses as losses
from tests.interrupted import kill_then_resume
from tests.unit.sae.test_trainer import config, data

# a higher learning rate: a transcoder's untied encoder needs it to leave FVU 1 in 24 steps
TRANSCODER = {"hook_name": "in", "target_hook_name": "out", "d_out": 12, "lr": 1e-2}


def transcoder_data(n: int = 2000) -> dict[str, torch.Tensor]:
    codes = SparseDictionaryData(d_in=16, n_features=48, mean_active=3.0).coefficients(n)
    out = SparseDictionaryData(d_in=12, n_features=48, seed=1).features
    return {"in": codes @ SparseDictionaryData(d_in=16, n_features=48).features, "out": codes @ out}


@pytest.mark.parametrize(
    ("arch", "extra", "density"),
    [
        ("gated", {}, 0.0),
        ("gated", {}, 1.0),
        ("matryoshka_batchtopk", {"matryoshka_widths": (4, 12, 48)}, None),
        ("relu", TRANSCODER, None),
        ("topk", {**TRANSCODER, "skip_connection": True}, None),
        ("gated", {**TRANSCODER, "skip_connection": True}, 1.0),
        ("matryoshka_batchtopk", {**TRANSCODER, "skip_connection": True}, None),
    ],
    ids=["gated-dense", "gated-gathered", "matryoshka", "transcoder", "topk-skip-transcoder",
         "gated-skip-transcoder", "matryoshka-skip-transcoder"],
)  # fmt: skip
def test_interrupted_then_resumed_equals_uninterrupted(
    arch: str,
    extra: dict[str, Any],
    density: float | None,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    if density is not None:  # both loss paths must resume bit-identically
        monkeypatch.setattr(losses, "SPARSE_DENSITY", density)
    cfg = config(arch, **extra)
    rows = transcoder_data() if cfg.is_transcoder else data()
    source = TensorActivations(rows, cfg.batch_size, seed=5)
    whole, _ = kill_then_resume(cfg, source, tmp_path)
    if cfg.batch_level_k:
        assert torch.isfinite(whole.sae.batch_threshold)


# 64 features in 32 dimensions, ~3 active per row; transcoders write to 24 dimensions
SETTINGS: dict[str, dict[str, Any]] = {
    "gated": {"architecture": "gated", "l1_coefficient": 0.6, "steps": 1500},
    # the first level has room for every feature, and must recover them alone
    "matryoshka": {"architecture": "matryoshka_batchtopk", "k": 3, "steps": 3000, "d_sae": 128,
                   "matryoshka_widths": (64, 128)},
    "relu-transcoder": {"architecture": "relu", "l1_coefficient": 0.2, "steps": 1500},
    # two latents per feature (one per sign of its input), see skip_transcoder_data
    "topk-skip-transcoder": {"architecture": "topk", "k": 3, "steps": 1500, "d_sae": 128,
                             "skip_connection": True},
}  # fmt: skip


def skip_transcoder_data(
    data_in: SparseDictionaryData, truth: torch.Tensor
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """``x = s c D_in``, ``y = c D_out + x A`` with random signs ``s`` and a random map ``A``.

    ``c D_out`` depends on ``x`` only through ``|s c|``, so it is uncorrelated with
    ``x``: the best linear predictor of ``y`` is ``x A``, which the skip can
    learn, and the sparse part stays for the latents. (With ``y = c D_out``
    alone the skip would absorb the linear regression of it on ``x``.)
    """
    gen = torch.Generator().manual_seed(7)
    codes = data_in.coefficients(40_000)
    x = (codes * (torch.randint(0, 2, codes.shape, generator=gen) * 2.0 - 1)) @ data_in.features
    A = torch.randn(data_in.d_in, truth.shape[1], generator=gen) / data_in.d_in**0.5
    return {"in": x, "out": codes @ truth + x @ A}, A


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("case", list(SETTINGS))
def test_dictionary_is_recovered(case: str) -> None:
    settings = dict(SETTINGS[case])
    steps = settings.pop("steps")
    data_in = SparseDictionaryData(d_in=32, n_features=64, mean_active=3.0, seed=0)
    truth = data_in.features
    rows: torch.Tensor | dict[str, torch.Tensor] = data_in.sample(40_000)
    skip_map = None
    if case.endswith("transcoder"):
        truth = SparseDictionaryData(d_in=24, n_features=64, seed=1).features
        codes = data_in.coefficients(40_000)
        rows = {"in": codes @ data_in.features, "out": codes @ truth}
        if settings.get("skip_connection"):
            rows, skip_map = skip_transcoder_data(data_in, truth)
        settings.update(hook_name="in", target_hook_name="out", d_out=24)
    cfg = SAEConfig(**{
        "d_in": 32, "d_sae": 64, "batch_size": 256, "total_tokens": 256 * steps, "lr": 3e-3,
        "log_every": steps, "checkpoint_every": steps, "dead_after_tokens": 50_000, **settings,
    })  # fmt: skip
    source = TensorActivations(rows, cfg.batch_size, hook_name="in", normalize=False)
    result = train(cfg, source, progress=False)
    W_dec = result.sae.W_dec.detach()
    score = mean_max_cosine_similarity(W_dec, truth)
    assert score >= 0.9, f"{case}: mean max cosine similarity {score:.3f}"
    if cfg.architecture == "matryoshka_batchtopk":  # the nested prefix on its own
        prefix = mean_max_cosine_similarity(W_dec[: cfg.matryoshka_widths[0]], truth)
        assert prefix >= 0.9, f"{case}: first level's mean max cosine similarity {prefix:.3f}"
    if skip_map is not None:  # the skip learnt the linear map
        learnt = result.sae.W_skip.detach().T.flatten()
        assert torch.cosine_similarity(learnt, skip_map.flatten(), dim=0) >= 0.7
    x = rows["in"][:2000] if isinstance(rows, dict) else data_in.sample(2000, seed=9)
    active = float((result.sae.encode(x) > 0).sum(-1).double().mean())
    assert 1.5 <= active <= 6.0, f"{case}: {active:.2f} active latents per row"
