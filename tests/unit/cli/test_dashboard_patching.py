"""``mitk dashboard`` on patching tables: per-pair tables carry their uncertainty onto the page."""

from __future__ import annotations

import plotly.graph_objects as go
import pytest
import torch

from mitk.analysis.patching import PatchResult
from mitk.cli.dashboard import patching_sections
from tests.unit.test_patching_uncertainty import long_table


def patched_per_pos() -> PatchResult:
    """8 pairs, 2 layers × 3 positions; only cell (1, 2) moves the metric for every pair."""
    gen = torch.Generator().manual_seed(3)
    per_prompt = 0.3 * torch.randn(8, 2, 3, generator=gen, dtype=torch.float64)
    per_prompt[:, 1, 2] += 2.5
    clean = 3.0 + 0.1 * torch.randn(8, generator=gen, dtype=torch.float64)
    return PatchResult(
        per_prompt=per_prompt, clean=clean, corrupted=torch.zeros(8, dtype=torch.float64),
        site="resid_pre", per="pos", direction="denoising", layers=[0, 1],
    )  # fmt: skip


def test_a_per_pair_table_is_drawn_with_intervals_and_marks_like_the_result():
    patched = patched_per_pos()
    sections = patching_sections(long_table(patched), "results.parquet")
    heatmaps = [s for s in sections if isinstance(s.content, go.Figure) and "recovery" in s.title]
    assert len(heatmaps) == 1 and heatmaps[0].title.endswith("(results.parquet)")
    figure = heatmaps[0].content
    heat, marks = figure.data[0], figure.data[1]
    assert torch.tensor(heat.z) == pytest.approx(patched.normalized())  # a ratio of means
    low, high = patched.confidence_interval(normalized=True)
    hover = torch.tensor(heat.customdata, dtype=torch.float64)
    assert hover[..., 0] == pytest.approx(low) and hover[..., 1] == pytest.approx(high)
    assert hover[..., 2] == pytest.approx(patched.p_values())
    crossed = set(zip(marks.y, marks.x, strict=True))
    assert ("L1", 2) not in crossed and len(crossed) == 5  # every other cell is noise


def test_a_prompt_averaged_table_is_drawn_without_intervals():
    frame = patched_per_pos().to_frame().assign(per="pos")
    (section,) = patching_sections(frame, "avg.parquet")
    assert isinstance(section.content, go.Figure) and len(section.content.data) == 1
    assert section.content.data[0].customdata is None
