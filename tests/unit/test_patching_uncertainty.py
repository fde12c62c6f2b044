"""Uncertainty on patching: bootstrap intervals cover, sign-flip p-values uniform under the null."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from mitk import HookedTransformer
from mitk.analysis.patching import PatchResult, activation_patch, logit_diff
from mitk.analysis.patching.uncertainty import (
    benjamini_hochberg,
    bootstrap_interval,
    bootstrap_weights,
    cell_table,
    sign_flip_test,
)


def test_bootstrap_intervals_cover_the_true_mean_at_their_level():
    """2000 independent cells of 30 prompts each, true mean 1: coverage is near the level."""
    gen = torch.Generator().manual_seed(0)
    per_prompt = 1.0 + torch.randn(30, 2000, generator=gen, dtype=torch.float64)
    for confidence in (0.95, 0.8):
        low, high = bootstrap_interval(per_prompt, confidence=confidence, seed=1)
        coverage = ((low <= 1.0) & (high >= 1.0)).double().mean().item()
        # the percentile bootstrap runs slightly narrow at 30 prompts (~1 point)
        assert confidence - 0.035 < coverage < confidence + 0.02, (confidence, coverage)
    width = (high - low).mean().item()
    assert width == pytest.approx(2 * 1.2816 / 30**0.5, rel=0.1)  # ±z·σ/√n at 80%


def test_the_vectorised_bootstrap_equals_a_loop_over_resamples():
    gen = torch.Generator().manual_seed(2)
    per_prompt = torch.randn(12, 3, 4, generator=gen, dtype=torch.float64)
    low, high = bootstrap_interval(per_prompt, resamples=500, seed=7)
    counts = bootstrap_weights(12, 500, seed=7) * 12
    means = []
    for row in counts:  # rebuild each resample as an explicit list of drawn prompts
        drawn = torch.repeat_interleave(torch.arange(12), row.round().long())
        means.append(per_prompt[drawn].mean(0))
    stacked = torch.stack(means)
    torch.testing.assert_close(low, torch.quantile(stacked, 0.025, dim=0))
    torch.testing.assert_close(high, torch.quantile(stacked, 0.975, dim=0))


def test_the_normalised_interval_resamples_prompts_together():
    gen = torch.Generator().manual_seed(3)
    per_prompt = torch.randn(10, 5, generator=gen, dtype=torch.float64)
    low, high = bootstrap_interval(per_prompt, seed=4)
    # constant baselines: the normalised interval is the raw one mapped by (x - 1) / 3
    n_low, n_high = bootstrap_interval(
        per_prompt, torch.full((10,), 4.0), torch.full((10,), 1.0), seed=4
    )
    torch.testing.assert_close(n_low, (low - 1) / 3)
    torch.testing.assert_close(n_high, (high - 1) / 3)
    # patched == clean for every prompt: recovery is 1 in every resample, whatever the prompts
    clean = torch.randn(10, generator=gen, dtype=torch.float64) + 5
    corrupted = torch.randn(10, generator=gen, dtype=torch.float64)
    same = clean[:, None].expand(10, 5)
    one_low, one_high = bootstrap_interval(same, clean, corrupted)
    torch.testing.assert_close(one_low, torch.ones(5, dtype=torch.float64))
    torch.testing.assert_close(one_high, torch.ones(5, dtype=torch.float64))
    with pytest.raises(ValueError, match="both"):
        bootstrap_interval(per_prompt, clean)
    with pytest.raises(ValueError, match="confidence"):
        bootstrap_interval(per_prompt, confidence=1.0)


def test_sign_flip_p_values_are_uniform_under_the_null_and_tiny_under_an_effect():
    gen = torch.Generator().manual_seed(5)
    baseline = torch.randn(20, generator=gen, dtype=torch.float64)
    noise = torch.randn(20, 4000, generator=gen, dtype=torch.float64)
    p = sign_flip_test(baseline[:, None] + noise, baseline, seed=6)
    for level in (0.05, 0.2, 0.5, 0.8):
        assert (p <= level).double().mean().item() == pytest.approx(level, abs=0.02)
    strong = sign_flip_test(baseline[:, None] + 1.5 + noise[:, :50], baseline, resamples=999)
    assert strong.max().item() <= 0.01
    assert strong.min().item() == pytest.approx(1 / 1000)  # the Monte Carlo floor: never 0


def test_few_prompts_are_tested_exactly():
    diffs = torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.5, 0.0], [3.0, 0.0], [1.5, 0.0]])
    p = sign_flip_test(diffs.double(), torch.zeros(5, dtype=torch.float64))
    # 32 patterns: only all-plus and all-minus reach |mean| of all-positive differences
    assert p[0].item() == pytest.approx(2 / 32)
    assert p[1].item() == 1.0  # no effect at all
    nan = sign_flip_test(torch.full((4, 1), float("nan"), dtype=torch.float64), torch.zeros(4))
    assert nan.isnan().all()


def test_benjamini_hochberg_by_hand():
    p = torch.tensor([0.001, 0.02, 0.03, 0.039, 0.5, float("nan")], dtype=torch.float64)
    # thresholds 0.05·k/5 over the 5 finite: 0.01, 0.02, 0.03, 0.04, 0.05; the largest k
    # with p_(k) <= threshold is 4, so the four smallest are significant
    assert benjamini_hochberg(p).tolist() == [True, True, True, True, False, False]
    assert not benjamini_hochberg(torch.tensor([0.2, 0.3])).any()


def result(per_prompt: torch.Tensor, direction: str) -> PatchResult:
    batch = per_prompt.shape[0]
    return PatchResult(
        per_prompt=per_prompt, clean=torch.full((batch,), 3.0), corrupted=torch.zeros(batch),
        site="resid_pre", per="layer", direction=direction, layers=list(range(per_prompt.shape[1])),
    )  # fmt: skip


def test_patch_results_test_against_their_unpatched_run():
    gen = torch.Generator().manual_seed(8)
    noise = 0.01 * torch.randn(12, 2, generator=gen)
    at_corrupted = torch.stack([torch.zeros(12), torch.full((12,), 3.0)], 1) + noise
    denoising, noising = result(at_corrupted, "denoising"), result(at_corrupted, "noising")
    # layer 0 stays at the corrupted metric, layer 1 moves to the clean one
    assert denoising.p_values()[0] > 0.05 and denoising.p_values()[1] < 0.001
    assert noising.p_values()[0] < 0.001 and noising.p_values()[1] > 0.05
    low, high = denoising.confidence_interval(normalized=True)
    assert low[1] < 1 < high[1] and high[0] < 0.05


def test_activation_patch_results_carry_intervals_into_their_frame(tiny: HookedTransformer):
    gen = torch.Generator().manual_seed(9)
    clean = torch.randint(0, 50, (8, 5), generator=gen)
    corrupted = clean.clone()
    corrupted[:, 1] = torch.randint(0, 50, (8,), generator=gen)
    metric = logit_diff(torch.full((8,), 3), torch.full((8,), 4))
    patched = activation_patch(tiny, clean, corrupted, metric, per="pos")
    frame = patched.to_frame()
    assert {"ci_low", "ci_high", "p_value"} <= set(frame.columns)
    assert (frame["ci_low"] <= frame["value"] + 1e-9).all()
    assert (frame["value"] <= frame["ci_high"] + 1e-9).all()
    assert frame["p_value"].between(0, 1).all()
    # position 0 precedes the corrupted token: patching it changes nothing, so p = 1
    assert frame.loc[frame["pos"] == 0, "p_value"].eq(1.0).all()
    low, high = patched.confidence_interval()
    assert low.shape == patched.values.shape == high.shape


def long_table(result: PatchResult, direction: str = "denoising") -> pd.DataFrame:
    """The per-pair rows ``mitk patch`` writes, for a ``per="pos"`` result."""
    batch, n_layers, n_pos = result.per_prompt.shape
    rows = [
        {"pair": i, "site": result.site, "per": result.per, "layer": result.layers[layer],
         "head": pd.NA, "pos": pos, "value": float(result.per_prompt[i, layer, pos]),
         "clean": float(result.clean[i]), "corrupted": float(result.corrupted[i]),
         "direction": direction}
        for i in range(batch) for layer in range(n_layers) for pos in range(n_pos)
    ]  # fmt: skip
    frame = pd.DataFrame(rows)
    frame["head"], frame["pos"] = frame["head"].astype("Int64"), frame["pos"].astype("Int64")
    return frame


def test_cell_table_of_the_per_pair_parquet_equals_the_results_own_statistics():
    gen = torch.Generator().manual_seed(10)
    per_prompt = torch.randn(9, 2, 3, generator=gen, dtype=torch.float64)
    per_prompt[:, 1, 2] += 2.0
    patched = PatchResult(
        per_prompt=per_prompt, clean=torch.full((9,), 3.0, dtype=torch.float64),
        corrupted=torch.zeros(9, dtype=torch.float64), site="resid_pre", per="pos",
        direction="denoising", layers=[0, 2],
    )  # fmt: skip
    table = cell_table(long_table(patched))
    low, high = patched.confidence_interval()
    assert list(table["layer"]) == [0, 0, 0, 2, 2, 2] and table["head"].isna().all()
    assert table["value"].to_numpy() == pytest.approx(patched.values.reshape(-1).numpy())
    assert table["ci_low"].to_numpy() == pytest.approx(low.reshape(-1).numpy())
    assert table["ci_high"].to_numpy() == pytest.approx(high.reshape(-1).numpy())
    assert table["p_value"].to_numpy() == pytest.approx(patched.p_values().reshape(-1).numpy())
    assert (table["pairs"] == 9).all()
    assert table["normalized"].to_numpy() == pytest.approx(patched.normalized().reshape(-1).numpy())
    low, high = patched.confidence_interval(normalized=True)
    assert table["normalized_ci_low"].to_numpy() == pytest.approx(low.reshape(-1).numpy())
    assert table["normalized_ci_high"].to_numpy() == pytest.approx(high.reshape(-1).numpy())


def test_cells_missing_for_some_prompts_use_the_prompts_that_have_them():
    """A ragged cell's statistics equal those of its own prompts (the sign flips exactly)."""
    gen = torch.Generator().manual_seed(11)
    per_prompt = torch.randn(7, 3, generator=gen, dtype=torch.float64) + 1.0
    per_prompt[4:, 2] = float("nan")  # the last three prompts are shorter
    baseline = torch.zeros(7, dtype=torch.float64)
    p = sign_flip_test(per_prompt, baseline)
    assert p[2].item() == pytest.approx(sign_flip_test(per_prompt[:4, 2:], baseline[:4]).item())
    low, high = bootstrap_interval(per_prompt)
    values = per_prompt[:4, 2]
    assert values.min() <= low[2] <= values.mean() <= high[2] <= values.max()
    assert not low.isnan().any()
    empty = torch.full((3, 1), float("nan"), dtype=torch.float64)
    assert bootstrap_interval(empty)[0].isnan().all()


def test_sweep_results_keep_every_pair_for_the_figures():
    """``mean_results`` (the ``mitk patch`` dashboard's input) keeps pairs, NaN where one lacks a
    cell, so its values average the pairs that have each cell and its intervals are real."""
    from mitk.sweeps import mean_results

    gen = torch.Generator().manual_seed(12)
    per_prompt = torch.randn(8, 2, 3, generator=gen, dtype=torch.float64)
    patched = PatchResult(
        per_prompt=per_prompt, clean=torch.arange(8.0, dtype=torch.float64) + 2,
        corrupted=torch.zeros(8, dtype=torch.float64), site="resid_pre", per="pos",
        direction="denoising", layers=[1, 3],
    )  # fmt: skip
    frame = long_table(patched)
    short = (frame["pair"] >= 5) & (frame["pos"] == 2)  # three pairs end a position earlier
    frame = frame[~short].sample(frac=1.0, random_state=0)  # rows in any order
    (merged,) = mean_results(frame)
    expected = per_prompt.clone()
    expected[5:, :, 2] = float("nan")
    torch.testing.assert_close(merged.per_prompt, expected, equal_nan=True)
    torch.testing.assert_close(merged.values[:, 2], per_prompt[:5, :, 2].mean(0))
    torch.testing.assert_close(merged.clean, patched.clean)
    assert merged.layers == [1, 3] and not merged.confidence_interval()[0].isnan().any()
