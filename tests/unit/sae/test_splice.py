"""Splicing an SAE into a model: exact reconstructions, the error term, latent edits, cleanup."""

from __future__ import annotations

import pytest
import torch

from mitk import HookedTransformer
from mitk.errors import ConfigError, ShapeMismatchError, UnknownHookError
from mitk.sae.autoencoder import SparseAutoencoder
from mitk.sae.config import SAEConfig
from mitk.sae.splice import as_sae_input, spliced

RESID = "blocks.0.hook_resid_post"


def relu_sae(d_in: int, d_sae: int, hook_name: str = RESID, seed: int = 0) -> SparseAutoencoder:
    cfg = SAEConfig(d_in=d_in, d_sae=d_sae, architecture="relu", hook_name=hook_name, seed=seed)
    return SparseAutoencoder(cfg)


def perfect_sae(d_in: int, hook_name: str = RESID) -> SparseAutoencoder:
    """ReLU SAE with latents (relu(x), relu(-x)): decodes every input exactly."""
    sae = relu_sae(d_in, 2 * d_in, hook_name)
    eye = torch.eye(d_in)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], dim=1))
        sae.W_dec.copy_(torch.cat([eye, -eye], dim=0))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae


def no_hooks_left(model: HookedTransformer) -> bool:
    return not any(point.has_hooks for point in model.hook_dict.values())


def test_perfect_sae_leaves_the_model_unchanged(tiny: HookedTransformer, tokens: torch.Tensor):
    tokens = tokens % tiny.cfg.d_vocab
    clean = tiny(tokens)
    with spliced(perfect_sae(32), tiny) as splice:
        out = tiny(tokens)
    assert splice.calls == 1
    torch.testing.assert_close(out, clean, atol=1e-6, rtol=0)
    assert no_hooks_left(tiny)


def test_splice_changes_the_output_to_the_reconstruction(tiny: HookedTransformer):
    tokens = torch.randint(0, 50, (2, 6), generator=torch.Generator().manual_seed(1))
    sae = relu_sae(32, 48)
    with spliced(sae, tiny, record=True) as splice:
        out = tiny(tokens)
    expected = tiny.run_with_hooks(
        tokens, fwd_hooks=[(RESID, lambda x, hook: sae(x).reconstruction)]
    )
    torch.testing.assert_close(out, expected)
    assert (out - tiny(tokens)).abs().max() > 1e-3  # a random SAE is not exact
    assert splice.latents is not None and splice.latents.shape == (2, 6, 48)
    assert splice.error is None


@pytest.mark.parametrize("architecture", ["relu", "topk", "batchtopk", "jumprelu"])
def test_keep_error_is_exact_and_gradients_reach_the_sae(
    tiny: HookedTransformer, architecture: str
):
    tokens = torch.randint(0, 50, (2, 6), generator=torch.Generator().manual_seed(2))
    cfg = SAEConfig(d_in=32, d_sae=48, architecture=architecture, k=8, hook_name=RESID)
    sae = SparseAutoencoder(cfg)
    if architecture == "batchtopk":
        sae.batch_threshold.fill_(0.0)
    elif architecture == "jumprelu":
        with torch.no_grad():
            sae.log_threshold.fill_(-8.0)  # low enough that latents fire on tiny's small stream
    clean = tiny(tokens)
    with spliced(sae, tiny, keep_error=True) as splice:
        out = tiny(tokens)
    torch.testing.assert_close(out, clean, atol=1e-6, rtol=0)
    out.logsumexp(-1).sum().backward()
    for param in (sae.W_enc, sae.W_dec, sae.b_enc):
        assert param.grad is not None and param.grad.abs().sum() > 0
    assert splice.calls == 1
    tiny.zero_grad(set_to_none=True)


def test_keep_error_attributes_to_latents_and_error(tiny: HookedTransformer):
    """d loss / d error is the gradient at the hook; d loss / d latents is it times W_dec^T."""
    tokens = torch.randint(0, 50, (2, 5), generator=torch.Generator().manual_seed(3))
    sae = relu_sae(32, 40)
    grads: list[torch.Tensor] = []
    with (
        spliced(sae, tiny, keep_error=True, record=True) as splice,
        tiny.hooks(bwd_hooks=[(RESID, lambda g, hook: grads.append(g))]),
    ):
        loss = tiny(tokens, return_type="loss")
    assert splice.latents is not None and splice.error is not None
    d_latents, d_error = torch.autograd.grad(loss, [splice.latents, splice.error])
    (at_hook,) = grads
    torch.testing.assert_close(d_error, at_hook)
    torch.testing.assert_close(d_latents, at_hook @ sae.W_dec.detach().T)


def test_edit_latents_with_error_shifts_by_the_edited_decoder_rows(tiny: HookedTransformer):
    """Ablating latent j (relu(x_j)) of the perfect SAE subtracts exactly relu(x_j) e_j."""
    tokens = torch.randint(0, 50, (2, 6), generator=torch.Generator().manual_seed(4))
    j = 5

    def ablate(latents: torch.Tensor) -> torch.Tensor:
        latents[..., j] = 0  # in place is allowed: the splice passes a copy
        return latents

    def by_hand(x: torch.Tensor, hook: object) -> torch.Tensor:
        x = x.clone()
        x[..., j] -= x[..., j].relu()
        return x

    expected = tiny.run_with_hooks(tokens, fwd_hooks=[(RESID, by_hand)])
    for keep_error in (True, False):
        with spliced(perfect_sae(32), tiny, keep_error=keep_error, edit_latents=ablate):
            out = tiny(tokens)
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)
    assert (expected - tiny(tokens)).abs().max() > 1e-4  # the ablation did something


def test_edit_latents_of_wrong_shape_is_refused(tiny: HookedTransformer):
    tokens = torch.randint(0, 50, (1, 4))
    with (
        pytest.raises(ShapeMismatchError, match="edit_latents returned"),
        spliced(relu_sae(32, 48), tiny, edit_latents=lambda f: f[..., :3]),
    ):
        tiny(tokens)
    assert no_hooks_left(tiny)


def test_zero_sae_equals_zero_ablation(tiny: HookedTransformer, tokens: torch.Tensor):
    tokens = tokens % tiny.cfg.d_vocab
    sae = relu_sae(32, 48)
    with torch.no_grad():
        for param in sae.parameters():
            param.zero_()
    zero = tiny.run_with_hooks(
        tokens, return_type="loss", fwd_hooks=[(RESID, lambda x, hook: torch.zeros_like(x))]
    )
    with spliced(sae, tiny):
        loss = tiny(tokens, return_type="loss")
    torch.testing.assert_close(loss, zero)


def test_hooks_are_removed_after_an_exception(tiny: HookedTransformer, tokens: torch.Tensor):
    tokens = tokens % tiny.cfg.d_vocab
    clean = tiny(tokens)
    with pytest.raises(RuntimeError, match="boom"), spliced(relu_sae(32, 48), tiny):
        tiny(tokens)
        raise RuntimeError("boom")
    assert no_hooks_left(tiny)
    torch.testing.assert_close(tiny(tokens), clean, atol=0, rtol=0)


def test_unknown_hook_name_suggests_the_right_one(tiny: HookedTransformer):
    with (
        pytest.raises(UnknownHookError, match=r"did you mean 'blocks\.0\.hook_resid_post'"),
        spliced(relu_sae(32, 48), tiny, "blocks.0.hook_resid_pots"),
    ):
        pass
    assert no_hooks_left(tiny)


def test_missing_hook_name_is_a_config_error(tiny: HookedTransformer):
    with pytest.raises(ConfigError, match="hook_name"), spliced(relu_sae(32, 48, ""), tiny):
        pass


def test_width_mismatch_names_both_widths(tiny: HookedTransformer):
    tokens = torch.randint(0, 50, (1, 4))
    with (
        pytest.raises(ShapeMismatchError, match=r"width 32.*d_in=24"),
        spliced(relu_sae(24, 48), tiny),
    ):
        tiny(tokens)
    assert no_hooks_left(tiny)


def test_hook_z_is_flattened_over_heads(tiny: HookedTransformer, tokens: torch.Tensor):
    tokens = tokens % tiny.cfg.d_vocab
    clean = tiny(tokens)
    hook = "blocks.1.attn.hook_z"  # [batch, pos, head=4, d_head=8] -> d_in = 32
    with spliced(perfect_sae(32, hook), tiny, record=True) as splice:
        out = tiny(tokens)
    torch.testing.assert_close(out, clean, atol=1e-6, rtol=0)
    assert splice.inputs is not None and splice.inputs.shape == (3, 12, 32)
    with spliced(perfect_sae(8, hook), tiny, record=True) as per_head:
        torch.testing.assert_close(tiny(tokens), clean, atol=1e-6, rtol=0)
    assert per_head.inputs is not None and per_head.inputs.shape == (3, 12, 4, 8)


def test_sae_in_float64_returns_the_model_dtype(tiny: HookedTransformer, tokens: torch.Tensor):
    tokens = tokens % tiny.cfg.d_vocab
    sae = perfect_sae(32).double()
    with spliced(sae, tiny, record=True) as splice:
        out = tiny(tokens)
    assert out.dtype == torch.float32
    assert splice.latents is not None and splice.latents.dtype == torch.float64
    torch.testing.assert_close(out, tiny(tokens), atol=1e-6, rtol=0)


def test_as_sae_input_merges_the_fewest_trailing_axes():
    x = torch.zeros(2, 3, 4, 5)
    assert as_sae_input(x, 5).shape == (2, 3, 4, 5)
    assert as_sae_input(x, 20).shape == (2, 3, 20)
    assert as_sae_input(x, 60).shape == (2, 60)
    with pytest.raises(ShapeMismatchError, match="d_in=7"):
        as_sae_input(x, 7)


# --- transcoders: read one hook, replace another ------------------------------------------------
MLP_IN, MLP_OUT = "blocks.0.ln2.hook_normalized", "blocks.0.hook_mlp_out"


def transcoder(skip: bool = True, hook_name: str = MLP_IN) -> SparseAutoencoder:
    cfg = SAEConfig(d_in=32, d_sae=48, architecture="relu", hook_name=hook_name,
                    target_hook_name=MLP_OUT, skip_connection=skip)  # fmt: skip
    sae = SparseAutoencoder(cfg)
    with torch.no_grad():
        if skip:
            sae.W_skip.copy_(torch.randn(32, 32, generator=torch.Generator().manual_seed(4)) * 0.1)
        sae.b_dec.fill_(0.3)
    return sae


@pytest.mark.parametrize("skip", [False, True])
def test_transcoder_with_error_is_exact_and_gradients_reach_it(tiny: HookedTransformer, skip: bool):
    tokens = torch.randint(0, 50, (2, 6), generator=torch.Generator().manual_seed(2))
    sae = transcoder(skip)
    clean = tiny(tokens)
    with spliced(sae, tiny, keep_error=True, record=True) as splice:
        out = tiny(tokens)
    assert torch.equal(out, clean)
    assert (splice.hook_name, splice.target_hook_name) == (MLP_IN, MLP_OUT)
    _, cache = tiny.run_with_cache(tokens, names_filter=[MLP_IN, MLP_OUT])
    assert splice.inputs is not None and splice.error is not None
    torch.testing.assert_close(splice.inputs, cache[MLP_IN])
    torch.testing.assert_close(splice.reconstruction, sae(cache[MLP_IN]).reconstruction)
    torch.testing.assert_close(splice.error, cache[MLP_OUT] - splice.reconstruction)
    out.logsumexp(-1).sum().backward()
    for param in (sae.W_enc, sae.W_dec, sae.b_enc, *((sae.W_skip,) if skip else ())):
        assert param.grad is not None and param.grad.abs().sum() > 0
    assert splice.calls == 1 and no_hooks_left(tiny)
    tiny.zero_grad(set_to_none=True)


def test_transcoder_without_error_replaces_the_mlp_output(tiny: HookedTransformer):
    tokens = torch.randint(0, 50, (2, 6), generator=torch.Generator().manual_seed(2))
    sae = transcoder()
    clean = tiny(tokens)
    _, cache = tiny.run_with_cache(tokens, names_filter=[MLP_IN])
    with spliced(sae, tiny) as splice:
        out, spliced_cache = tiny.run_with_cache(tokens, names_filter=[MLP_OUT])
    assert not torch.allclose(out, clean, atol=1e-3)
    assert splice.target_hook_name == MLP_OUT
    torch.testing.assert_close(spliced_cache[MLP_OUT], sae(cache[MLP_IN]).reconstruction)


def test_transcoder_latent_edits_shift_the_output_by_decoder_rows(tiny: HookedTransformer):
    tokens = torch.randint(0, 50, (1, 5), generator=torch.Generator().manual_seed(3))
    sae = transcoder()

    def boost(latents: torch.Tensor) -> torch.Tensor:
        latents[..., 7] += 2.0
        return latents

    _, clean = tiny.run_with_cache(tokens, names_filter=[MLP_OUT])
    with spliced(sae, tiny, keep_error=True, edit_latents=boost):
        _, edited = tiny.run_with_cache(tokens, names_filter=[MLP_OUT])
    shift = edited[MLP_OUT] - clean[MLP_OUT]
    torch.testing.assert_close(shift, (2.0 * sae.W_dec[7]).expand_as(shift), atol=1e-5, rtol=0)


def test_transcoder_whose_input_fires_after_its_target_is_refused(tiny: HookedTransformer):
    tokens = torch.randint(0, 50, (1, 5), generator=torch.Generator().manual_seed(3))
    sae = transcoder(hook_name="blocks.1.hook_resid_pre")
    with pytest.raises(ConfigError, match="did not fire before"), spliced(sae, tiny):
        tiny(tokens)
    assert no_hooks_left(tiny)


def test_transcoder_target_must_be_a_hook(tiny: HookedTransformer):
    sae = transcoder()
    wrong = "blocks.0.hook_mlp_ou"
    with (
        pytest.raises(UnknownHookError, match=r"blocks\.0\.hook_mlp_ou"),
        spliced(sae, tiny, target_hook_name=wrong),
    ):
        pass
