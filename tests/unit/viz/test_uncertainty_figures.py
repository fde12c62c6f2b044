"""Patching figures show intervals and mark non-significant cells; probe curves show controls."""

from __future__ import annotations

import pytest
import torch

from mitk.analysis.patching import PatchResult
from mitk.analysis.probes import train_probes
from mitk.errors import ConfigError
from mitk.viz import (
    dashboard_html,
    figures_for,
    patching_curve,
    patching_facets,
    patching_heatmap,
    probe_curve,
)
from mitk.viz.patching import min_prompts
from tests.unit.viz.results import patch_result


def noisy_result(per: str, effects: torch.Tensor, n_prompts: int = 16) -> PatchResult:
    """Per-prompt values = effect + noise where there is an effect, exactly 0 (the corrupted
    metric) elsewhere; corrupted 0, clean 1 for every prompt."""
    gen = torch.Generator().manual_seed(0)
    noise = 0.05 * torch.randn(n_prompts, *effects.shape, generator=gen) * (effects != 0)
    return PatchResult(
        per_prompt=effects + noise, clean=torch.ones(n_prompts), corrupted=torch.zeros(n_prompts),
        site="resid_pre", per=per, direction="denoising", layers=list(range(effects.shape[0])),
    )  # fmt: skip


def test_min_prompts_is_where_an_exact_test_can_first_reach_alpha():
    assert min_prompts(0.05) == 6  # 2 / 2**6 = 0.031 <= 0.05 < 2 / 2**5
    assert min_prompts(0.01) == 8


def test_heatmap_marks_exactly_the_cells_without_an_effect():
    effects = torch.tensor([[0.0, 1.0, 0.0], [0.8, 0.0, 0.9]])
    fig = patching_heatmap(noisy_result("pos", effects))
    heat, marks = fig.data
    assert heat.type == "heatmap" and marks.type == "scatter"
    assert sorted(zip(marks.y, marks.x, strict=True)) == [("L0", 0), ("L0", 2), ("L1", 1)]
    assert "not significant" in marks.name
    cells = [(c, z) for row, zs in zip(heat.customdata, heat.z, strict=True)
             for c, z in zip(row, zs, strict=True)]  # fmt: skip
    assert all(low <= z <= high for (low, high, _), z in cells)
    p = [c[2] for c, _ in cells]
    assert "95% CI" in heat.hovertemplate and p[1] < 0.01 and p[0] == 1.0


def test_uncertainty_is_off_for_too_few_prompts_unless_asked():
    few = patch_result("head", (2, 2))  # two prompts: no cell can be significant
    assert len(patching_heatmap(few).data) == 1 and patching_heatmap(few).data[0].customdata is None
    forced = patching_heatmap(few, uncertainty=True)
    assert len(forced.data[1].x) == 4  # every cell marked
    assert len(patching_heatmap(noisy_result("pos", torch.ones(2, 3)), uncertainty=False).data) == 1


def test_facets_mark_per_layer_with_one_legend_entry():
    effects = torch.zeros(2, 2, 3)
    effects[1, 0, 2] = 1.0
    fig = patching_facets(noisy_result("head_pos", effects))
    marks = [t for t in fig.data if t.type == "scatter"]
    assert len(marks) == 2 and [m.showlegend for m in marks] == [True, False]
    assert len(marks[0].x) == 6 and len(marks[1].x) == 5  # layer 1 head 0 pos 2 is significant
    assert ("H0", 2) not in set(zip(marks[1].y, marks[1].x, strict=True))


def test_patching_curve_has_error_bars_from_the_bootstrap():
    result = noisy_result("layer", torch.tensor([0.0, 0.5, 1.0]))
    fig = patching_curve(result, normalized=False)
    (line,) = fig.data
    low, high = result.confidence_interval()
    values = result.values
    assert line.error_y.array == pytest.approx((high - values).tolist())
    assert line.error_y.arrayminus == pytest.approx((values - low).tolist())
    assert list(line.marker.symbol) == ["circle-open", "circle", "circle"]
    assert line.error_y.array[0] == 0 and all(0 < e < 0.1 for e in line.error_y.array[1:])
    with pytest.raises(ConfigError, match="per='layer'"):
        patching_curve(noisy_result("pos", torch.zeros(2, 3)))
    titles = [s.title for s in figures_for(result)]
    assert titles[0] == "Activation patching: resid_pre per layer (recovery with 95% intervals)"
    assert len(figures_for(patch_result("layer", (3,)))) == 2  # two prompts: no curve


def test_probe_curve_draws_probe_controls_and_selectivity():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 200, 8, generator=gen)
    labels = torch.rand(200, generator=gen) < 0.5
    x[2, :, 0] += 4 * labels.float()
    result = train_probes({f"blocks.{i}.hook_resid_post": x[i] for i in range(3)}, labels)
    fig = probe_curve(result)
    bars, probe, control, shuffled = fig.data
    assert list(probe.x) == result.layers
    assert probe.y == pytest.approx(result.accuracy.tolist())
    assert control.y == pytest.approx(result.control_accuracy.tolist())
    assert shuffled.y == pytest.approx(result.shuffled_accuracy.tolist())
    assert bars.y == pytest.approx(result.selectivity.tolist())
    assert [probe.line.dash, control.line.dash, shuffled.line.dash] == ["solid", "dash", "dot"]
    auc = probe_curve(result, "roc_auc")
    assert len(auc.data) == 3 and auc.data[0].y == pytest.approx(result.roc_auc.tolist())
    with pytest.raises((ConfigError, TypeError)):
        probe_curve(result, "f1")  # type: ignore[arg-type]
    sections = figures_for(result)
    assert [s.title for s in sections] == [
        "Linear probes per layer",
        "Linear probes per layer (table)",
    ]
    page = dashboard_html("probes", {}, [result])
    assert "Linear probes per layer" in page and "selectivity" in page
