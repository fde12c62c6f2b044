"""The shipped embedded model is what its recipe describes, and it does induction."""

from __future__ import annotations

from mitk import HookedTransformer
from mitk.train.toy_induction import MODEL, induction_loss_gap


def test_shipped_model_matches_the_recipe_config() -> None:
    shipped = HookedTransformer.from_pretrained("toy-induction")
    assert shipped.cfg == MODEL
    first, repeat = induction_loss_gap(shipped)
    assert repeat < 0.05 * first
