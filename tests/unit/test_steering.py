"""Steering: difference-of-means vectors, planted directions steer as predicted, no state left."""

from __future__ import annotations

import pytest
import torch

from mitk import HookedTransformer, TransformerConfig
from mitk.analysis.readout import read_activations, select_positions
from mitk.analysis.steering import latent_steering, steer, steering_vector
from mitk.errors import ShapeMismatchError, UnknownHookError
from mitk.sae.autoencoder import SparseAutoencoder
from mitk.sae.config import SAEConfig
from mitk.sae.splice import spliced

LAST_RESID = "blocks.1.hook_resid_post"


@pytest.fixture
def linear_head() -> HookedTransformer:
    """No final norm: logits are the last residual times W_U plus b_U; steering there is exact."""
    cfg = TransformerConfig(
        d_model=32, n_layers=2, n_heads=4, d_vocab=50, n_ctx=24, final_norm=False
    )
    return HookedTransformer(cfg, seed=3)


def no_hooks_left(model: HookedTransformer) -> bool:
    return not any(point.has_hooks for point in model.hook_dict.values())


def test_steering_the_last_residual_moves_logits_by_the_unembedded_vector(
    linear_head: HookedTransformer,
):
    tokens = torch.randint(0, 50, (3, 7), generator=torch.Generator().manual_seed(0))
    vector = torch.randn(32, generator=torch.Generator().manual_seed(1))
    base = linear_head(tokens)
    with steer(linear_head, vector, LAST_RESID, positions="last", scale=2.5) as handle:
        out = linear_head(tokens)
    predicted = 2.5 * vector @ linear_head.W_U
    torch.testing.assert_close(out[:, -1] - base[:, -1], predicted.expand(3, -1), atol=1e-4, rtol=0)
    torch.testing.assert_close(out[:, :-1], base[:, :-1])  # only the last position was steered
    assert handle.calls == {LAST_RESID: 1}
    assert no_hooks_left(linear_head)


def test_a_planted_token_direction_turns_negative_prompts_into_positive_ones(
    tiny: HookedTransformer,
):
    """Prompts of token 7 vs token 9: the vector at resid_pre 0 is W_E[7] - W_E[9], exactly.

    Adding it at every position of a prompt of 9s gives the logits of the prompt of 7s.
    """
    positive, negative = torch.full((4, 6), 7), torch.full((5, 6), 9)
    vector = steering_vector(tiny, positive, negative, "blocks.0.hook_resid_pre", positions="all")
    torch.testing.assert_close(vector, tiny.W_E[7] - tiny.W_E[9], atol=1e-5, rtol=0)
    with steer(tiny, vector, 0):  # layer 0: blocks.0.hook_resid_pre
        steered = tiny(negative[:1])
    torch.testing.assert_close(steered, tiny(positive[:1]), atol=1e-4, rtol=0)
    assert (steered - tiny(negative[:1])).abs().max() > 1e-2


@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_is_never_read(tiny: HookedTransformer, side: str):
    """Padded rows give the vector of their unpadded selves ("last" and "all" alike)."""
    rows = [torch.tensor([3, 4, 5, 6, 7]), torch.tensor([8, 9]), torch.tensor([10, 11, 12])]
    width = max(len(r) for r in rows)
    tokens = torch.full((3, width), 49)  # pad id 49: read anywhere, it would show in the mean
    mask = torch.zeros(3, width, dtype=torch.long)
    for i, row in enumerate(rows):
        cells = slice(width - len(row), width) if side == "left" else slice(0, len(row))
        tokens[i, cells], mask[i, cells] = row, 1
    other = torch.tensor([[1, 2, 3]])
    for positions in ("last", "all"):
        padded = steering_vector(
            tiny, tokens, other, "hook_embed", positions=positions, positive_mask=mask
        )
        picked = [r[-1:] if positions == "last" else r for r in rows]
        by_hand = torch.cat([tiny.W_E[p] for p in picked]).mean(0)
        other_mean = tiny.W_E[other[0, -1:] if positions == "last" else other[0]].mean(0)
        torch.testing.assert_close(padded, by_hand - other_mean, atol=1e-5, rtol=0)
    # deeper in, the last real token reads what it reads unpadded
    deep = read_activations(tiny, tokens, LAST_RESID, attention_mask=mask)[LAST_RESID]
    alone = torch.stack([read_activations(tiny, r[None], LAST_RESID)[LAST_RESID][0] for r in rows])
    torch.testing.assert_close(deep, alone, atol=1e-4, rtol=0)


def test_select_positions_refuses_empty_rows_and_bad_masks():
    valid = torch.tensor([[True, True, False], [False, True, True]])
    assert select_positions(valid, "last").tolist() == [[False, True, False], [False, False, True]]
    with pytest.raises(ValueError, match="no real token"):
        select_positions(torch.zeros(1, 3, dtype=torch.bool), "last")
    with pytest.raises(ShapeMismatchError, match="positions mask"):
        select_positions(valid, torch.ones(2, 4, dtype=torch.bool))


def test_steering_applies_during_generation_with_and_without_the_cache(tiny: HookedTransformer):
    prompt = torch.randint(0, 50, (2, 4), generator=torch.Generator().manual_seed(2))
    vector = 20 * torch.randn(32, generator=torch.Generator().manual_seed(3))
    kwargs = {"max_new_tokens": 6, "do_sample": False, "stop_at_eos": False, "verbose": False}
    plain = tiny.generate(prompt, **kwargs)
    with steer(tiny, vector, 1) as handle:
        cached = tiny.generate(prompt, **kwargs)
        uncached = tiny.generate(prompt, use_past_kv_cache=False, **kwargs)
    assert torch.equal(cached, uncached)
    assert not torch.equal(cached, plain)  # the vector is big enough to change the greedy path
    assert handle.calls["blocks.1.hook_resid_pre"] == 6 + 6  # one per step, both runs
    assert no_hooks_left(tiny)
    # steering the prompt only (a mask) equals steering it in a forward, then generating plain
    mask = torch.ones_like(prompt, dtype=torch.bool)
    with steer(tiny, vector, 1, positions=mask):
        first = tiny.generate(prompt, **{**kwargs, "max_new_tokens": 1})
        logits = tiny(prompt)
    assert torch.equal(first[:, -1], logits[:, -1].argmax(-1))


def test_a_mask_steers_only_its_cells(linear_head: HookedTransformer):
    tokens = torch.randint(0, 50, (2, 5), generator=torch.Generator().manual_seed(4))
    mask = torch.zeros(2, 5, dtype=torch.bool)
    mask[0, 2] = mask[1, 4] = True
    vector = torch.randn(32, generator=torch.Generator().manual_seed(5))
    base = linear_head(tokens)
    with steer(linear_head, vector, LAST_RESID, positions=mask):
        out = linear_head(tokens)
    moved = (out - base).abs().amax(-1) > 1e-4
    assert torch.equal(moved, mask)
    with (
        pytest.raises(ShapeMismatchError, match="steering mask"),
        steer(linear_head, vector, LAST_RESID, positions=mask),
    ):
        linear_head(tokens[:, :3])
    assert no_hooks_left(linear_head)


def test_norm_match_keeps_each_positions_norm(tiny: HookedTransformer):
    tokens = torch.randint(0, 50, (2, 5), generator=torch.Generator().manual_seed(6))
    seen: dict[str, torch.Tensor] = {}
    read = [(LAST_RESID, lambda x, hook: seen.update(x=x.detach().clone()))]
    vector = 5 * torch.randn(32, generator=torch.Generator().manual_seed(7))
    tiny.run_with_hooks(tokens, fwd_hooks=read)
    before = seen["x"]
    with steer(tiny, vector, LAST_RESID, norm_match=True), tiny.hooks(read):
        tiny(tokens)
    after = seen["x"]
    torch.testing.assert_close(after.norm(dim=-1), before.norm(dim=-1), atol=1e-4, rtol=1e-5)
    assert (after - before).abs().max() > 1e-2
    # turned towards the vector
    assert bool(((after @ vector) > (before @ vector)).all())


def test_hooks_are_removed_exactly_even_when_the_block_raises(tiny: HookedTransformer):
    def mine(x: torch.Tensor, hook: object) -> None:
        return None

    tiny.add_hook(LAST_RESID, mine)
    try:
        with (
            pytest.raises(RuntimeError, match="boom"),
            steer(tiny, torch.ones(32), [0, LAST_RESID]),
        ):
            assert len(tiny.hook_dict[LAST_RESID].fwd_fns) == 2
            raise RuntimeError("boom")
        assert [h.user_hook for h in tiny.hook_dict[LAST_RESID].fwd_hooks] == [mine]
        assert not tiny.hook_dict["blocks.0.hook_resid_pre"].has_hooks
    finally:
        tiny.reset_hooks()
    with (
        pytest.raises(UnknownHookError),
        steer(tiny, torch.ones(32), ["blocks.0.hook_resid_pre", "nope"]),
    ):
        pass
    assert no_hooks_left(tiny)
    with pytest.raises(ShapeMismatchError, match="does not fit"), steer(tiny, torch.ones(5), 0):
        tiny(torch.tensor([[1, 2]]))
    assert no_hooks_left(tiny)


def test_vectors_per_hook_and_argument_errors(linear_head: HookedTransformer):
    tokens = torch.tensor([[1, 2, 3]])
    a, b = torch.randn(32), torch.randn(32)
    with steer(linear_head, {"blocks.1.hook_resid_mid": a, LAST_RESID: b}) as handle:
        out = linear_head(tokens)
    with steer(linear_head, a, "blocks.1.hook_resid_mid"), steer(linear_head, b, LAST_RESID):
        nested = linear_head(tokens)
    torch.testing.assert_close(out, nested)
    assert set(handle.calls) == {"blocks.1.hook_resid_mid", LAST_RESID}
    with pytest.raises(ValueError, match="mapping"), steer(linear_head, {LAST_RESID: a}, 0):
        pass
    with pytest.raises(ValueError, match="hooks="), steer(linear_head, a):
        pass
    with (
        pytest.raises(ValueError, match="not \\[batch, pos"),
        steer(linear_head, a, "blocks.0.attn.hook_pattern"),
    ):
        pass


def perfect_sae(d_in: int, hook_name: str) -> SparseAutoencoder:
    """ReLU SAE with latents (relu(x), relu(-x)): decodes every input exactly."""
    sae = SparseAutoencoder(SAEConfig(d_in=d_in, d_sae=2 * d_in, architecture="relu",
                                      hook_name=hook_name))  # fmt: skip
    eye = torch.eye(d_in)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], dim=1))
        sae.W_dec.copy_(torch.cat([eye, -eye], dim=0) * 0.5 + 0.5 * torch.randn(2 * d_in, d_in))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae


def test_sae_latent_steering_is_steering_by_the_decoder_row_and_composes(
    linear_head: HookedTransformer,
):
    torch.manual_seed(8)
    sae = perfect_sae(32, LAST_RESID)
    tokens = torch.randint(0, 50, (2, 5), generator=torch.Generator().manual_seed(9))
    base = linear_head(tokens)
    latent, amount = 3, 4.0
    with spliced(
        sae, linear_head, keep_error=True, edit_latents=latent_steering(add={latent: amount})
    ):
        by_latent = linear_head(tokens)
    row = amount * sae.W_dec[latent].detach()
    with steer(linear_head, row, LAST_RESID):
        by_vector = linear_head(tokens)
    torch.testing.assert_close(by_latent, by_vector, atol=1e-4, rtol=0)
    other = torch.randn(32, generator=torch.Generator().manual_seed(10))
    with (
        spliced(
            sae, linear_head, keep_error=True, edit_latents=latent_steering(add={latent: amount})
        ),
        steer(linear_head, other, LAST_RESID),
    ):
        both = linear_head(tokens)
    expected = base + (row + other) @ linear_head.W_U  # the head is linear: effects add
    torch.testing.assert_close(both, expected, atol=1e-4, rtol=0)
    assert no_hooks_left(linear_head)


def test_latent_steering_clamps_and_refuses_overlap():
    latents = torch.zeros(2, 3, 6)
    edited = latent_steering(add={1: 2.0}, clamp={4: -1.0})(latents.clone())
    assert bool((edited[..., 1] == 2.0).all()) and bool((edited[..., 4] == -1.0).all())
    assert edited[..., [0, 2, 3, 5]].abs().sum() == 0
    with pytest.raises(ValueError, match="both"):
        latent_steering(add={1: 1.0}, clamp={1: 0.0})
