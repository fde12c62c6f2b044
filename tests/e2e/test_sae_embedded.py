"""End to end on the embedded model: store -> train -> save/load -> splice and evaluate."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mitk import HookedTransformer
from mitk.sae import (
    ActivationStore,
    SAEConfig,
    SparseAutoencoder,
    evaluate,
    latent_statistics,
    train,
)
from mitk.sequences import periodic_segments

HOOK = "blocks.0.hook_resid_post"


@pytest.mark.slow
def test_an_sae_trained_on_the_toy_model_keeps_its_behaviour(tmp_path: Path) -> None:
    model = HookedTransformer.from_pretrained("toy-induction")
    tokens = periodic_segments(512, 64, model.cfg.d_vocab, torch.Generator().manual_seed(0))
    store = ActivationStore(
        model, HOOK, tokens, batch_size=1024, model_batch_size=64, buffer_batches=8,
        normalize=True, cache_dir=tmp_path / "acts",
    )  # fmt: skip
    cfg = SAEConfig(d_in=64, d_sae=512, k=16, batch_size=1024, total_tokens=1024 * 300, lr=2e-3,
                    hook_name=HOOK, log_every=100, checkpoint_every=100)  # fmt: skip
    trained = train(cfg, store, checkpoint_dir=tmp_path / "ckpt", progress=False).sae
    trained.save(tmp_path / "sae")
    sae = SparseAutoencoder.load(tmp_path / "sae")

    held_out = periodic_segments(64, 64, model.cfg.d_vocab, torch.Generator().manual_seed(1))
    result = evaluate(sae, model=model, tokens=held_out)
    assert result.fvu < 0.15 and result.l0 == pytest.approx(16.0)
    assert result.ce_loss_recovered is not None and result.ce_loss_recovered > 0.8
    assert result.ce_loss_clean is not None and result.ce_loss_spliced is not None
    assert result.ce_loss_clean < result.ce_loss_spliced

    # the SAE reads raw activations: the store's normalisation was folded into its weights
    _, cache = model.run_with_cache(held_out[:8], names_filter=HOOK)
    raw = cache[HOOK].reshape(-1, 64)
    assert evaluate(sae, raw).fvu == pytest.approx(result.fvu, rel=0.3)

    stats = latent_statistics(sae, model, held_out, top_k=5)
    busiest = int(stats.frequency.argmax())
    assert float(stats.frequency[busiest]) > 0
    examples = stats.examples(busiest)
    # the top example's activation is the latent's largest over the held-out set
    assert float(stats.top_activations[busiest, 0]) == pytest.approx(
        largest_latent(sae, cache_all(model, held_out), busiest), rel=1e-5
    )
    assert len(examples.to_frame()) > 0


def cache_all(model: HookedTransformer, tokens: torch.Tensor) -> torch.Tensor:
    _, cache = model.run_with_cache(tokens, names_filter=HOOK)
    return cache[HOOK]


@torch.no_grad()
def largest_latent(sae: SparseAutoencoder, acts: torch.Tensor, latent: int) -> float:
    return float(sae.encode(acts)[..., latent].max())
