"""``MixtureOfExperts`` against a one-token-at-a-time oracle written from the routing rules.

The oracle loops over tokens and over each token's chosen experts in plain
Python, choosing experts by sorting probabilities (so any route it takes is
the top-k set, whatever order ``torch.topk`` returns them in), and applies the
gated or clamped expert MLPs and the shared expert literally. The module under
test groups tokens by expert instead; the two must agree for every
configuration hypothesis draws. Hooks that reroute are checked as well.
"""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
import pytest
import torch
from torch import Tensor
import torch.nn.functional as F

from mitk import HookedTransformer
from mitk.config import MoEConfig, TransformerConfig
from mitk.errors import ConfigError, ShapeMismatchError
from mitk.hooks import name
from mitk.model.moe import MixtureOfExperts

D_MODEL = 16


def _moe(seed: int, **fields: Any) -> MixtureOfExperts:
    cfg = TransformerConfig(
        d_model=D_MODEL, n_layers=1, n_heads=2, d_vocab=11, n_ctx=8, act_fn="silu",
        moe=MoEConfig(**fields),
    )  # fmt: skip
    module = MixtureOfExperts(cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.copy_(torch.randn(param.shape, generator=gen) * 0.5)
    return module.eval()


def _oracle(module: MixtureOfExperts, x: Tensor) -> Tensor:
    """The MoE output token by token, from the definitions in ``MoEConfig``."""
    moe = module.moe
    out = torch.zeros_like(x)
    flat, flat_out = x.reshape(-1, x.shape[-1]), out.view(-1, x.shape[-1])
    for t, token in enumerate(flat):
        logits = token @ module.W_router
        if module.b_router is not None:
            logits = logits + module.b_router
        probs = logits.softmax(-1)
        if moe.n_groups > 1:
            size = moe.n_experts // moe.n_groups
            best = probs.view(moe.n_groups, size).max(-1).values.argsort(descending=True)
            allowed = {g * size + i for g in best[: moe.top_groups].tolist() for i in range(size)}
            probs = torch.tensor([p if e in allowed else 0.0 for e, p in enumerate(probs)])
        chosen = probs.argsort(descending=True)[: moe.top_k].tolist()
        weights = probs[chosen]
        if moe.norm_top_k:
            weights = weights / weights.sum()
        for e, w in zip(chosen, weights * moe.routed_scale, strict=True):
            gate, linear = token @ module.W_gate[e], token @ module.W_in[e]
            if module.b_gate is not None:
                gate, linear = gate + module.b_gate[e], linear + module.b_in[e]
            if moe.clamp_limit:
                gate = gate.clamp(max=moe.clamp_limit)
                linear = linear.clamp(-moe.clamp_limit, moe.clamp_limit)
                hidden = (linear + 1) * gate * torch.sigmoid(moe.clamp_alpha * gate)
            else:
                hidden = F.silu(gate) * linear
            write = hidden @ module.W_out[e]
            if module.b_out is not None:
                write = write + module.b_out[e]
            flat_out[t] += w * write
        if moe.d_shared:
            shared = module.shared
            hidden = F.silu(token @ shared.W_gate) * (token @ shared.W_in)
            gate = (
                1.0 if module.W_shared_gate is None else torch.sigmoid(token @ module.W_shared_gate)
            )
            flat_out[t] += gate * (hidden @ shared.W_out)
    return out


@st.composite
def moe_fields(draw: st.DrawFn) -> dict[str, Any]:
    n_groups = draw(st.sampled_from([1, 1, 2, 3]))
    n_experts = n_groups * draw(st.integers(1 if n_groups > 1 else 2, 3))
    top_groups = draw(st.integers(1, n_groups))
    allowed = top_groups * (n_experts // n_groups)
    d_shared = draw(st.sampled_from([0, 6]))
    return {
        "n_experts": n_experts, "top_k": draw(st.integers(1, allowed)),
        "d_expert": draw(st.integers(1, 7)), "norm_top_k": draw(st.booleans()),
        "routed_scale": draw(st.sampled_from([1.0, 2.5])), "router_bias": draw(st.booleans()),
        "expert_bias": draw(st.booleans()), "clamp_limit": draw(st.sampled_from([0.0, 0.7])),
        "d_shared": d_shared, "shared_gate": bool(d_shared) and draw(st.booleans()),
        "n_groups": n_groups, "top_groups": top_groups,
    }  # fmt: skip


@settings(max_examples=40, deadline=None)
@given(fields=moe_fields(), seed=st.integers(0, 2**16), pos=st.integers(1, 5))
def test_grouped_forward_equals_the_per_token_oracle(
    fields: dict[str, Any], seed: int, pos: int
) -> None:
    module = _moe(seed, **fields)
    x = torch.randn(2, pos, D_MODEL, generator=torch.Generator().manual_seed(seed + 1))
    with torch.no_grad():
        torch.testing.assert_close(module(x), _oracle(module, x), atol=1e-5, rtol=1e-5)


def test_hooked_expert_writes_sum_to_the_unhooked_output() -> None:
    module = _moe(0, n_experts=4, top_k=2, d_expert=5, d_shared=3, shared_gate=True)
    x = torch.randn(2, 3, D_MODEL)
    seen: list[Tensor] = []
    module.hook_expert_out.add_hook(lambda act, hook: seen.append(act))
    with torch.no_grad():
        hooked = module(x)
    module.hook_expert_out.remove_hooks()
    with torch.no_grad():
        torch.testing.assert_close(hooked, module(x))
    per_expert = seen[0]
    assert per_expert.shape == (2, 3, 4, D_MODEL)
    assert ((per_expert.abs().sum(-1) > 0).sum(-1) == 2).all(), "two experts write per token"


def _model() -> HookedTransformer:
    moe = MoEConfig(n_experts=4, top_k=2, d_expert=6)
    cfg = TransformerConfig(d_model=D_MODEL, n_layers=1, n_heads=2, d_vocab=11, n_ctx=8,
                            act_fn="silu", normalization="rmsnorm", moe=moe)  # fmt: skip
    return HookedTransformer(cfg)


def test_a_rerouting_hook_is_used_by_the_experts() -> None:
    """Indices and weights a hook sets are the ones the experts are run with."""
    model, tokens = _model(), torch.tensor([[1, 2, 3, 4]])
    seen: dict[str, Tensor] = {}

    def record(act: Tensor, hook: Any) -> None:
        seen[hook.name] = act

    hooks = [
        (name("expert_indices", 0), lambda act, hook: torch.tensor([3, 0]).expand_as(act).clone()),
        (name("expert_weights", 0), lambda act, hook: torch.tensor([0.25, 0.75]).expand_as(act)),
        (name("resid_mid", 0), record),
        (name("expert_out", 0), record),
        (name("mlp_out", 0), record),
    ]
    with torch.no_grad():
        model.run_with_hooks(tokens, fwd_hooks=hooks)
        mlp = model.blocks[0].mlp
        x = model.blocks[0].mlp_input(seen[name("resid_mid", 0)])[0]
        expected = 0.75 * mlp._expert(0, x) + 0.25 * mlp._expert(3, x)
    per_expert = seen[name("expert_out", 0)][0]
    assert per_expert[:, [1, 2]].abs().max() == 0
    torch.testing.assert_close(seen[name("mlp_out", 0)][0], expected)


bad_indices = st.one_of(
    st.just(torch.tensor([[[0, 4]] * 4])),  # expert 4 of 4 does not exist
    st.just(torch.tensor([[[-1, 2]] * 4])),
    st.just(torch.tensor([[[1, 1]] * 4])),  # one expert twice
    st.just(torch.tensor([[[0, 1]] * 3])),  # too few positions
    st.just(torch.tensor([[[0.0, 1.0]] * 4])),  # not integers
    st.integers(4, 2**31 - 1).map(lambda e: torch.tensor([[[0, e]] * 4])),
)


@settings(max_examples=25, deadline=None)
@given(replacement=bad_indices)
def test_a_rerouting_hook_with_impossible_experts_is_refused(replacement: Tensor) -> None:
    model = _model()
    hook = (name("expert_indices", 0), lambda act, hook: replacement)
    with pytest.raises(ShapeMismatchError, match="hook_expert_indices"):
        model.run_with_hooks(torch.tensor([[1, 2, 3, 4]]), fwd_hooks=[hook])


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"n_experts": 4, "top_k": 5, "d_expert": 2}, "top_k"),
        ({"n_experts": 4, "top_k": 1, "d_expert": 0}, "d_expert"),
        ({"n_experts": 6, "top_k": 1, "d_expert": 2, "n_groups": 4}, "n_groups"),
        ({"n_experts": 4, "top_k": 1, "d_expert": 2, "shared_gate": True}, "shared_gate"),
        ({"n_experts": 4, "top_k": 1, "d_expert": 2, "routed_scale": -1.0}, "routed_scale"),
    ],
)
def test_impossible_moe_configs_are_refused(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        MoEConfig(**fields)


def test_moe_layers_outside_the_model_are_refused() -> None:
    with pytest.raises(ConfigError, match="moe layers"):
        TransformerConfig(d_model=8, n_layers=2, n_heads=2, d_vocab=5, n_ctx=4,
                          moe=MoEConfig(n_experts=2, top_k=1, d_expert=2, layers=[2]))  # fmt: skip


def test_moe_config_round_trips_through_json() -> None:
    model = _model()
    assert TransformerConfig.from_json(model.cfg.to_json()) == model.cfg
