"""Per-latent statistics: streaming top-k against brute force, example windows, logit effects."""

from __future__ import annotations

import math

import pytest
import torch

from mitk import HookedTransformer
from mitk.errors import ConfigError, ShapeMismatchError
from mitk.sae.autoencoder import SparseAutoencoder
from mitk.sae.features import LatentStatistics, latent_statistics, logit_effects
from tests.unit.sae.test_splice import RESID, relu_sae


def firing_sae(d_in: int = 32, d_sae: int = 24, hook_name: str = RESID) -> SparseAutoencoder:
    """A ReLU SAE whose latents fire at varied rates (some never) on tiny's residual stream."""
    sae = relu_sae(d_in, d_sae, hook_name, seed=7)
    with torch.no_grad():
        sae.W_enc.mul_(200.0)
        sae.b_enc.copy_(torch.linspace(-3.0, 1.5, d_sae))
        sae.b_enc[0] = -1e3  # dead
    return sae


def all_latents(
    sae: SparseAutoencoder, model: HookedTransformer, tokens: torch.Tensor, mask=None
) -> torch.Tensor:
    _, cache = model.run_with_cache(tokens, mask, names_filter=sae.cfg.hook_name)
    with torch.no_grad():
        latents = sae.encode(cache[sae.cfg.hook_name])
    return latents if mask is None else latents * mask[..., None]


@pytest.fixture
def corpus() -> torch.Tensor:
    return torch.randint(0, 50, (11, 10), generator=torch.Generator().manual_seed(0))


def test_streaming_top_k_equals_brute_force(tiny: HookedTransformer, corpus: torch.Tensor):
    sae, k = firing_sae(), 5
    stats = latent_statistics(sae, tiny, corpus, top_k=k, sequences_per_batch=3)
    latents = all_latents(sae, tiny, corpus)  # [seq, pos, d_sae]
    flat = latents.reshape(-1, latents.shape[-1])
    n_pos = corpus.shape[1]
    for j in range(flat.shape[1]):
        positive = flat[:, j][flat[:, j] > 0]
        values, rows = flat[:, j].topk(min(k, positive.numel()))
        n = values.numel()
        torch.testing.assert_close(stats.top_activations[j, :n], values)
        assert stats.top_sequences[j, :n].tolist() == (rows // n_pos).tolist()
        assert stats.top_positions[j, :n].tolist() == (rows % n_pos).tolist()
        assert (stats.top_sequences[j, n:] == -1).all() and (
            stats.top_activations[j, n:] == 0
        ).all()
    assert (stats.top_sequences[0] == -1).all()  # the dead latent has no examples
    assert 0 < int((stats.top_sequences >= 0).sum()) < stats.top_sequences.numel()


def test_frequency_mean_and_max_equal_brute_force(tiny: HookedTransformer, corpus: torch.Tensor):
    sae = firing_sae()
    stats = latent_statistics(sae, tiny, corpus, top_k=2, sequences_per_batch=4)
    flat = all_latents(sae, tiny, corpus).reshape(-1, sae.cfg.d_sae).double()
    fired = flat != 0
    assert stats.n_tokens == corpus.numel()
    torch.testing.assert_close(stats.frequency, fired.double().mean(0))
    torch.testing.assert_close(stats.max_activation.double(), flat.amax(0), rtol=1e-6, atol=1e-7)
    mean = flat.sum(0) / fired.sum(0)  # NaN where a latent never fired
    assert math.isnan(float(stats.mean_when_active[0]))
    torch.testing.assert_close(stats.mean_when_active, mean, rtol=1e-5, atol=1e-7, equal_nan=True)
    frame = stats.to_frame()
    assert len(frame) == sae.cfg.d_sae
    assert frame["frequency"].tolist() == pytest.approx(stats.frequency.tolist())


def test_example_windows_hold_the_latent_around_each_example(
    tiny: HookedTransformer, corpus: torch.Tensor
):
    sae = firing_sae()
    stats = latent_statistics(sae, tiny, corpus, top_k=4, sequences_per_batch=5,
                              context_before=3, context_after=2)  # fmt: skip
    latents = all_latents(sae, tiny, corpus)
    j = int(stats.frequency.argmax())
    examples = stats.examples(j)
    assert examples.offsets.tolist() == [-3, -2, -1, 0, 1, 2]
    for e, (seq, pos) in enumerate(
        zip(examples.sequences.tolist(), examples.positions.tolist(), strict=True)
    ):
        for c, offset in enumerate(examples.offsets.tolist()):
            p = pos + offset
            inside = 0 <= p < corpus.shape[1]
            assert examples.window_tokens[e, c] == (corpus[seq, p] if inside else -1)
            expected = float(latents[seq, p, j]) if inside else 0.0
            assert float(examples.window_activations[e, c]) == pytest.approx(expected, abs=1e-6)
        assert float(examples.window_activations[e, 3]) == pytest.approx(
            float(examples.activations[e])
        )
    narrow = stats.examples(j, before=1, after=0)
    torch.testing.assert_close(narrow.window_activations, examples.window_activations[:, 2:4])
    with pytest.raises(ConfigError, match="wider context"):
        stats.examples(j, before=4)
    assert examples.str_tokens is None  # tiny has no tokenizer
    frame = examples.to_frame()
    assert len(frame) == examples.window_tokens.numel()


def test_padding_never_fires_nor_becomes_an_example(tiny: HookedTransformer, corpus: torch.Tensor):
    sae = firing_sae()
    mask = torch.ones_like(corpus)
    mask[:, 6:] = 0
    stats = latent_statistics(sae, tiny, corpus, top_k=3, attention_mask=mask.bool())
    assert stats.n_tokens == int(mask.sum())
    filled = stats.top_sequences >= 0
    assert (stats.top_positions[filled] < 6).all()
    real = all_latents(sae, tiny, corpus, mask)[:, :6].reshape(-1, sae.cfg.d_sae)
    torch.testing.assert_close(stats.frequency, (real != 0).double().mean(0))


def test_examples_are_decoded_with_the_tokenizer(gpt2: HookedTransformer):
    sae = relu_sae(64, 16, "blocks.1.hook_resid_pre")
    tokens = gpt2.to_tokens(["the cat sat on a mat", "the dog ran to a big red house"])
    stats = latent_statistics(sae, gpt2, tokens, top_k=2, context_before=2, context_after=1)
    assert isinstance(stats, LatentStatistics)
    j = int(stats.frequency.argmax())
    examples = stats.examples(j)
    assert examples.str_tokens is not None
    for ids, strings in zip(examples.window_tokens.tolist(), examples.str_tokens, strict=True):
        assert strings == [gpt2.tokenizer.decode([i]) if i >= 0 else "" for i in ids]
    assert not any(point.has_hooks for point in gpt2.hook_dict.values())


def test_hooks_that_do_not_flatten_to_positions_are_refused(tiny: HookedTransformer):
    sae = relu_sae(8, 16, "blocks.0.attn.hook_z")  # per head: [batch, pos, head, d_head]
    with pytest.raises(ShapeMismatchError, match=r"\[batch, pos, d_in\]"):
        latent_statistics(sae, tiny, torch.randint(0, 50, (2, 5)))


def test_logit_effects_push_the_decoder_row_through_the_unembedding(tiny: HookedTransformer):
    sae = relu_sae(32, 24, "blocks.1.hook_resid_post")
    with torch.no_grad():
        tiny.ln_final.w.copy_(torch.linspace(0.5, 1.5, 32))
    j, k = 3, 4
    effects = logit_effects(sae, tiny, j, k=k)
    direction = sae.W_dec[j].detach()
    expected = ((direction - direction.mean()) * tiny.ln_final.w.detach()) @ tiny.W_U.detach()
    torch.testing.assert_close(effects.effects, expected)
    assert effects.top_tokens.tolist() == expected.topk(k).indices.tolist()
    assert effects.bottom_tokens.tolist() == (-expected).topk(k).indices.tolist()
    assert (effects.top_values[:-1] >= effects.top_values[1:]).all()
    raw = logit_effects(sae, tiny, j, k=k, through_final_norm=False)
    torch.testing.assert_close(raw.effects, direction @ tiny.W_U.detach())
    frame = effects.to_frame()
    assert frame["side"].tolist() == ["top"] * k + ["bottom"] * k


def test_logit_effects_refuse_hooks_off_the_residual_stream(tiny: HookedTransformer):
    with pytest.raises(ConfigError, match="residual stream"):
        logit_effects(relu_sae(32, 24, "blocks.0.attn.hook_z"), tiny, 0)
    with pytest.raises(ShapeMismatchError, match=r"d_in=16.*d_model=32"):
        logit_effects(relu_sae(16, 24, ""), tiny, 0)
    with pytest.raises(ConfigError, match="outside"):
        logit_effects(relu_sae(32, 24), tiny, 24)
