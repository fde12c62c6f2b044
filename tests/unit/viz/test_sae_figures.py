"""SAE figures: training curves, the L0–FVU trade-off, latent density and the feature card."""

from __future__ import annotations

import pytest
import torch

from mitk.errors import ConfigError
from mitk.viz import (
    density_histogram,
    feature_card,
    l0_fvu_tradeoff,
    tradeoff_point,
    training_curves,
)
from tests.unit.viz.results import effects, evaluation, examples

HOOK = "blocks.0.hook_resid_post"


def history(hooks: tuple[str, ...] = (HOOK,)) -> list[dict[str, float]]:
    rows = []
    for step in (1, 2, 3):
        row = {"step": step, "tokens": 100 * step}
        for hook in hooks:
            row |= {f"{hook}/loss": 1 / step, f"{hook}/l0": 10.0 * step, f"{hook}/fvu": 0.5 / step}
        rows.append(row)
    return rows


def test_training_curves_one_panel_per_logged_metric() -> None:
    fig = training_curves(history())
    assert [t.name for t in fig.data] == ["loss", "l0", "fvu"]  # dead_fraction was not logged
    assert list(fig.data[1].x) == [100, 200, 300] and list(fig.data[1].y) == [10.0, 20.0, 30.0]
    by_step = training_curves(history(), metrics=["fvu"], x="step")
    assert len(by_step.data) == 1 and list(by_step.data[0].x) == [1, 2, 3]


def test_training_curves_asks_which_hook_when_several() -> None:
    two = history((HOOK, "blocks.1.hook_resid_post"))
    with pytest.raises(ConfigError, match="choose one of"):
        training_curves(two)
    assert list(training_curves(two, "blocks.1.hook_resid_post").data[0].y) == [1.0, 0.5, 1 / 3]
    with pytest.raises(ConfigError, match="not logged"):
        training_curves(history(), metrics=["nope"])
    with pytest.raises(ConfigError, match="empty"):
        training_curves([])


def test_l0_fvu_tradeoff_takes_evaluations_and_tuples() -> None:
    points = [
        evaluation(l0=8.0, fvu=0.1),
        ("wide", 4.0, 0.2),
        tradeoff_point(history(), label="run"),
    ]
    scatter = l0_fvu_tradeoff(points).data[0]
    assert list(scatter.x) == [8.0, 4.0, 30.0] and list(scatter.y) == [
        0.1,
        0.2,
        pytest.approx(0.5 / 3),
    ]
    assert list(scatter.text) == [HOOK, "wide", "run"]


def test_density_histogram_counts_live_latents_and_annotates_the_dead() -> None:
    frequencies = torch.tensor([0.0, 0.0, 0.0, 1e-4, 1e-3, 1e-3, 1e-2, 0.1])
    fig = density_histogram(frequencies, bins=4)
    bars = fig.data[0]
    assert list(bars.y) == [1, 2, 1, 1] and sum(bars.y) == 5
    assert list(bars.x) == pytest.approx(
        [-3.625, -2.875, -2.125, -1.375], abs=1e-6
    )  # log10 from -4 to -1
    assert "3 dead latents" in fig.layout.annotations[0].text
    all_dead = density_histogram(torch.zeros(4))
    assert list(all_dead.data[0].y) == [] and "4 dead" in all_dead.layout.annotations[0].text
    one_value = density_histogram(torch.full((3,), 0.01), bins=2)
    assert sum(one_value.data[0].y) == 3


def test_feature_card_shades_contexts_and_lists_logit_effects() -> None:
    fig = feature_card(examples(), effects())
    contexts, bars = fig.data
    assert [list(row) for row in contexts.text] == [["the", "cat", "sat"], ["", "dog", "ran"]]
    assert [list(row) for row in contexts.z] == [[0.0, 2.0, 0.5], [0.0, 1.0, 0.0]]
    assert list(contexts.x) == [-1, 0, 1] and list(contexts.y) == ["seq 0, pos 1", "seq 4, pos 0"]
    assert list(bars.text) == [" Paris", " France", " the", " banana"]
    assert list(bars.x) == pytest.approx([0.9, 0.4, -0.1, -0.8])
    assert fig.layout.title.text == "Latent 3"


def test_feature_card_escapes_token_text_for_plotly() -> None:
    special = examples()
    special = type(special)(
        **{**special.__dict__, "str_tokens": [["<s>", "a&b", "x"], ["", "<br>", "&lt;"]]}
    )
    bars = effects()
    bars = type(bars)(**{**bars.__dict__, "top_str_tokens": ["<b>", " &"]})
    contexts, effect_bars = feature_card(special, bars).data
    assert [list(row) for row in contexts.text] == [
        ["&lt;s&gt;", "a&amp;b", "x"],
        ["", "&lt;br&gt;", "&amp;lt;"],
    ]
    assert list(effect_bars.text) == ["&lt;b&gt;", " &amp;", " the", " banana"]


def test_feature_card_without_strings_or_effects() -> None:
    fig = feature_card(examples(with_strings=False), max_examples=1)
    assert len(fig.data) == 1 and [list(r) for r in fig.data[0].text] == [["5", "6", "7"]]
    other = effects()
    with pytest.raises(ConfigError, match="latent"):
        feature_card(examples(), type(other)(**{**other.__dict__, "latent": 4}))
