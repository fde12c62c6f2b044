"""``blocks.L.attn.hook_result``: per-head writes built only when hooked (TL's use_attn_result)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
import pytest
import torch

from mitk import HookedTransformer, TransformerConfig


@pytest.fixture(scope="module")
def model() -> HookedTransformer:
    cfg = TransformerConfig(d_model=32, n_layers=2, n_heads=4, d_vocab=50, n_ctx=16)
    return HookedTransformer(cfg, seed=3)


@pytest.fixture(scope="module")
def gqa_rotary() -> HookedTransformer:
    cfg = TransformerConfig(
        d_model=32, n_layers=2, n_heads=4, n_key_value_heads=2, d_vocab=50, n_ctx=16,
        positional="rotary", normalization="rmsnorm", gated_mlp=True, act_fn="silu",
        attn_qkv_bias=False, attn_out_bias=False,
    )  # fmt: skip
    return HookedTransformer(cfg, seed=4)


def _tokens(batch: int = 2, pos: int = 7) -> torch.Tensor:
    return torch.randint(0, 50, (batch, pos), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("which", ["model", "gqa_rotary"])
def test_heads_plus_bias_sum_to_attn_out(which: str, request: pytest.FixtureRequest) -> None:
    model = request.getfixturevalue(which)
    names = lambda n: n.endswith(("hook_result", "hook_attn_out", "hook_z"))  # noqa: E731
    _, cache = model.run_with_cache(_tokens(), names_filter=names)
    for layer, block in enumerate(model.blocks):
        result = cache[f"blocks.{layer}.attn.hook_result"]
        assert result.shape == (2, 7, model.cfg.n_heads, model.cfg.d_model)
        total = result.sum(2) + block.attn.b_O
        torch.testing.assert_close(total, cache[f"blocks.{layer}.hook_attn_out"], atol=1e-5, rtol=0)
        # each head's write is its z through its own slice of W_O
        z = cache[f"blocks.{layer}.attn.hook_z"]
        one = torch.einsum("bpd,dm->bpm", z[:, :, 1], block.attn.W_O[1])
        torch.testing.assert_close(result[:, :, 1], one, atol=1e-6, rtol=0)


def test_hooking_result_changes_nothing_until_edited(model: HookedTransformer) -> None:
    tokens = _tokens()
    base = model(tokens)
    seen: list[torch.Size] = []
    hooked = model.run_with_hooks(
        tokens, fwd_hooks=[("blocks.0.attn.hook_result", lambda r, hook: seen.append(r.shape))]
    )
    assert seen == [torch.Size([2, 7, 4, 32])]
    torch.testing.assert_close(hooked, base, atol=1e-5, rtol=0)
    assert model.attention_paths() == ["sdpa", "sdpa"]  # per-head results need no pattern


@settings(max_examples=20, deadline=None)
@given(layer=st.integers(0, 1), head=st.integers(0, 3))
def test_zeroing_a_head_result_equals_zeroing_its_z(
    model: HookedTransformer, layer: int, head: int
) -> None:
    def zero(act: torch.Tensor, hook: object) -> torch.Tensor:
        act = act.clone()
        act[:, :, head] = 0
        return act

    tokens = _tokens()
    by_result = model.run_with_hooks(tokens, fwd_hooks=[(f"blocks.{layer}.attn.hook_result", zero)])
    by_z = model.run_with_hooks(tokens, fwd_hooks=[(f"blocks.{layer}.attn.hook_z", zero)])
    torch.testing.assert_close(by_result, by_z, atol=1e-5, rtol=0)
    assert not torch.allclose(by_result, model(tokens), atol=1e-5)


def test_default_cache_leaves_derived_hooks_out(model: HookedTransformer) -> None:
    _, cache = model.run_with_cache(_tokens())
    assert not any(name.endswith("hook_result") for name in cache)
    assert "blocks.0.attn.hook_z" in cache
    assert model.hook_dict["blocks.0.attn.hook_result"].derived
    assert not model.hook_dict["blocks.0.attn.hook_z"].derived


def test_result_gradients_flow(model: HookedTransformer) -> None:
    grads: list[torch.Tensor] = []
    tokens = _tokens()
    with model.hooks(bwd_hooks=[("blocks.1.attn.hook_result", lambda g, hook: grads.append(g))]):
        model(tokens, return_type="loss").backward()
    model.zero_grad()
    assert len(grads) == 1 and grads[0].shape == (2, 7, 4, 32)
    assert grads[0].abs().sum() > 0
