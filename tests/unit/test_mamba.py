"""Mamba (selective state-space) blocks: scan, hooks, cache, decompositions, generation."""

from __future__ import annotations

import pytest
import torch

from mitk import HookedTransformer, TransformerConfig
from mitk.analysis.dla import logit_attribution
from mitk.config import SSMConfig
from mitk.errors import ConfigError, UnknownHookError, UnsupportedModelError
from mitk.hooks import name
from mitk.model.kv_cache import KVCache
from mitk.model.ssm import SSMState, chunked_scan
from mitk.model.ssm.mixer import CHUNKED, SEQUENTIAL
from tests.naive_patching import patched_both_ways
from tests.recurrent_checks import (
    assert_generation_runs_the_prefix_once,
    state_shapes_after_incremental_run,
)

VOCAB = 40
C, N = 24, 5  # d_inner, d_state


def _config(**ssm: object) -> TransformerConfig:
    return TransformerConfig(
        d_model=12, n_layers=2, n_heads=1, d_vocab=VOCAB, n_ctx=1024, d_mlp=0,
        positional="none", normalization="rmsnorm", act_fn="silu",
        ssm=SSMConfig(**{"d_inner": C, "d_state": N, "d_conv": 4, "dt_rank": 3, **ssm}),  # type: ignore[arg-type]
    )  # fmt: skip


@pytest.fixture(scope="module")
def model() -> HookedTransformer:
    torch.manual_seed(0)
    m = HookedTransformer(_config(proj_bias=True), seed=3)
    with torch.no_grad():  # larger than the init's, so that every part of the mixer matters
        for param in m.parameters():
            param.add_(torch.randn_like(param) * 0.2)
    return m.eval()


def _tokens(batch: int = 2, pos: int = 11, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, pos), generator=torch.Generator().manual_seed(seed))


def _reference_scan(
    x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C_: torch.Tensor,
    h: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """The recurrence written out, one position and one scalar formula at a time (fp64)."""
    ys = []
    for t in range(x.shape[1]):
        decay = torch.exp(dt[:, t, :, None] * A)
        h = decay * h + dt[:, t, :, None] * B[:, t, None, :] * x[:, t, :, None]
        ys.append((h * C_[:, t, None, :]).sum(-1))
    return torch.stack(ys, 1), h


@pytest.mark.parametrize(("chunk", "block"), [(1, 128), (3, 128), (8, 10), (32, 128)])
@pytest.mark.parametrize("dt_scale", [0.1, 3.0])  # 3.0: a chunk's decay passes e^-88 (fp32's)
@pytest.mark.parametrize("grad", [False, True])  # in place, or with autograd's graph
def test_chunked_scan_equals_a_slow_loop(
    chunk: int, block: int, dt_scale: float, grad: bool
) -> None:
    gen = torch.Generator().manual_seed(chunk)
    b, pos = 2, 37
    x = torch.randn(b, pos, C, generator=gen)
    dt = torch.rand(b, pos, C, generator=gen) * dt_scale
    A = -torch.rand(C, N, generator=gen) * 8
    B, C_ = torch.randn(b, pos, N, generator=gen), torch.randn(b, pos, N, generator=gen)
    h0 = torch.randn(b, C, N, generator=gen).requires_grad_(grad)
    y, last = chunked_scan(x, dt, A, B, C_, h0, chunk=chunk, block=block)
    y_ref, last_ref = _reference_scan(*(t.detach().double() for t in (x, dt, A, B, C_, h0)))
    torch.testing.assert_close(y.detach().double(), y_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(last.detach().double(), last_ref, atol=1e-5, rtol=1e-5)


def test_state_hooks_take_the_sequential_path_and_agree(model: HookedTransformer) -> None:
    tokens = _tokens()
    with torch.no_grad():
        fast = model(tokens)
        assert model.attention_paths() == [CHUNKED, CHUNKED]
        slow, cache = model.run_with_cache(
            tokens, names_filter=[name("ssm_state", 1), name("A", 1), name("C", 1)]
        )
    assert model.attention_paths() == [CHUNKED, SEQUENTIAL]
    torch.testing.assert_close(slow, fast, atol=1e-5, rtol=0)
    states, decay = cache[name("ssm_state", 1)], cache[name("A", 1)]
    assert states.shape == decay.shape == (2, 11, C, N)
    assert bool((decay > 0).all() and (decay < 1).all())
    gated = model.blocks[1].mixer
    assert torch.allclose(gated.A.exp().new_ones(()), torch.ones(()))  # A is a plain property


def test_every_mixer_hook_fires_with_its_shape(model: HookedTransformer) -> None:
    tokens = _tokens()
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens)
    shapes = {
        "in_proj": (2, 11, 2 * C), "conv": (2, 11, C), "dt": (2, 11, C), "B": (2, 11, N),
        "C": (2, 11, N), "gated": (2, 11, C), "mixer_out": (2, 11, 12),
    }  # fmt: skip
    for layer in range(2):
        for kind, shape in shapes.items():
            assert cache[name(kind, layer)].shape == shape, kind
        # derived: built only when asked by name, never by a cache of everything
        assert name("ssm_state", layer) not in cache and name("A", layer) not in cache
    assert bool((cache[name("dt", 0)] > 0).all())  # after softplus


def test_unknown_mixer_hook_names_raise_with_suggestions(model: HookedTransformer) -> None:
    with pytest.raises(UnknownHookError, match="hook_ssm_state"):
        model.run_with_cache(_tokens(), names_filter=["blocks.0.mixer.hook_ssm_sate"])
    with pytest.raises(UnknownHookError):
        model.run_with_hooks(_tokens(), fwd_hooks=[("blocks.0.attn.hook_pattern", print)])


def test_replacing_a_mixer_hook_changes_the_output(model: HookedTransformer) -> None:
    tokens = _tokens()
    with torch.no_grad():
        clean = model(tokens)
        for kind in ("conv", "dt", "B", "C", "A", "ssm_state", "gated", "mixer_out"):
            out = model.run_with_hooks(
                tokens, fwd_hooks=[(name(kind, 0), lambda act, hook: act * 0.5)]
            )
            assert not torch.allclose(out, clean), kind


def test_residual_decomposition_sums_to_the_final_stream(model: HookedTransformer) -> None:
    with torch.no_grad():
        _, cache = model.run_with_cache(_tokens())
    parts, labels = cache.decompose_resid(return_labels=True)
    assert labels == ["embed", "0_mixer_out", "1_mixer_out"]
    torch.testing.assert_close(parts.sum(0), cache[name("resid_post", 1)], atol=1e-6, rtol=0)
    _, acc_labels = cache.accumulated_resid(incl_mid=True, return_labels=True)
    assert acc_labels == ["0_pre", "1_pre", "final_post"]


def test_direct_logit_attribution_of_mixer_outputs_sums_to_the_logit_difference(
    model: HookedTransformer,
) -> None:
    tokens = _tokens()
    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens)
        parts = cache.decompose_resid(apply_ln=True, pos_slice=-1)  # [component, batch, d_model]
        answer, wrong = torch.tensor([3, 5]), torch.tensor([7, 1])
        direction = model.ln_final.w[:, None] * (model.W_U[:, answer] - model.W_U[:, wrong])
        attrs = torch.einsum("cbm,mb->cb", parts, direction)
    expected = logits[:, -1].gather(1, answer[:, None]) - logits[:, -1].gather(1, wrong[:, None])
    torch.testing.assert_close(attrs.sum(0), expected[:, 0], atol=1e-5, rtol=0)


def test_logit_attribution_by_component_sums_to_the_logit_difference(
    model: HookedTransformer,
) -> None:
    with torch.no_grad():
        _, cache = model.run_with_cache(_tokens())
    answer, wrong = torch.tensor([3, 5]), torch.tensor([7, 1])
    attribution = logit_attribution(model, cache, answer, wrong, pos=-2)
    assert attribution.labels == ["embed", "0_mixer_out", "1_mixer_out", "ln_final.b", "b_U"]
    torch.testing.assert_close(attribution.total(), attribution.actual, atol=1e-5, rtol=0)
    for by in ("head", "neuron"):
        with pytest.raises(UnsupportedModelError, match=r"state-space mixer.*by='component'"):
            logit_attribution(model, cache, answer, wrong, by=by)  # type: ignore[arg-type]


@pytest.mark.parametrize("site", ["resid_pre", "mixer_out", "gated"])
def test_activation_patching_of_mixer_layers_equals_one_forward_per_cell(
    model: HookedTransformer, site: str
) -> None:
    result, expected = patched_both_ways(model, _tokens(pos=7, seed=4), 2, site)
    torch.testing.assert_close(result.per_prompt, expected, atol=1e-5, rtol=0)
    if site == "resid_pre":  # the one changed token, restored before any layer reads it
        torch.testing.assert_close(result.per_prompt[:, 0, 2], result.clean, atol=1e-4, rtol=0)


def test_attention_and_neuron_analyses_are_refused_by_name(model: HookedTransformer) -> None:
    with torch.no_grad():
        _, cache = model.run_with_cache(_tokens())
    for ask in (
        lambda: model.W_Q,
        lambda: model.OV,
        lambda: model.W_out,
        lambda: cache.stack_head_results(),
        lambda: cache.stack_neuron_results(),
        lambda: cache.get_full_resid_decomposition(),
        lambda: cache.decompose_resid(layer=1, mlp_input=True),
        lambda: model.process_weights(fold_ln=True),
        lambda: model.to_transformer_lens(),
    ):
        with pytest.raises(UnsupportedModelError, match=r"Mamba|state-space"):
            ask()


def test_incremental_forward_carries_a_constant_size_state(model: HookedTransformer) -> None:
    shapes = state_shapes_after_incremental_run(model, _tokens(pos=14), SSMState)
    assert shapes[0] == ((2, C, 3), (2, C, N))


def test_generation_with_the_state_equals_rerunning_the_prefix(model: HookedTransformer) -> None:
    assert_generation_runs_the_prefix_once(model, _tokens(pos=6))


def test_left_padding_leaves_the_state_at_zero() -> None:
    model = HookedTransformer(_config(), seed=3).eval()  # no input-projection bias at padding
    tokens = _tokens(batch=1, pos=7)
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), tokens], 1)
    mask = torch.cat([torch.zeros(1, 3), torch.ones(1, 7)], 1).long()
    with torch.no_grad():
        alone = model(tokens)
        with_pad = model(padded, attention_mask=mask)
    torch.testing.assert_close(with_pad[:, 3:], alone, atol=1e-5, rtol=0)


def test_trains(model: HookedTransformer) -> None:
    fresh = HookedTransformer(_config(), seed=1)
    loss = fresh(_tokens(), return_type="loss")
    loss.backward()
    mixer = fresh.blocks[0].mixer
    assert all(p.grad is not None for p in (mixer.A_log, mixer.D, mixer.W_conv, mixer.W_dt))


def test_config_round_trips_and_validates() -> None:
    cfg = _config(layers=[1])
    assert TransformerConfig.from_json(cfg.to_json()) == cfg
    assert [cfg.is_ssm_layer(i) for i in range(2)] == [False, True]
    with pytest.raises(ConfigError, match="d_state"):
        _config(d_state=0)
    with pytest.raises(ConfigError, match="ssm layers"):
        _config(layers=[5])
    assert name("ssm_state", 2) == "blocks.2.mixer.hook_ssm_state"
    assert name("mixer_out", 0) == "blocks.0.hook_mixer_out"


@pytest.fixture(scope="module")
def mamba2() -> HookedTransformer:
    cfg = _config(variant="mamba2", n_heads=6, n_groups=2, d_conv=3)  # 4 channels per head
    m = HookedTransformer(cfg, seed=5)
    with torch.no_grad():
        for param in m.parameters():
            param.add_(torch.randn_like(param) * 0.2)
    return m.eval()


def test_mamba2_paths_hooks_and_state_agree(mamba2: HookedTransformer) -> None:
    tokens = _tokens(pos=13)
    hooks = [name("ssm_state", 0), name("A", 0), name("B", 0), name("dt", 0), name("conv", 0)]
    cache_state = KVCache(mamba2.cfg.n_layers)
    with torch.no_grad():
        fast = mamba2(tokens)
        slow, cache = mamba2.run_with_cache(tokens, names_filter=hooks)
        parts = [mamba2(tokens[:, :8], past_kv_cache=cache_state)]
        parts += [mamba2(tokens[:, t : t + 1], past_kv_cache=cache_state) for t in range(8, 13)]
    torch.testing.assert_close(slow, fast, atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.cat(parts, 1), fast, atol=1e-5, rtol=0)
    assert cache[name("ssm_state", 0)].shape == (2, 13, C, N)
    assert cache[name("A", 0)].shape == cache[name("dt", 0)].shape == (2, 13, 6)
    assert cache[name("B", 0)].shape == (2, 13, 2, N)
    assert cache[name("conv", 0)].shape == (2, 13, C + 2 * 2 * N)
    # the carried state is the last position's, channels head by head
    torch.testing.assert_close(
        cache_state.layers[0][1], cache[name("ssm_state", 0)][:, -1], atol=1e-5, rtol=0
    )


def test_mamba2_decomposition_and_config(mamba2: HookedTransformer) -> None:
    with torch.no_grad():
        _, cache = mamba2.run_with_cache(_tokens())
    parts, labels = cache.decompose_resid(return_labels=True)
    assert labels == ["embed", "0_mixer_out", "1_mixer_out"]
    torch.testing.assert_close(parts.sum(0), cache[name("resid_post", 1)], atol=1e-6, rtol=0)
    assert "blocks.0.mixer.norm.hook_scale" in cache
    with pytest.raises(ConfigError, match="n_groups"):
        _config(variant="mamba2", n_heads=6, n_groups=4)
