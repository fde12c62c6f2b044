"""Attribution and edge attribution patching: gradients against finite differences, identities."""

from __future__ import annotations

import pytest
import torch

from mitk import HookedTransformer, TransformerConfig
from mitk.analysis.patching import activation_patch, logit_diff
from mitk.analysis.patching.attribution import (
    attribution_patch,
    compare_with_activation_patching,
)
from mitk.analysis.patching.edges import edge_attribution_patch


@pytest.fixture(scope="module")
def model() -> HookedTransformer:
    cfg = TransformerConfig(d_model=32, n_layers=3, n_heads=4, d_vocab=40, n_ctx=16)
    return HookedTransformer(cfg, seed=7)


@pytest.fixture(scope="module")
def pair() -> tuple[torch.Tensor, torch.Tensor]:
    clean = torch.randint(0, 40, (3, 8), generator=torch.Generator().manual_seed(1))
    corrupted = clean.clone()
    corrupted[:, 2] = (clean[:, 2] + 9) % 40
    return clean, corrupted


def finite_difference(model, clean, corrupted, metric, hook, head, t=1e-3):
    """(metric(base + t·Δ) - metric(base)) / t for one head's z: the directional gradient."""
    with torch.no_grad():
        _, cc = model.run_with_cache(clean, names_filter=hook)
        _, bc = model.run_with_cache(corrupted, names_filter=hook)
        delta = torch.zeros_like(bc[hook])
        delta[:, :, head] = cc[hook][:, :, head] - bc[hook][:, :, head]

        def nudge(act, h):
            return act + t * delta

        base = metric(model(corrupted)[:, -1])
        nudged = metric(model.run_with_hooks(corrupted, fwd_hooks=[(hook, nudge)])[:, -1])
    return (nudged - base) / t


def test_gradient_matches_finite_differences(model, pair) -> None:
    clean, corrupted = pair
    metric = logit_diff(3, 8)
    result = attribution_patch(model, clean, corrupted, metric, "z", "head")
    for layer, head in [(0, 1), (1, 3), (2, 0)]:
        fd = finite_difference(model, clean, corrupted, metric, f"blocks.{layer}.attn.hook_z", head)
        estimate = result.per_prompt[:, layer, head] - result.corrupted
        torch.testing.assert_close(estimate.double(), fd.double(), atol=2e-3, rtol=2e-2)


@pytest.mark.parametrize(("site", "per"), [("resid_pre", "pos"), ("z", "head_pos"),
                                           ("pattern", "head_pos"), ("k", "head"),
                                           ("post", "layer")])  # fmt: skip
def test_same_layout_and_baselines_as_activation_patching(model, pair, site, per) -> None:
    clean, corrupted = pair
    r, estimate, exact = compare_with_activation_patching(
        model, clean, corrupted, logit_diff(3, 8), site, per
    )
    assert estimate.per_prompt.shape == exact.per_prompt.shape
    torch.testing.assert_close(estimate.clean, exact.clean, atol=1e-5, rtol=0)
    torch.testing.assert_close(estimate.corrupted, exact.corrupted, atol=1e-5, rtol=0)
    assert -1.0 <= r <= 1.0


def test_whole_stream_patch_at_layer_0_is_exact_in_the_unpatched_positions(model, pair) -> None:
    """Positions before the corruption are identical in both runs: their estimate is the base."""
    clean, corrupted = pair
    result = attribution_patch(model, clean, corrupted, logit_diff(3, 8), "resid_pre", "pos")
    base = result.corrupted.view(3, 1, 1).expand(3, 3, 2)
    torch.testing.assert_close(result.per_prompt[:, :, :2], base, atol=1e-6, rtol=0)


def test_noising_direction(model, pair) -> None:
    clean, corrupted = pair
    noising = attribution_patch(model, clean, corrupted, logit_diff(3, 8), "z", "head",
                                direction="noising")  # fmt: skip
    exact = activation_patch(model, clean, corrupted, logit_diff(3, 8), "z", "head",
                             direction="noising")  # fmt: skip
    torch.testing.assert_close(noising.clean, exact.clean, atol=1e-5, rtol=0)


def test_edge_scores_into_the_logits_sum_to_the_final_stream_estimate(model, pair) -> None:
    clean, corrupted = pair
    metric = logit_diff(3, 8)
    edges = edge_attribution_patch(model, clean, corrupted, metric)
    final = attribution_patch(model, clean, corrupted, metric, "resid_post", "layer")
    into_logits = edges.scores[:, edges.downstream.index("logits")]
    expected = (final.per_prompt[:, -1] - final.corrupted).mean()
    torch.testing.assert_close(into_logits.nansum(), expected, atol=1e-4, rtol=1e-4)
    # nothing reads backwards: L1 heads do not feed layer 0 or layer 1's own attention
    row = edges.upstream.index("L1H0")
    assert torch.isnan(edges.scores[row, edges.downstream.index("L1_attn_in")])
    assert not torch.isnan(edges.scores[row, edges.downstream.index("L1_mlp_in")])
    frame = edges.to_frame()
    assert frame["score"].abs().is_monotonic_decreasing and len(frame) > 0


def test_edges_into_layer_0_come_from_the_embeddings_only(model, pair) -> None:
    clean, corrupted = pair
    edges = edge_attribution_patch(model, clean, corrupted, logit_diff(3, 8))
    column = edges.scores[:, edges.downstream.index("L0_attn_in")]
    present = [u for u, s in zip(edges.upstream, column, strict=True) if not torch.isnan(s)]
    assert present == ["embed", "pos_embed"]
