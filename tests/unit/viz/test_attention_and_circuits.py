"""Attention patterns (with a head selector), composition and eigenvalue figures."""

from __future__ import annotations

import math

import pytest
import torch

from mitk.errors import ShapeMismatchError
from mitk.model import HookedTransformer
from mitk.model.factored_matrix import FactoredMatrix
from mitk.viz import attention_heatmap, cached_attention_heatmap, eigenvalue_scatter


def test_attention_heatmap_has_tokens_on_both_axes_and_a_button_per_head() -> None:
    patterns = torch.rand(3, 4, 4).softmax(-1)
    tokens = ["<s>", "A", "B", "A"]
    fig = attention_heatmap(patterns, tokens, head_labels=["L0H0", "L1H2", "L1H3"])
    assert len(fig.data) == 3 and [t.visible for t in fig.data] == [True, False, False]
    assert fig.data[1].z[2][1] == pytest.approx(float(patterns[1, 2, 1]))
    assert list(fig.layout.xaxis.ticktext) == tokens == list(fig.layout.yaxis.ticktext)
    assert (fig.data[0].zmin, fig.data[0].zmax) == (0, 1)
    buttons = fig.layout.updatemenus[0].buttons
    assert [b.label for b in buttons] == ["L0H0", "L1H2", "L1H3"]
    assert buttons[2].args[0]["visible"] == [False, False, True]
    assert "'B' (pos 2) → 'A' (pos 1)" in fig.data[0].hovertext[2][1]


def test_attention_heatmap_refuses_mismatched_labels() -> None:
    with pytest.raises(ShapeMismatchError, match="token labels"):
        attention_heatmap(torch.rand(2, 3, 3), ["a", "b"])
    with pytest.raises(ShapeMismatchError, match="head labels"):
        attention_heatmap(torch.rand(2, 3, 3), ["a", "b", "c"], head_labels=["one"])


def test_cached_attention_heatmap_reads_the_cached_patterns(tiny: HookedTransformer) -> None:
    tokens = torch.tensor([[1, 2, 3, 2, 3]])
    _, cache = tiny.run_with_cache(tokens, names_filter=lambda n: n.endswith("hook_pattern"))
    fig = cached_attention_heatmap(cache, [(1, 2), (0, 0)], list("abcbc"))
    assert [b.label for b in fig.layout.updatemenus[0].buttons] == ["L1H2", "L0H0"]
    expected = cache["pattern", 1][0, 2]
    torch.testing.assert_close(torch.tensor(fig.data[0].z).float(), expected.float())


def test_eigenvalue_scatter_plots_each_heads_eigenvalues() -> None:
    gen = torch.Generator().manual_seed(0)
    circuit = FactoredMatrix(
        torch.randn(2, 3, 6, 2, generator=gen), torch.randn(2, 3, 2, 6, generator=gen)
    )
    fig = eigenvalue_scatter(circuit)
    eig = circuit.eigenvalues
    assert len(fig.data) == 6 and fig.data[5].name.startswith("L1H2 (")
    plotted = torch.complex(torch.tensor(fig.data[5].x), torch.tensor(fig.data[5].y))
    torch.testing.assert_close(plotted, eig[1, 2].to(plotted.dtype))
    score = float(eig[0, 1].sum().real / eig[0, 1].abs().sum())
    assert fig.data[1].name == f"L0H1 ({score:+.2f})"
    assert fig.layout.yaxis.scaleanchor == "x"  # the complex plane is not stretched


def test_eigenvalue_scatter_labels_a_single_matrix() -> None:
    fig = eigenvalue_scatter(FactoredMatrix(torch.eye(3)[:, :2], torch.eye(3)[:2]), kind="QK")
    assert len(fig.data) == 1 and sorted(fig.data[0].x) == [1.0, 1.0]
    assert "QK" in fig.layout.title.text and not math.isnan(fig.data[0].y[0])
