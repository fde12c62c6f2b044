"""Mixture-of-experts models against Hugging Face: routing, per-expert writes and interventions.

The shared family suite (``test_hf_families``) already checks log-probs, every
residual, generation and DLA by head on these checkpoints. Here the MoE parts are
checked one by one: the router's choice equals HF's, each expert's write equals
one computed from HF's own expert weights, DLA by expert sums to HF's logit
difference, ablating an expert equals HF with that expert's output projection
zeroed, and per-expert patching equals patching one expert at a time.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import Tensor, nn

from mitk import HookedTransformer
from mitk.analysis.dla import logit_attribution
from mitk.analysis.patching import activation_patch, logit_diff
from mitk.analysis.patching.ablation import mean_ablation, zero_ablation
from mitk.errors import UnsupportedModelError
from mitk.hooks import name
from tests.parity.hf_compare import hf_forward, token_batch
from tests.parity.hf_moe_builders import MOE_FAMILIES, VOCAB

TOL = 1e-4


@pytest.fixture(scope="module", params=sorted(MOE_FAMILIES))
def pair(request: pytest.FixtureRequest) -> tuple[nn.Module, HookedTransformer]:
    """(HF model, mitk's load of it in memory: the fused expert layout)."""
    torch.manual_seed(0)
    hf = MOE_FAMILIES[request.param]().eval()
    hf.config._attn_implementation = "eager"
    return hf, HookedTransformer.from_pretrained(hf)


def _moe_layers(model: HookedTransformer) -> list[int]:
    return [layer for layer in range(model.cfg.n_layers) if model.cfg.is_moe_layer(layer)]


def _hf_router(hf: nn.Module, layer: int) -> nn.Module:
    mlp = hf.model.layers[layer].mlp
    return mlp.router if hasattr(mlp, "router") else mlp.gate


def test_routing_matches_hf_router(pair: Any) -> None:
    """Router logits, chosen experts and their weights equal HF's router outputs."""
    hf, model = pair
    tokens, _ = token_batch(VOCAB, padded=False)
    layers = _moe_layers(model)
    seen: dict[int, Any] = {}
    handles = [
        _hf_router(hf, layer).register_forward_hook(
            lambda _m, _i, out, layer=layer: seen.__setitem__(layer, out)
        )
        for layer in layers
    ]
    try:
        hf_forward(hf, tokens, None)
    finally:
        for handle in handles:
            handle.remove()
    kinds = ("router_logits", "expert_indices", "expert_weights")
    _, cache = model.run_with_cache(
        tokens, names_filter=[name(kind, layer) for kind in kinds for layer in layers]
    )
    for layer in layers:
        hf_logits, hf_weights, hf_indices = seen[layer]
        logits = cache["router_logits", layer]
        torch.testing.assert_close(logits.flatten(0, 1), hf_logits, atol=TOL, rtol=0)
        indices = cache["expert_indices", layer].flatten(0, 1)
        assert torch.equal(indices.sort(-1).values, hf_indices.sort(-1).values)
        # weights in the order of their experts, so HF's unsorted top-k compares too
        ours = cache["expert_weights", layer].flatten(0, 1).gather(-1, indices.argsort(-1))
        theirs = hf_weights.gather(-1, hf_indices.argsort(-1))
        torch.testing.assert_close(ours, theirs.to(ours.dtype), atol=TOL, rtol=0)
        assert len(indices.unique()) > 1, "routing should differ between tokens"


def _hf_expert_writes(
    hf: nn.Module, layer: int, x: Tensor, indices: Tensor, weights: Tensor
) -> Tensor:
    """``[token, expert, d_model]``: HF's experts module run on one (token, expert) at a time."""
    experts = hf.model.layers[layer].mlp.experts
    out = x.new_zeros(x.shape[0], hf.config.to_dict().get("n_routed_experts")
                      or experts.gate_up_proj.shape[0], x.shape[1])  # fmt: skip
    for t in range(x.shape[0]):
        for slot, e in enumerate(indices[t].tolist()):
            one = torch.tensor([[e]])
            out[t, e] = experts(x[t : t + 1], one, weights[t : t + 1, slot : slot + 1])[0]
    return out


def test_expert_writes_match_hf_experts_and_sum_to_the_mlp_output(pair: Any) -> None:
    """Each expert's write (derived from the cache, and hooked) equals HF's expert; with the
    shared expert they sum to ``hook_mlp_out``."""
    hf, model = pair
    tokens, _ = token_batch(VOCAB, padded=False)
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens)
        _, hooked = model.run_with_cache(tokens, names_filter=lambda n: "expert_out" in n)
    for layer in _moe_layers(model):
        derived = cache["expert_out", layer]
        torch.testing.assert_close(derived, hooked["expert_out", layer], atol=1e-6, rtol=0)
        shared = cache["shared_out", layer] if model.cfg.moe.d_shared else 0.0
        torch.testing.assert_close(
            derived.sum(-2) + shared, cache["mlp_out", layer], atol=1e-6, rtol=0
        )
        x = model.blocks[layer].mlp_input(cache["resid_mid", layer]).flatten(0, 1)
        indices = cache["expert_indices", layer].flatten(0, 1)
        weights = cache["expert_weights", layer].flatten(0, 1)
        with torch.no_grad():
            oracle = _hf_expert_writes(hf, layer, x, indices, weights)
        torch.testing.assert_close(derived.flatten(0, 1), oracle, atol=TOL, rtol=0)


def test_dla_by_expert_sums_to_hf_logit_difference(pair: Any) -> None:
    hf, model = pair
    tokens, _ = token_batch(VOCAB, padded=False)
    hf_logits = hf_forward(hf, tokens, None).logits[:, -1]
    answers, wrong = torch.tensor([1, 5, 9]), torch.tensor([2, 6, 3])
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens)
    result = logit_attribution(model, cache, answers, wrong, by="expert")
    rows = torch.arange(3)
    expected = hf_logits[rows, answers] - hf_logits[rows, wrong]
    torch.testing.assert_close(result.total(), expected, atol=TOL, rtol=0)
    layer = _moe_layers(model)[0]
    experts = [label for label in result.labels if label.startswith(f"L{layer}E")]
    assert len(experts) == model.cfg.moe.n_experts
    with pytest.raises(UnsupportedModelError, match=r"mixtures of experts.*by='expert'"):
        logit_attribution(model, cache, answers, wrong, by="neuron")


def test_zero_ablating_an_expert_equals_hf_without_it(pair: Any) -> None:
    """Zeroing expert 1's write at one layer equals HF with that expert's output zeroed."""
    hf, model = pair
    layer, expert = _moe_layers(model)[0], 1
    tokens, _ = token_batch(VOCAB, padded=False)
    hook = zero_ablation(name("expert_out", layer), head=expert)
    with torch.no_grad():
        ours = model.run_with_hooks(tokens, fwd_hooks=[hook]).log_softmax(-1)
        down = hf.model.layers[layer].mlp.experts.down_proj
        kept = down[expert].clone()
        down[expert] = 0.0
        try:
            theirs = hf_forward(hf, tokens, None).logits.log_softmax(-1)
        finally:
            down[expert] = kept
        unablated = model(tokens).log_softmax(-1)
    torch.testing.assert_close(ours, theirs, atol=TOL, rtol=0)
    assert (ours - unablated).abs().max() > 1e-3, "expert 1 should matter to some token"


def test_mean_ablation_replaces_only_the_chosen_expert(pair: Any) -> None:
    _, model = pair
    layer = _moe_layers(model)[0]
    tokens, _ = token_batch(VOCAB, padded=False)
    hook_name = name("expert_out", layer)
    reference = torch.randint(1, VOCAB, (5, 12), generator=torch.Generator().manual_seed(3))
    _, fn = mean_ablation(model, reference, hook_name, head=2, per_position=False)
    _, ref_cache = model.run_with_cache(reference, names_filter=hook_name)
    _, cache = model.run_with_cache(tokens, names_filter=hook_name)
    act = cache[hook_name]
    ablated = fn(act, model.hook_dict[hook_name])
    mean = ref_cache[hook_name][:, :, 2].mean((0, 1))
    torch.testing.assert_close(ablated[:, :, 2], mean.expand_as(act[:, :, 2]))
    keep = [e for e in range(model.cfg.moe.n_experts) if e != 2]
    torch.testing.assert_close(ablated[:, :, keep], act[:, :, keep])


# two families keep this affordable: a one-forward-per-expert loop is the reference
@pytest.mark.parametrize(
    "pair", ["mixtral-top2-of-4", "qwen2-moe-shared-expert-dense-layer-0"], indirect=True
)
@pytest.mark.parametrize("site", ["expert_out", "router_logits"])
def test_patching_per_expert_equals_patching_one_expert_at_a_time(pair: Any, site: str) -> None:
    _, model = pair
    clean, _ = token_batch(VOCAB, padded=False)
    corrupted = clean.clone()
    corrupted[:, 3:7] = torch.randint(1, VOCAB, (3, 4), generator=torch.Generator().manual_seed(5))
    answers, wrong = torch.tensor([1, 5, 9]), torch.tensor([2, 6, 3])
    metric = logit_diff(answers, wrong)
    result = activation_patch(model, clean, corrupted, metric, site=site, per="expert")
    layers = _moe_layers(model)
    n_experts = model.cfg.moe.n_experts
    assert result.layers == layers and result.axes == ("layer", "expert")
    assert result.values.shape == (len(layers), n_experts)
    hooks = [name(site, layer) for layer in layers]
    _, clean_cache = model.run_with_cache(clean, names_filter=hooks)
    for i, layer in enumerate(layers):
        for expert in range(n_experts):

            def patch(act: Tensor, hook: Any, layer: int = layer, expert: int = expert) -> Tensor:
                out = act.clone()
                out[:, :, expert] = clean_cache[name(site, layer)][:, :, expert]
                return out

            with torch.no_grad():
                logits = model.run_with_hooks(corrupted, fwd_hooks=[(name(site, layer), patch)])
            expected = metric(logits[:, -1])
            torch.testing.assert_close(result.per_prompt[:, i, expert], expected, atol=1e-5, rtol=0)
    assert result.values.std() > 0, "patching different experts should differ"


def test_stacked_neuron_weights_are_refused_on_an_moe_model(pair: Any) -> None:
    _, model = pair
    with pytest.raises(UnsupportedModelError, match="mixtures of experts"):
        _ = model.W_in


@pytest.mark.parametrize("pair", ["gpt-oss-sinks-window-4-yarn-clamped"], indirect=True)
def test_sink_share_and_pattern_match_hf_attention_weights(pair: Any) -> None:
    """``hook_pattern`` is HF's attention weights over real keys; with ``hook_sink_prob`` each
    row is a distribution, and hooking the share takes the explicit path."""
    hf, model = pair
    tokens, _ = token_batch(VOCAB, padded=False)
    with torch.no_grad():
        theirs = hf(tokens, output_attentions=True).attentions
    kinds = ("pattern", "sink_prob")
    names = [name(kind, layer) for kind in kinds for layer in range(model.cfg.n_layers)]
    _, cache = model.run_with_cache(tokens, names_filter=names)
    assert all(path.startswith("eager") for path in model.attention_paths())
    for layer in range(model.cfg.n_layers):
        pattern, sink = cache["pattern", layer], cache["sink_prob", layer]
        torch.testing.assert_close(pattern, theirs[layer], atol=TOL, rtol=0)
        torch.testing.assert_close(pattern.sum(-1) + sink, torch.ones_like(sink))
        assert sink.min() > 0.01, "the sinks should take a visible share"
