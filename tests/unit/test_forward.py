"""Forward semantics: return types, residual identities, layer bounds, loss."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mitk import HookedTransformer
from mitk.model import loss as loss_module


def test_residual_identities_hold(gpt2: HookedTransformer, tokens: torch.Tensor) -> None:
    with torch.no_grad():
        _, cache = gpt2.run_with_cache(tokens)
    torch.testing.assert_close(
        cache["blocks.0.hook_resid_pre"], cache["hook_embed"] + cache["hook_pos_embed"]
    )
    for layer in range(gpt2.cfg.n_layers):
        pre, mid, post = (cache[k, layer] for k in ("resid_pre", "resid_mid", "resid_post"))
        torch.testing.assert_close(mid, pre + cache["attn_out", layer])
        torch.testing.assert_close(post, mid + cache["mlp_out", layer])
        if layer + 1 < gpt2.cfg.n_layers:
            torch.testing.assert_close(post, cache["resid_pre", layer + 1])


def test_cached_activations_are_not_mutated_later(
    gpt2: HookedTransformer, tokens: torch.Tensor
) -> None:
    with torch.no_grad():
        _, cache = gpt2.run_with_cache(tokens, names_filter=lambda n: "resid_pre" in n)
        again = gpt2(tokens, stop_at_layer=1)
    torch.testing.assert_close(cache["blocks.1.hook_resid_pre"], again)


def test_hidden_and_logits_relation(gpt2: HookedTransformer, tokens: torch.Tensor) -> None:
    with torch.no_grad():
        hidden = gpt2(tokens, return_type="hidden")
        logits = gpt2(tokens)
    torch.testing.assert_close(logits, hidden @ gpt2.W_U + gpt2.b_U)
    assert hidden.shape == (*tokens.shape, gpt2.cfg.d_model)


@pytest.mark.parametrize("positions", [-1, 3, slice(2, 5), torch.tensor([0, 4, 11])])
def test_logit_positions_select_without_changing_values(
    gpt2: HookedTransformer, tokens: torch.Tensor, positions
) -> None:
    with torch.no_grad():
        full = gpt2(tokens)
        some = gpt2(tokens, logit_positions=positions)
    index = slice(positions, positions + 1 or None) if isinstance(positions, int) else positions
    torch.testing.assert_close(some, full[:, index])
    assert some.ndim == 3


def test_stop_and_start_at_layer_compose(gpt2: HookedTransformer, tokens: torch.Tensor) -> None:
    with torch.no_grad():
        full = gpt2(tokens)
        mid = gpt2(tokens, stop_at_layer=2)
        _, cache = gpt2.run_with_cache(tokens, names_filter="blocks.2.hook_resid_pre")
        resumed = gpt2(mid, start_at_layer=2)
        negative = gpt2(tokens, stop_at_layer=-1)
    torch.testing.assert_close(mid, cache["blocks.2.hook_resid_pre"])
    torch.testing.assert_close(resumed, full)
    torch.testing.assert_close(negative, mid)


def test_loss_equals_cross_entropy_of_logits(
    gpt2: HookedTransformer, tokens: torch.Tensor, monkeypatch: pytest.MonkeyPatch
) -> None:
    with torch.no_grad():
        logits = gpt2(tokens)
        expected = F.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten())
        got = gpt2(tokens, return_type="loss")
        # chunking is an implementation detail: tiny chunks give the same number
        monkeypatch.setattr(loss_module, "LOSS_CHUNK", 3)
        chunked = loss_module.next_token_loss(
            gpt2(tokens, return_type="hidden"), tokens, None, gpt2.unembed, chunk=3
        )
        from_residual = gpt2(
            gpt2(tokens, stop_at_layer=1), start_at_layer=1, return_type="loss", tokens=tokens
        )
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(chunked, expected)
    torch.testing.assert_close(from_residual, expected)


def test_gradients_flow_to_parameters(tiny: HookedTransformer) -> None:
    tokens = torch.randint(0, 50, (2, 8))
    tiny(tokens, return_type="loss").backward()
    missing = [n for n, p in tiny.named_parameters() if p.grad is None]
    assert not missing


def test_per_layer_weight_views_edit_the_model(tiny: HookedTransformer) -> None:
    tokens = torch.randint(0, 50, (1, 6))
    before = tiny(tokens)
    with torch.no_grad():
        tiny.blocks[0].attn.W_V.zero_()
        tiny.blocks[0].attn.b_V.zero_()  # views into the packed weights: edits stick
    _, cache = tiny.run_with_cache(tokens, names_filter="blocks.0.attn.hook_v")
    assert cache["blocks.0.attn.hook_v"].abs().max() == 0
    assert not torch.allclose(tiny(tokens), before)


def test_stacked_weight_shapes(tiny: HookedTransformer) -> None:
    c = tiny.cfg
    expected = {
        "W_E": (c.d_vocab, c.d_model),
        "W_pos": (c.n_ctx, c.d_model),
        "W_Q": (c.n_layers, c.n_heads, c.d_model, c.d_head),
        "W_K": (c.n_layers, c.n_heads, c.d_model, c.d_head),
        "W_O": (c.n_layers, c.n_heads, c.d_head, c.d_model),
        "b_Q": (c.n_layers, c.n_heads, c.d_head),
        "b_O": (c.n_layers, c.d_model),
        "W_in": (c.n_layers, c.d_model, c.d_mlp),
        "b_in": (c.n_layers, c.d_mlp),
        "W_out": (c.n_layers, c.d_mlp, c.d_model),
        "W_U": (c.d_model, c.d_vocab),
        "b_U": (c.d_vocab,),
    }
    for attr, shape in expected.items():
        assert tuple(getattr(tiny, attr).shape) == shape, attr


def test_jaxtyping_shapes_are_enforced_at_test_time(tiny: HookedTransformer) -> None:
    from jaxtyping import TypeCheckError

    # Unembed would happily map [batch, d_model]; its annotation says [batch, pos, d_model]
    with pytest.raises(TypeCheckError, match="batch pos d_model"):
        tiny.unembed(torch.rand(2, tiny.cfg.d_model))
