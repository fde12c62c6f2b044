"""Each architecture recovers a known overcomplete dictionary (Sharkey et al. 2022 setting)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from mitk.sae import SAEConfig, SparseDictionaryData, mean_max_cosine_similarity, train

# Defaults only (issue 18): the shape, k where the architecture takes one, batch and budget.
# 64 features in 32 dimensions, ~3 active per row; bench/sae_defaults.py covers other sizes.
SETTINGS: dict[str, dict[str, Any]] = {
    "topk": {"k": 3, "steps": 1500},
    "batchtopk": {"k": 3, "steps": 3000},
    "relu": {"steps": 1500},
    "jumprelu": {"steps": 1500},
}
# BatchTopK's batch-wide threshold settles a little lower at the default rate for 32 inputs
# (the 1e-2 cap): 0.946, where lr 5e-3 gives 0.963; the others are at 0.97-0.99.
FLOOR = {"batchtopk": 0.94}


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("arch", list(SETTINGS))
def test_architecture_recovers_the_dictionary(arch: str) -> None:
    data = SparseDictionaryData(d_in=32, n_features=64, mean_active=3.0, seed=0)
    settings = dict(SETTINGS[arch])
    steps = settings.pop("steps")
    cfg = SAEConfig(
        d_in=32, d_sae=64, architecture=arch, batch_size=256, total_tokens=256 * steps,
        **settings,
    )  # fmt: skip
    result = train(cfg, data.sample(40_000), progress=False)
    score = mean_max_cosine_similarity(result.sae.W_dec.detach(), data.features)
    assert score >= FLOOR.get(arch, 0.95), f"{arch}: mean max cosine similarity {score:.3f}"
    # and the learnt SAE is sparse at about the true number of active features
    latents = result.sae.encode(data.sample(2000, seed=9))
    assert 1.5 <= float((latents > 0).sum(-1).double().mean()) <= 6.0


def test_a_random_dictionary_scores_far_below() -> None:
    data = SparseDictionaryData(d_in=32, n_features=64, seed=0)
    random = torch.randn(64, 32, generator=torch.Generator().manual_seed(1))
    assert mean_max_cosine_similarity(random, data.features) < 0.6
    assert mean_max_cosine_similarity(data.features * 3.0, data.features) == pytest.approx(1.0)


def test_sampled_data_is_sparse_combinations_of_the_features() -> None:
    data = SparseDictionaryData(d_in=8, n_features=20, mean_active=2.0, seed=4)
    coefficients = data.coefficients(5000, seed=2)
    assert float((coefficients > 0).sum(-1).double().mean()) == pytest.approx(2.0, abs=0.1)
    torch.testing.assert_close(data.sample(5000, seed=2), coefficients @ data.features)
    torch.testing.assert_close(data.features.norm(dim=-1), torch.ones(20))
