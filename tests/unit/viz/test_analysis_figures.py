"""DLA, logit-lens and patching figures carry the result's numbers, labels and colour scales."""

from __future__ import annotations

import inspect
import math

import pytest
import torch

from mitk.analysis.dla import Attribution
from mitk.errors import ConfigError, ShapeMismatchError
from mitk.viz import (
    dla_bar,
    dla_head_heatmap,
    logit_lens_heatmap,
    patching_facets,
    patching_heatmap,
)
from mitk.viz.dla import snapshot_label
from tests.unit.viz.results import attribution, lens, patch_result


def test_dla_bar_names_the_attributed_tokens() -> None:
    fig = dla_bar(attribution(), answer=" Mary", wrong=" John")
    assert list(fig.data[0].x) == ["embed", "L0H0", "L0H1", "L1H1", "b_U"]
    assert list(fig.data[0].y) == [2.0, -2.0, 0.5, 2.0, 0.5]
    assert "' Mary'" in fig.layout.yaxis.title.text and "' John'" in fig.layout.yaxis.title.text


def test_dla_bar_lies_down_when_there_are_many_components() -> None:
    labels = ["embed", "pos_embed", *(f"L{i // 4}H{i % 4}" for i in range(8)), "L1_attn_bias",
              "ln_final.b", "b_U"]  # fmt: skip
    values = torch.linspace(-1.0, 1.0, len(labels))[:, None].repeat(1, 2)
    fig = dla_bar(Attribution(values, labels, values.sum(0)))
    bar = fig.data[0]
    assert bar.orientation == "h" and list(bar.y) == labels  # one line per label: none collide
    assert list(bar.x) == pytest.approx(values[:, 0].tolist())
    assert fig.layout.yaxis.autorange == "reversed" and fig.layout.height >= 22 * len(labels)
    assert "contribution" in fig.layout.xaxis.title.text
    assert bar.marker.color[0] != bar.marker.color[-1]
    few = dla_bar(attribution()).data[0]
    assert few.orientation in (None, "v") and list(few.x) == attribution().labels


def test_dla_bar_escapes_token_text_for_plotly() -> None:
    fig = dla_bar(attribution(), answer="<s>", wrong="a&b")
    title = fig.layout.yaxis.title.text
    assert "'&lt;s&gt;'" in title and "'a&amp;b'" in title and "<s>" not in title


def test_snapshot_labels_read_as_words() -> None:
    labels = ["0_pre", "1_pre", "2_pre", "final_post"]
    assert [snapshot_label(label, labels) for label in labels] == [
        "embeddings (before block 0)",
        "after block 0",
        "after block 1",
        "after block 2 (final)",
    ]
    assert snapshot_label("final_post", ["final_post"]) == "final"
    assert snapshot_label("custom", labels) == "custom"


def test_dla_head_heatmap_places_heads_and_blanks_the_missing() -> None:
    heat = dla_head_heatmap(attribution(), prompt=0).data[0]
    assert list(heat.y) == ["L0", "L1"] and list(heat.x) == ["H0", "H1"]
    assert list(heat.z[0]) == [-2.0, 0.5]
    assert math.isnan(heat.z[1][0]) and heat.z[1][1] == 4.0 and heat.zmid == 0
    no_heads = type(attribution())(torch.ones(1, 2), ["embed"], torch.ones(2))
    with pytest.raises(ConfigError, match="by='head'"):
        dla_head_heatmap(no_heads)


def test_logit_lens_heatmap_shows_ranks_and_logits_per_snapshot() -> None:
    result, targets = lens()
    fig = logit_lens_heatmap(result, targets, tokens=["a", "a"])
    heat = fig.data[0]
    # ranks of token 1 at pos 0 and token 2 at pos 1 in each snapshot
    assert [list(row) for row in heat.z] == [[2, 2], [0, 1], [3, 0]]
    assert list(heat.y) == ["embeddings (before block 0)", "after block 0", "after block 1 (final)"]
    assert heat.zmin == 0
    assert list(fig.layout.xaxis.ticktext) == ["a", "a"]  # repeated tokens keep their columns
    logits = logit_lens_heatmap(result, targets, metric="logit").data[0]
    assert [list(row) for row in logits.z] == [[1.0, 1.0], [3.0, 2.0], [0.0, 3.0]]
    assert logits.zmid == 0
    mean = logit_lens_heatmap(result, targets, prompt=None).data[0]
    assert [list(row) for row in mean.z] == [[2, 2], [0, 1], [3, 0]]


def test_logit_lens_heatmap_refuses_mismatched_inputs() -> None:
    result, targets = lens()
    with pytest.raises(ShapeMismatchError, match="targets"):
        logit_lens_heatmap(result, targets[:, :1])
    with pytest.raises(ShapeMismatchError, match="token labels"):
        logit_lens_heatmap(result, targets, tokens=["only one"])
    # the function's own check, beneath the test-time type checker that would catch it first
    with pytest.raises(ConfigError, match="metric"):
        inspect.unwrap(logit_lens_heatmap)(result, targets, metric="prob")


def test_patching_heatmap_per_position_labels_tokens() -> None:
    result = patch_result("pos", (2, 3), layers=[1, 3])
    fig = patching_heatmap(result, tokens=["BOS", "x", "x"])
    heat = fig.data[0]
    assert list(heat.y) == ["L1", "L3"] and list(heat.x) == [0, 1, 2]
    assert list(fig.layout.xaxis.ticktext) == ["BOS", "x", "x"]
    expected = result.normalized()
    assert heat.z[1][2] == pytest.approx(float(expected[1, 2])) == pytest.approx(5 / 4)
    assert (heat.zmin, heat.zmax) == (0, 1) and heat.zmid is None
    raw = patching_heatmap(result, normalized=False).data[0]
    assert raw.z[1][2] == pytest.approx(5.0) and raw.zmid == 0 and raw.zmax is None
    with pytest.raises(ShapeMismatchError):
        patching_heatmap(result, tokens=["too", "few"])


def test_patching_heatmap_per_layer_is_one_column() -> None:
    heat = patching_heatmap(patch_result("layer", (3,)), normalized=False).data[0]
    assert [list(row) for row in heat.z] == [[0.0], [1.0], [2.0]] and list(heat.x) == ["all"]


def test_patching_facets_one_panel_per_layer_on_a_shared_scale() -> None:
    result = patch_result("head_pos", (4, 2, 3))
    fig = patching_facets(result, normalized=False, tokens=["a", "b", "c"], columns=3)
    assert len(fig.data) == 4 and {t.coloraxis for t in fig.data} == {"coloraxis"}
    assert [a.text for a in fig.layout.annotations] == [f"layer {i}" for i in range(4)]
    assert fig.data[3].z[1][2] == pytest.approx(float(result.values[3, 1, 2]))
    assert list(fig.data[0].y) == ["H0", "H1"] and fig.layout.coloraxis.cmid == 0
    assert list(fig.layout.xaxis4.ticktext) == ["a", "b", "c"]
    normalized = patching_facets(result)
    assert (normalized.layout.coloraxis.cmin, normalized.layout.coloraxis.cmax) == (0, 1)
    with pytest.raises(ConfigError, match="patching_facets"):
        patching_heatmap(result)
    with pytest.raises(ConfigError, match="head_pos"):
        patching_facets(patch_result("head", (2, 2)))
