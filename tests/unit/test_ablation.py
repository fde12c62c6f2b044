"""Zero, mean and resample ablations: the hooked activation takes exactly the promised values."""

from __future__ import annotations

import pytest
import torch

from mitk import HookedTransformer, TransformerConfig
from mitk.analysis.patching import activation_patch, logit_diff
from mitk.analysis.patching.ablation import mean_ablation, resample_ablation, zero_ablation
from mitk.errors import ShapeMismatchError

Z = "blocks.1.attn.hook_z"


@pytest.fixture(scope="module")
def model() -> HookedTransformer:
    cfg = TransformerConfig(d_model=32, n_layers=2, n_heads=4, d_vocab=40, n_ctx=16)
    return HookedTransformer(cfg, seed=3)


def seen_after(model, tokens, ablation, hook=Z):
    """The activation at ``hook`` as the rest of the model sees it, with the ablation attached."""
    out = {}
    probe = (hook, lambda act, h: out.__setitem__("act", act.detach()))
    model.run_with_hooks(tokens, fwd_hooks=[ablation, probe])
    return out["act"]


def test_zero_ablation_of_one_head(model) -> None:
    tokens = torch.randint(0, 40, (2, 6))
    act = seen_after(model, tokens, zero_ablation(Z, head=2))
    _, cache = model.run_with_cache(tokens, names_filter=Z)
    assert act[:, :, 2].abs().max() == 0
    torch.testing.assert_close(act[:, :, [0, 1, 3]], cache[Z][:, :, [0, 1, 3]])


def test_mean_ablation_uses_the_reference_mean(model) -> None:
    reference = torch.randint(0, 40, (5, 6), generator=torch.Generator().manual_seed(0))
    _, ref_cache = model.run_with_cache(reference, names_filter=Z)
    tokens = torch.randint(0, 40, (2, 6))
    act = seen_after(model, tokens, mean_ablation(model, reference, Z, pos=3))
    torch.testing.assert_close(act[:, 3], ref_cache[Z][:, 3].mean(0).expand(2, -1, -1))
    flat = seen_after(model, tokens[:, :4], mean_ablation(model, reference, Z, per_position=False))
    torch.testing.assert_close(flat[0, 0], ref_cache[Z].mean((0, 1)))
    with pytest.raises(ShapeMismatchError, match="per_position=False"):
        seen_after(model, tokens[:, :4], mean_ablation(model, reference, Z))


def test_resample_ablation_draws_reference_prompts(model) -> None:
    reference = torch.randint(0, 40, (4, 6), generator=torch.Generator().manual_seed(1))
    _, ref_cache = model.run_with_cache(reference, names_filter=Z)
    act = seen_after(model, torch.randint(0, 40, (3, 6)), resample_ablation(model, reference, Z))
    for row in act:
        assert any(torch.allclose(row, ref) for ref in ref_cache[Z])


def test_ablation_composes_with_batched_patching(model) -> None:
    """A sweep inside an ablation context equals the naive loop with both hooks attached."""
    clean = torch.randint(0, 40, (2, 6), generator=torch.Generator().manual_seed(2))
    corrupted = clean.clone()
    corrupted[:, 1] = (clean[:, 1] + 3) % 40
    ablation = zero_ablation("blocks.0.attn.hook_z", pos=4, head=1)
    with model.hooks(fwd_hooks=[ablation]):
        swept = activation_patch(model, clean, corrupted, logit_diff(3, 8), "resid_pre", "pos")
        _, clean_cache = model.run_with_cache(clean, names_filter="blocks.1.hook_resid_pre")
        for pos in range(6):

            def patch(act, h, pos=pos):
                act = act.clone()
                act[:, pos] = clean_cache["blocks.1.hook_resid_pre"][:, pos]
                return act

            logits = model.run_with_hooks(corrupted, fwd_hooks=[("blocks.1.hook_resid_pre", patch)])
            expected = logits[:, -1, 3] - logits[:, -1, 8]
            torch.testing.assert_close(swept.per_prompt[:, 1, pos], expected, atol=1e-5, rtol=0)


def test_head_index_on_a_site_without_heads(model) -> None:
    with pytest.raises(ValueError, match="no head axis"):
        resid = "blocks.0.hook_resid_pre"
        seen_after(model, torch.randint(0, 40, (1, 4)), zero_ablation(resid, head=0), resid)
