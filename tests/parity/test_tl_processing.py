"""mitk's weight processing against transformer-lens's on the same GPT-2 checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mitk import HookedTransformer
from mitk.model.processing import STEPS
from tests.parity.test_transformer_lens import (
    _compare,
    _shared_hooks,
    _tl_hooked_transformer,
    tl_deprecation,
)

TOL = 1e-4
WEIGHTS = ["W_E", "W_pos", "W_Q", "W_K", "W_V", "W_O", "b_Q", "b_K", "b_V", "b_O",
           "W_in", "b_in", "W_out", "b_out", "W_U", "b_U"]  # fmt: skip
CHOICES = [[step] for step in STEPS] + [list(STEPS)]


@tl_deprecation
@pytest.mark.parametrize("steps", CHOICES, ids=["+".join(c) for c in CHOICES])
def test_processed_weights_hooks_and_logits_match_tl(gpt2_dir: Path, steps: list[str]) -> None:
    flags = {step: step in steps for step in STEPS}
    tl = _tl_hooked_transformer(gpt2_dir)
    tl.load_and_process_state_dict(tl.state_dict(), **flags)
    ours = HookedTransformer.from_pretrained(gpt2_dir, **flags)
    for attr in WEIGHTS:
        torch.testing.assert_close(getattr(ours, attr), getattr(tl, attr), atol=1e-5, rtol=0,
                                   msg=lambda m, a=attr: f"{a}: {m}")  # fmt: skip
    tokens = torch.randint(0, 97, (2, 14), generator=torch.Generator().manual_seed(7))
    names = _shared_hooks(ours.cfg.n_layers)
    with torch.no_grad():
        their_logits, theirs = tl.run_with_cache(tokens)
        logits, cache = ours.run_with_cache(tokens, names_filter=names)
    torch.testing.assert_close(logits, their_logits, atol=TOL, rtol=0)
    _compare(cache, theirs, names, tokens.shape[0])
