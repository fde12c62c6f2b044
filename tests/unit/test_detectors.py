"""Head detectors find the induction circuit of the embedded model, and score plain heads low."""

from __future__ import annotations

import pytest
import torch

from mitk import HookedTransformer, TransformerConfig
from mitk.analysis.detectors import head_detector_scores


@pytest.fixture(scope="module")
def toy() -> HookedTransformer:
    return HookedTransformer.from_pretrained("toy-induction")


def test_finds_previous_token_head_in_layer_0_and_induction_head_in_layer_1(toy) -> None:
    scores = head_detector_scores(toy)
    assert list(scores.columns) == [
        "layer", "head", "label", "previous_token", "duplicate_token", "induction",
    ]  # fmt: skip
    assert len(scores) == toy.cfg.n_layers * toy.cfg.n_heads
    best_prev = scores.loc[scores["previous_token"].idxmax()]
    best_induction = scores.loc[scores["induction"].idxmax()]
    assert best_prev["layer"] == 0 and best_prev["previous_token"] > 0.5
    assert best_induction["layer"] == 1 and best_induction["induction"] > 0.5
    # a layer-0 head cannot do induction: it has no previous-token information to compose with
    assert scores[scores["layer"] == 0]["induction"].max() < 0.1


def test_scores_are_attention_fractions() -> None:
    cfg = TransformerConfig(d_model=16, n_layers=2, n_heads=2, d_vocab=30, n_ctx=32, d_mlp=0)
    model = HookedTransformer(cfg, seed=0)
    scores = head_detector_scores(model, half=10, batch=4)
    values = scores[["previous_token", "duplicate_token", "induction"]].to_numpy()
    assert ((values >= 0) & (values <= 1)).all()
    # an untrained model spreads attention: nothing looks like a clean detector hit
    assert values.max() < 0.5


def test_hand_set_previous_token_head_scores_one() -> None:
    """A head forced to attend to the previous token by a pattern hook scores 1 on that detector."""
    cfg = TransformerConfig(d_model=16, n_layers=1, n_heads=2, d_vocab=30, n_ctx=32, d_mlp=0)
    model = HookedTransformer(cfg, seed=0)

    def previous_token(pattern: torch.Tensor, hook: object) -> torch.Tensor:
        forced = pattern.clone()
        pos = pattern.shape[-1]
        forced[:, 0] = 0
        forced[:, 0, 0, 0] = 1.0  # BOS has no previous token: it attends to itself
        forced[:, 0, torch.arange(1, pos), torch.arange(pos - 1)] = 1.0
        return forced

    with model.hooks(fwd_hooks=[("blocks.0.attn.hook_pattern", previous_token)]):
        scores = head_detector_scores(model, half=8, batch=2)
    assert scores.loc[0, "previous_token"] == pytest.approx(1.0)
    assert scores.loc[0, "induction"] == pytest.approx(0.0)


def test_probe_longer_than_context_is_refused(toy) -> None:
    with pytest.raises(ValueError, match="exceeds n_ctx=64"):
        head_detector_scores(toy, half=40)
