"""Residual-stream decompositions: every identity that must hold, on several model variants."""

from __future__ import annotations

import pytest
import torch

from mitk import HookedTransformer, TransformerConfig
from mitk.errors import MitkError

VARIANTS = {
    "gpt2-like": {},
    "attn-only": {"d_mlp": 0},
    "llama-like": {"normalization": "rmsnorm", "gated_mlp": True, "act_fn": "silu",
                   "n_key_value_heads": 2, "attn_qkv_bias": False, "mlp_bias": False},
    "parallel": {"parallel_attn_mlp": True, "unembed_bias": True},
    # rotary (MQA, a sliding window) and BLOOM-like ALiBi with a norm after the embeddings
    "rotary-mqa-window": {"positional": "rotary", "rotary_dim": 4, "n_key_value_heads": 1,
                          "sliding_window": 3},
    "alibi-embed-norm": {"positional": "alibi", "embed_norm": True},
}  # fmt: skip


def build(variant: str) -> HookedTransformer:
    cfg = TransformerConfig(d_model=32, n_layers=3, n_heads=4, d_vocab=40, n_ctx=16,
                            **VARIANTS[variant])  # fmt: skip
    model = HookedTransformer(cfg, seed=2)
    with torch.no_grad():  # non-zero biases and norm weights, so their terms matter
        for param in model.parameters():
            if param.ndim == 1:
                param.add_(torch.randn_like(param) * 0.2)
    return model


@pytest.fixture(params=list(VARIANTS))
def run(request: pytest.FixtureRequest):
    model = build(request.param)
    tokens = torch.randint(0, 40, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens)
    return model, cache


def test_decompose_resid_sums_to_the_stream(run) -> None:
    model, cache = run
    for layer in range(model.cfg.n_layers):
        stack = cache.decompose_resid(layer)
        torch.testing.assert_close(stack.total(), cache["resid_pre", layer], atol=1e-5, rtol=0)
    final = cache.decompose_resid()
    torch.testing.assert_close(final.total(), cache["resid_post", 2], atol=1e-5, rtol=0)
    n_embed = 2 if model.cfg.positional == "learned" and not model.cfg.embed_norm else 1
    assert final.labels[:n_embed] == ["embed", "pos_embed"][:n_embed]
    assert final.labels[n_embed] == "0_attn_out"
    assert final.tensor.shape == (len(final.labels), 2, 9, 32)


def test_heads_and_bias_sum_to_attn_out(run) -> None:
    model, cache = run
    stack = cache.stack_head_results()
    per_layer = model.cfg.n_heads + 1
    assert len(stack) == model.cfg.n_layers * per_layer
    for layer in range(model.cfg.n_layers):
        part = stack.tensor[layer * per_layer : (layer + 1) * per_layer]
        torch.testing.assert_close(part.sum(0), cache["attn_out", layer], atol=1e-5, rtol=0)
    assert stack.labels[:2] == ["L0H0", "L0H1"] and stack.labels[4] == "L0_attn_bias"


def test_neurons_and_bias_sum_to_mlp_out(run) -> None:
    model, cache = run
    if not model.cfg.has_mlp:
        with pytest.raises(ValueError, match="attention-only"):
            cache.stack_neuron_results(0)
        return
    # layer is exclusive, as in TransformerLens and stack_head_results: layers 0 and 1 here
    stack = cache.stack_neuron_results(2)
    per_layer = model.cfg.d_mlp + 1
    assert len(stack) == 2 * per_layer and stack.labels[per_layer] == "L1N0"
    for layer in range(2):
        part = stack.tensor[layer * per_layer : (layer + 1) * per_layer]
        torch.testing.assert_close(part.sum(0), cache["mlp_out", layer], atol=1e-5, rtol=0)
    assert cache.stack_neuron_results().labels[-1] == f"L{model.cfg.n_layers - 1}_mlp_bias"
    some = cache.stack_neuron_results(2, neurons=[3, 7])
    assert some.labels == ["L0N3", "L0N7", "L0_mlp_bias", "L1N3", "L1N7", "L1_mlp_bias"]
    torch.testing.assert_close(some.tensor[3], stack.tensor[per_layer + 3])
    with pytest.raises(ValueError, match="layer=0"):
        cache.stack_neuron_results(0)


def test_accumulated_resid_and_ln_application(run) -> None:
    model, cache = run
    acc = cache.accumulated_resid()
    assert acc.labels == ["0_pre", "1_pre", "2_pre", "final_post"]
    torch.testing.assert_close(acc.tensor[1], cache["resid_pre", 1])
    normalized = cache.apply_ln_to_stack(cache.decompose_resid(), layer=None)
    torch.testing.assert_close(
        normalized.total(), cache["ln_final.hook_normalized"], atol=1e-5, rtol=0
    )
    if not model.cfg.parallel_attn_mlp:
        at_1 = cache.apply_ln_to_stack(cache.decompose_resid(1), layer=1)
        torch.testing.assert_close(
            at_1.total(), cache["blocks.1.ln1.hook_normalized"], atol=1e-5, rtol=0
        )


def test_missing_activations_are_named() -> None:
    model = build("gpt2-like")
    _, cache = model.run_with_cache(
        torch.randint(0, 40, (1, 5)), names_filter=["hook_embed", "hook_pos_embed"]
    )
    with pytest.raises(MitkError, match=r"blocks\.0\.hook_attn_out.*not cached"):
        cache.decompose_resid()
    with pytest.raises(ValueError, match="layer=7 is outside"):
        cache.decompose_resid(7)


def test_to_frame_is_long(run) -> None:
    _, cache = run
    stack = cache.decompose_resid(1)
    frame = stack.to_frame()
    assert list(frame.columns) == ["component", "batch", "pos", "norm"]
    assert len(frame) == len(stack) * 2 * 9
    assert frame["component"].iloc[-1] == stack.labels[-1]
