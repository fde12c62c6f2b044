"""Attention patterns (with a head selector), composition and eigenvalue figures."""

from __future__ import annotations

import math

import pytest
import torch

from mitk.analysis.circuits import full_ov_circuit, ov_copying_scores
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
    shown = ["&lt;s&gt;", "A", "B", "A"]  # escaped: plotly would read <s> as strikethrough
    assert list(fig.layout.xaxis.ticktext) == shown == list(fig.layout.yaxis.ticktext)
    assert (fig.data[0].zmin, fig.data[0].zmax) == (0, 1)
    buttons = fig.layout.updatemenus[0].buttons
    assert [b.label for b in buttons] == ["L0H0", "L1H2", "L1H3"]
    assert buttons[2].args[0]["visible"] == [False, False, True]
    assert "'B' (pos 2) → 'A' (pos 1)" in fig.data[0].hovertext[2][1]
    assert fig.layout.updatemenus[0].y > 1  # above the plot, not over it


def test_attention_heatmap_escapes_tokens_for_plotly() -> None:
    tokens = ["<s>", "a&b", "&lt;", "<br>"]
    fig = attention_heatmap(torch.rand(1, 4, 4), tokens)
    assert list(fig.layout.xaxis.ticktext) == ["&lt;s&gt;", "a&amp;b", "&amp;lt;", "&lt;br&gt;"]
    assert list(fig.layout.yaxis.ticktext) == list(fig.layout.xaxis.ticktext)
    assert fig.data[0].hovertext[3][0] == "'&lt;br&gt;' (pos 3) → '&lt;s&gt;' (pos 0)"
    assert list(fig.layout.xaxis.tickvals) == [0, 1, 2, 3]


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
    circuit = FactoredMatrix(circuit.A * torch.tensor([1.0, 1e-3])[:, None, None, None], circuit.B)
    eig = circuit.eigenvalues
    raw = eigenvalue_scatter(circuit, normalize=False)
    assert len(raw.data) == 6 and raw.data[5].name.startswith("L1H2 (")
    plotted = torch.complex(torch.tensor(raw.data[5].x), torch.tensor(raw.data[5].y))
    torch.testing.assert_close(plotted, eig[1, 2].to(plotted.dtype))
    score = float(eig[0, 1].sum().real / eig[0, 1].abs().sum())
    assert raw.data[1].name == f"L0H1 ({score:+.2f})"
    assert raw.layout.yaxis.scaleanchor == "x"  # the complex plane is not stretched
    # by default each head is scaled by its largest |λ|: layer 1's tiny heads fill the disc too
    fig = eigenvalue_scatter(circuit)
    assert [t.name for t in fig.data] == [t.name for t in raw.data]  # the score is scale-free
    for trace, values in zip(fig.data, eig.reshape(6, -1), strict=True):
        plotted = torch.complex(torch.tensor(trace.x), torch.tensor(trace.y))
        expected = values / values.abs().max()
        torch.testing.assert_close(plotted, expected.to(plotted.dtype))
        assert max(abs(z) for z in plotted.tolist()) == pytest.approx(1.0)
    first = complex(eig[1, 2, 0])
    assert fig.data[5].hovertext[0].startswith(f"λ = {first.real:.3g} ")  # raw value on hover
    assert tuple(fig.layout.xaxis.range) == (-1.1, 1.1) == tuple(fig.layout.yaxis.range)
    assert "largest |λ|" in fig.layout.xaxis.title.text


def test_induction_heads_full_ov_circuits_copy() -> None:
    """The demo's claim: the toy model's induction heads (layer 1) copy, seen in W_E W_V W_O W_U.

    The d_model-space ``model.OV`` (W_V W_O, no embedding or unembedding) does not show it:
    its eigenvalues' signs do not refer to tokens at all.
    """
    model = HookedTransformer.from_pretrained("toy-induction")
    with torch.no_grad():
        fig = eigenvalue_scatter(full_ov_circuit(model), "full OV")
        residual_only = eigenvalue_scatter(model.OV)
        copying = ov_copying_scores(model)
    scores = {t.name.split()[0]: float(t.name.split()[1].strip("()")) for t in fig.data}
    for head in range(model.cfg.n_heads):
        assert scores[f"L1H{head}"] >= 0.9
        assert scores[f"L1H{head}"] == pytest.approx(float(copying[1, head]), abs=0.006)
    assert min(float(t.name.split()[1].strip("()")) for t in residual_only.data) < 0


def test_eigenvalue_scatter_labels_a_single_matrix() -> None:
    fig = eigenvalue_scatter(FactoredMatrix(torch.eye(3)[:, :2], torch.eye(3)[:2]), kind="QK")
    assert len(fig.data) == 1 and sorted(fig.data[0].x) == [1.0, 1.0]
    assert "QK" in fig.layout.title.text and not math.isnan(fig.data[0].y[0])
