"""Residual-stream decompositions: every identity that must hold, on several model variants.

The methods take TransformerLens's arguments (their parity with transformer-lens
is ``tests/parity/test_tl_cache_parity.py``); here: decompositions sum to the
stream, heads plus bias to ``attn_out``, neurons plus bias to ``mlp_out``, the
full decomposition (and any stack with its remainder) to the stream it
decomposes, with and without position slices and batch dims, and bad input
raises a ``MitkError`` naming the problem.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
import pytest
import torch

from mitk import HookedTransformer, TransformerConfig
from mitk.cache import ActivationCache, ResidualStack
from mitk.cache.errors import CacheArgumentError, LayerOutOfRangeError, NotCachedError
from mitk.errors import MitkError, ShapeMismatchError, UnsupportedModelError
from mitk.utils import Slice

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
TOL = dict(atol=1e-5, rtol=0)


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
def run(request: pytest.FixtureRequest) -> tuple[HookedTransformer, ActivationCache]:
    model = build(request.param)
    tokens = torch.randint(0, 40, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens)
    return model, cache


def entering(cache: ActivationCache, layer: int) -> torch.Tensor:
    return cache["resid_pre", layer] if layer < 3 else cache["resid_post", 2]


def test_decompose_resid_sums_to_the_stream(run) -> None:
    model, cache = run
    for layer in range(model.cfg.n_layers + 1):
        stack = cache.decompose_resid(layer)
        torch.testing.assert_close(stack.sum(0), entering(cache, layer), **TOL)
    final, labels = cache.decompose_resid(return_labels=True)
    torch.testing.assert_close(final.sum(0), cache["resid_post", -1], **TOL)
    n_embed = 2 if model.cfg.positional == "learned" and not model.cfg.embed_norm else 1
    assert labels[:n_embed] == ["embed", "pos_embed"][:n_embed]
    assert labels[n_embed] == "0_attn_out"
    assert final.shape == (len(labels), 2, 9, 32)
    if model.cfg.has_mlp and not model.cfg.parallel_attn_mlp:  # the stream entering an MLP
        for layer in range(model.cfg.n_layers):
            mid = cache.decompose_resid(layer, mlp_input=True)
            torch.testing.assert_close(mid.sum(0), cache["resid_mid", layer], **TOL)


def test_heads_and_bias_sum_to_attn_out(run) -> None:
    model, cache = run
    stack, labels = cache.stack_head_results(incl_bias=True, return_labels=True)
    per_layer = model.cfg.n_heads + 1
    assert len(labels) == stack.shape[0] == model.cfg.n_layers * per_layer
    for layer in range(model.cfg.n_layers):
        part = stack[layer * per_layer : (layer + 1) * per_layer]
        torch.testing.assert_close(part.sum(0), cache["attn_out", layer], **TOL)
    assert labels[:2] == ["L0H0", "L0H1"] and labels[4] == "L0_attn_bias"
    # TransformerLens's arguments: the heads alone, then whatever else entered the stream
    heads, tl_labels = cache.stack_head_results(2, incl_remainder=True, return_labels=True)
    assert tl_labels == [f"L{i}H{h}" for i in range(2) for h in range(4)] + ["remainder"]
    torch.testing.assert_close(heads.sum(0), entering(cache, 2), **TOL)


def test_neurons_and_bias_sum_to_mlp_out(run) -> None:
    model, cache = run
    if not model.cfg.has_mlp:
        with pytest.raises(UnsupportedModelError, match="attention-only"):
            cache.stack_neuron_results(1)
        return
    # layer is exclusive, as in TransformerLens and stack_head_results: layers 0 and 1 here
    stack, labels = cache.stack_neuron_results(2, incl_bias=True, return_labels=True)
    per_layer = model.cfg.d_mlp + 1
    assert len(labels) == 2 * per_layer and labels[per_layer] == "L1N0"
    for layer in range(2):
        part = stack[layer * per_layer : (layer + 1) * per_layer]
        torch.testing.assert_close(part.sum(0), cache["mlp_out", layer], **TOL)
    last = cache.stack_neuron_results(incl_bias=True, return_labels=True)[1][-1]
    assert last == f"L{model.cfg.n_layers - 1}_mlp_bias"
    some, some_labels = cache.stack_neuron_results(2, neuron_slice=[3, 7], incl_bias=True,
                                                   return_labels=True)  # fmt: skip
    assert some_labels == ["L0N3", "L0N7", "L0_mlp_bias", "L1N3", "L1N7", "L1_mlp_bias"]
    torch.testing.assert_close(some[3], stack[per_layer + 3])
    # per block, get_neuron_results holds the same writes, neuron dim second to last
    torch.testing.assert_close(cache.get_neuron_results(1).movedim(-2, 0), stack[per_layer:-1])
    empty, none = cache.stack_neuron_results(0, return_labels=True)
    assert empty.shape == (0, 2, 9, 32) and none == []
    with_rest, rest_labels = cache.stack_neuron_results(3, incl_remainder=True, return_labels=True)
    assert rest_labels[-1] == "remainder"
    torch.testing.assert_close(with_rest.sum(0), cache["resid_post", -1], **TOL)


@pytest.mark.parametrize("expand_neurons", [True, False])
def test_the_full_decomposition_sums_to_the_stream(run, expand_neurons: bool) -> None:
    model, cache = run
    n_layers = model.cfg.n_layers
    for layer in range(n_layers + 1):
        stack, labels = cache.get_full_resid_decomposition(
            layer, expand_neurons=expand_neurons, return_labels=True
        )
        assert labels[-1] == "bias" and len(labels) == stack.shape[0]
        torch.testing.assert_close(stack.sum(0), entering(cache, layer), **TOL)
        if layer < n_layers and model.cfg.has_mlp and not model.cfg.parallel_attn_mlp:
            mid = cache.get_full_resid_decomposition(layer, mlp_input=True,
                                                     expand_neurons=expand_neurons)  # fmt: skip
            torch.testing.assert_close(mid.sum(0), cache["resid_mid", layer], **TOL)
    normed = cache.get_full_resid_decomposition(apply_ln=True, expand_neurons=expand_neurons)
    torch.testing.assert_close(normed.sum(0), cache["ln_final.hook_normalized"], **TOL)


def test_accumulated_resid_and_ln_application(run) -> None:
    model, cache = run
    acc, labels = cache.accumulated_resid(return_labels=True)
    assert labels == ["0_pre", "1_pre", "2_pre", "final_post"]
    torch.testing.assert_close(acc[1], cache["resid_pre", 1])
    normalized = cache.apply_ln_to_stack(cache.decompose_resid(), layer=None)
    torch.testing.assert_close(normalized.sum(0), cache["ln_final.hook_normalized"], **TOL)
    if not model.cfg.parallel_attn_mlp:
        at_1 = cache.apply_ln_to_stack(cache.decompose_resid(1), layer=1)
        torch.testing.assert_close(at_1.sum(0), cache["blocks.1.ln1.hook_normalized"], **TOL)
    if model.cfg.has_mlp and not model.cfg.parallel_attn_mlp:
        mid = cache.decompose_resid(1, mlp_input=True, apply_ln=True)
        torch.testing.assert_close(mid.sum(0), cache["blocks.1.ln2.hook_normalized"], **TOL)
    # a logit lens: at the unembed, apply_ln runs ln_final on each snapshot (the last: the real one)
    lens = cache.accumulated_resid(apply_ln=True)
    with torch.no_grad():
        torch.testing.assert_close(lens[-1], model.ln_final(cache["resid_post", -1]), **TOL)
        torch.testing.assert_close(lens[0], model.ln_final(cache["resid_pre", 0]), **TOL)


POSITIONS = [None, -1, 4, (2, 7), (0, 9, 3), slice(5, None), [0, 8, 3], torch.tensor([1, 2]),
             Slice(-2), Slice((1, 4))]  # fmt: skip


@settings(max_examples=60, deadline=None)
@given(
    pos=st.sampled_from(POSITIONS), layer=st.sampled_from([None, -1, -2, 0, 1, 2, 3]),
    batchless=st.booleans(), apply_ln=st.booleans(), expand=st.booleans(),
)  # fmt: skip
def test_identities_hold_under_any_position_slice(pos, layer, batchless, apply_ln, expand) -> None:
    model = build("gpt2-like")
    tokens = torch.randint(0, 40, (1 if batchless else 2, 9), generator=torch.Generator())
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens)
    if batchless:
        cache.remove_batch_dim()
    slice_ = pos if isinstance(pos, Slice) else Slice(pos)
    end = 3 if layer in (None, -1) else 2 if layer == -2 else layer
    stream = slice_.apply(entering(cache, end), dim=-2)
    full = cache.get_full_resid_decomposition(layer, expand_neurons=expand, pos_slice=pos,
                                              apply_ln=apply_ln)  # fmt: skip
    parts = cache.decompose_resid(layer, pos_slice=pos, apply_ln=apply_ln)
    heads = cache.stack_head_results(layer, pos_slice=pos, incl_remainder=True, apply_ln=apply_ln)
    if apply_ln:
        stream = cache.apply_ln_to_stack(stream[None], end, pos_slice=pos)[0]
    for stack in (full, parts, heads):
        assert stack.shape[1:] == stream.shape
        torch.testing.assert_close(stack.sum(0), stream, **TOL)


def test_results_are_tensors_labels_or_a_residual_stack(run) -> None:
    _, cache = run
    plain = cache.decompose_resid(1)
    tensor, labels = cache.decompose_resid(1, return_labels=True)
    stack = cache.decompose_resid(1, as_stack=True)
    assert isinstance(plain, torch.Tensor) and isinstance(stack, ResidualStack)
    assert torch.equal(plain, tensor) and torch.equal(stack.tensor, tensor)
    assert stack.labels == labels
    normed = cache.apply_ln_to_stack(stack, layer=1)
    assert isinstance(normed, ResidualStack) and normed.labels == labels
    torch.testing.assert_close(normed.tensor, cache.apply_ln_to_stack(tensor, layer=1))


def test_to_frame_is_long(run) -> None:
    _, cache = run
    stack = cache.decompose_resid(1, as_stack=True)
    frame = stack.to_frame()
    assert list(frame.columns) == ["component", "batch", "pos", "norm"]
    assert len(frame) == len(stack) * 2 * 9
    assert frame["component"].iloc[-1] == stack.labels[-1]
    with pytest.raises(ShapeMismatchError, match=r"\[component, batch, pos, d_model\]"):
        cache.decompose_resid(1, pos_slice=-1, as_stack=True).to_frame()


def test_head_results_are_derived_from_z_unless_cached() -> None:
    model = build("llama-like")  # grouped-query attention: z has every query head
    tokens = torch.randint(0, 40, (2, 7), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens)
        results = [f"blocks.{layer}.attn.hook_result" for layer in (0, 1)]
        _, hooked = model.run_with_cache(tokens, names_filter=results)
    assert "blocks.1.attn.hook_result" not in cache  # derived on read, not stored
    derived = cache["blocks.1.attn.hook_result"]
    assert derived.shape == (2, 7, 4, 32)
    torch.testing.assert_close(derived, hooked["blocks.1.attn.hook_result"], **TOL)
    # a cache of results only still stacks heads; one with neither says what is missing
    torch.testing.assert_close(hooked.stack_head_results(2), cache.stack_head_results(2), **TOL)
    with pytest.raises(NotCachedError, match="hook_z"):
        hooked.stack_head_results(3)  # layer 2's results were not cached
    cache.compute_head_results()
    assert "blocks.1.attn.hook_result" in cache.cache_dict
    cache.cache_dict["blocks.0.attn.hook_result"][0, 0, 0, 0] = 7.0
    cache.compute_head_results()  # kept as stored
    assert cache["blocks.0.attn.hook_result"][0, 0, 0, 0] == 7.0


def test_head_results_by_short_name(run) -> None:
    _, cache = run
    for key in [("result", 1), ("result", -1), "result0", ("result", 2, "attn")]:
        layer = key[1] % 3 if isinstance(key, tuple) else 0
        torch.testing.assert_close(cache[key], cache[f"blocks.{layer}.attn.hook_result"])


def test_negative_keys_batch_slices_and_autodiff(run) -> None:
    _, cache = run
    assert torch.equal(cache["resid_post", -1], cache["blocks.2.hook_resid_post"])
    assert torch.equal(cache["scale", -3, "ln1"], cache["blocks.0.ln1.hook_scale"])
    assert torch.equal(cache["embed"], cache["hook_embed"])
    with pytest.raises(KeyError, match="layer -4"):
        cache["resid_post", -4]
    with pytest.raises(KeyError, match="did you mean"):
        cache["resid_post", 7]
    assert cache.cache_dict is cache.cache_dict and list(cache.keys()) == list(cache.cache_dict)
    rows = cache.apply_slice_to_batch_dim(1)
    assert not rows.has_batch_dim and torch.equal(rows["resid_pre", 1], cache["resid_pre", 1][1])
    with pytest.raises(ShapeMismatchError, match="without a batch dim"):
        rows.apply_slice_to_batch_dim(0)
    stacked = cache.stack_activation("scale", -1, "ln1")
    assert stacked.shape == (3, 2, 9, 1) and cache.stack_activation("z", 0).shape[0] == 0
    was = torch.is_grad_enabled()
    try:
        cache.toggle_autodiff(False)
        assert not torch.is_grad_enabled()
    finally:
        torch.set_grad_enabled(was)


def test_bad_input_is_named() -> None:
    model = build("gpt2-like")
    _, cache = model.run_with_cache(
        torch.randint(0, 40, (1, 5)), names_filter=["hook_embed", "hook_pos_embed"]
    )
    with pytest.raises(MitkError, match=r"blocks\.0\.hook_attn_out.*not cached"):
        cache.decompose_resid()
    with pytest.raises(LayerOutOfRangeError, match="layer=7 is outside"):
        cache.decompose_resid(7)
    with pytest.raises(IndexError, match="layer=-5"):
        cache.stack_head_results(-5)
    with pytest.raises(CacheArgumentError, match="pos_slice"):
        cache.decompose_resid(0, pos_slice="last")
    with pytest.raises(CacheArgumentError, match="mode"):
        cache.decompose_resid(0, mode="both")
    with pytest.raises(CacheArgumentError, match="mlp_input"):
        cache.decompose_resid(3, mlp_input=True)
    with pytest.raises(NotCachedError, match=r"apply_ln needs .*blocks\.0\.ln1\.hook_scale"):
        cache.decompose_resid(0, apply_ln=True)
    _, full = model.run_with_cache(torch.randint(0, 40, (2, 5)))
    stack = full.decompose_resid(pos_slice=-1)  # [component, batch, d_model]
    with pytest.raises(ShapeMismatchError, match="pos_slice"):
        full.apply_ln_to_stack(stack)  # the scale still has every position
    with pytest.raises(ShapeMismatchError, match="labels"):
        ResidualStack(stack, ["embed"])


@settings(max_examples=40, deadline=None)
@given(
    layer=st.integers(-12, 12), pos=st.one_of(st.integers(-9, 8), st.floats(), st.text(max_size=3))
)
def test_random_arguments_answer_or_raise_a_mitk_error(layer: int, pos: object) -> None:
    model = build("gpt2-like")
    tokens = torch.randint(0, 40, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens)
    for method in (cache.decompose_resid, cache.accumulated_resid, cache.stack_head_results,
                   cache.stack_neuron_results, cache.get_full_resid_decomposition):  # fmt: skip
        try:
            stack = method(layer, pos_slice=pos)
        except MitkError:
            assert not (-4 <= layer <= 3 and isinstance(pos, int))
            continue
        assert stack.shape[-1] == 32 and stack.shape[1] == 2
