"""RWKV-4 blocks: the WKV recurrence, hooks, cache, decompositions, patching, generation."""

from __future__ import annotations

import pytest
import torch

from mitk import HookedTransformer, TransformerConfig
from mitk.analysis.dla import logit_attribution
from mitk.config import RWKVConfig
from mitk.errors import ConfigError, UnknownHookError, UnsupportedModelError
from mitk.hooks import name
from mitk.model.kv_cache import KVCache
from mitk.model.rwkv import RWKVState, chunked_wkv, wkv_readout, wkv_states
from mitk.model.rwkv.time_mix import STATES_PATH, WKV_PATH
import mitk.model.rwkv.wkv as wkv_module
from mitk.model.rwkv.wkv import shifted_states
from tests.naive_patching import patched_both_ways
from tests.recurrent_checks import (
    assert_generation_runs_the_prefix_once,
    state_shapes_after_incremental_run,
)

VOCAB = 40
D, C, F = 12, 10, 20  # d_model, d_attn, d_mlp


def _config(**rwkv: object) -> TransformerConfig:
    return TransformerConfig(
        d_model=D, n_layers=2, n_heads=1, d_vocab=VOCAB, n_ctx=1024, d_mlp=F,
        positional="none", embed_norm=True,
        rwkv=RWKVConfig(**{"d_attn": C, **rwkv}),  # type: ignore[arg-type]
    )  # fmt: skip


@pytest.fixture(scope="module")
def model() -> HookedTransformer:
    torch.manual_seed(0)
    m = HookedTransformer(_config(rescale_every=1), seed=3)
    with torch.no_grad():  # larger than the init's, so that every part of the block matters
        for param in m.parameters():
            param.add_(torch.randn_like(param) * 0.3)
    return m.eval()


def _tokens(batch: int = 2, pos: int = 11, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, pos), generator=torch.Generator().manual_seed(seed))


def _reference_wkv(
    k: torch.Tensor, v: torch.Tensor, w: torch.Tensor, u: torch.Tensor
) -> torch.Tensor:
    """The definition, one position at a time: a softmax over the logits ``k_i - (t-1-i) w``
    of earlier positions and ``u + k_t`` of the current one, weighting the values (fp64)."""
    outs = []
    for t in range(k.shape[1]):
        ages = torch.arange(t - 1, -1, -1, dtype=k.dtype)[:, None]  # t-1-i for i < t
        logits = torch.cat([k[:, :t] - ages * w, (u + k[:, t])[:, None]], 1)
        outs.append((logits.softmax(1) * v[:, : t + 1]).sum(1))
    return torch.stack(outs, 1)


@pytest.mark.parametrize("chunk", [1, 3, 8, None])
@pytest.mark.parametrize("block", [5 * C * 2, None])  # blocks of 5 positions, or one block
@pytest.mark.parametrize("scale", [1.0, 300.0])  # 300: e^k overflows fp32 and fp64 alike
def test_chunked_wkv_equals_the_definition(
    chunk: int | None, block: int | None, scale: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    if block is not None:
        monkeypatch.setattr(wkv_module, "BLOCK_ELEMENTS", block)
    gen = torch.Generator().manual_seed(0)
    b, pos = 2, 37
    k = torch.randn(b, pos, C, generator=gen) * scale
    v = torch.randn(b, pos, C, generator=gen)
    w = (torch.randn(C, generator=gen) * 2).exp()  # decays from e^-0.01 to e^-50 per step
    u = torch.randn(C, generator=gen) * scale / 10
    out, last = chunked_wkv(k, v, w, u, chunk=chunk)
    after = wkv_states(k, v, w, chunk=chunk)
    from_states = wkv_readout(shifted_states(after, None), k, v, u)
    expected = _reference_wkv(*(t.double() for t in (k, v, w, u)))
    assert bool(torch.isfinite(out).all())
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(from_states.double(), expected, atol=1e-5, rtol=1e-5)
    for part, last_part in zip(after, last, strict=True):  # the same last state both ways
        torch.testing.assert_close(part[:, -1], last_part, atol=1e-5, rtol=1e-5)


def test_a_carried_state_continues_the_recurrence() -> None:
    gen = torch.Generator().manual_seed(1)
    k, v = torch.randn(2, 20, C, generator=gen) * 5, torch.randn(2, 20, C, generator=gen)
    w, u = torch.rand(C, generator=gen) * 3, torch.randn(C, generator=gen)
    full, _ = chunked_wkv(k, v, w, u)
    _, carried = chunked_wkv(k[:, :7], v[:, :7], w, u, chunk=3)
    rest, _ = chunked_wkv(k[:, 7:], v[:, 7:], w, u, carried, chunk=4)
    torch.testing.assert_close(rest, full[:, 7:], atol=1e-5, rtol=1e-5)
    after = wkv_states(k[:, 7:], v[:, 7:], w, carried, chunk=5)
    from_states = wkv_readout(shifted_states(after, carried), k[:, 7:], v[:, 7:], u)
    torch.testing.assert_close(from_states, full[:, 7:], atol=1e-5, rtol=1e-5)


def test_every_hook_fires_with_its_shape(model: HookedTransformer) -> None:
    with torch.no_grad():
        _, cache = model.run_with_cache(_tokens())
    shapes = {
        "blocks.{}.mixer.hook_shifted": (2, 11, D), "blocks.{}.mixer.hook_r": (2, 11, C),
        "blocks.{}.mixer.hook_k": (2, 11, C), "blocks.{}.mixer.hook_v": (2, 11, C),
        "blocks.{}.mixer.hook_wkv": (2, 11, C), "blocks.{}.mixer.hook_gated": (2, 11, C),
        "blocks.{}.hook_mixer_out": (2, 11, D), "blocks.{}.hook_resid_mid": (2, 11, D),
        "blocks.{}.mlp.hook_shifted": (2, 11, D), "blocks.{}.mlp.hook_pre": (2, 11, F),
        "blocks.{}.mlp.hook_post": (2, 11, F), "blocks.{}.mlp.hook_r": (2, 11, D),
        "blocks.{}.hook_mlp_out": (2, 11, D), "blocks.{}.ln2.hook_scale": (2, 11, 1),
    }  # fmt: skip
    for layer in range(2):
        for hook, shape in shapes.items():
            assert cache[hook.format(layer)].shape == shape, hook
        # derived: built only when asked by name, never by a cache of everything
        assert name("wkv_state", layer) not in cache
    # the shift: each position sees the previous one's input, zeros before the first
    shifted, normed = cache["blocks.1.mixer.hook_shifted"], cache["blocks.1.ln1.hook_normalized"]
    ln1 = model.blocks[1].ln1
    torch.testing.assert_close(shifted[:, 1:], (normed * ln1.w + ln1.b)[:, :-1])
    assert bool((shifted[:, 0] == 0).all())
    post, pre = cache["blocks.0.mlp.hook_post"], cache["blocks.0.mlp.hook_pre"]
    torch.testing.assert_close(post, pre.relu() ** 2)
    assert model.attention_paths() == [WKV_PATH, WKV_PATH]


def test_the_state_hook_holds_what_the_cache_carries(model: HookedTransformer) -> None:
    tokens = _tokens()
    kv = KVCache(model.cfg.n_layers)
    with torch.no_grad():
        plain = model(tokens)
        hooked, cache = model.run_with_cache(tokens, names_filter=name("wkv_state", 1))
        assert model.attention_paths() == [WKV_PATH, STATES_PATH]
        model(tokens, past_kv_cache=kv)
    torch.testing.assert_close(hooked, plain, atol=1e-5, rtol=0)
    states = cache[name("wkv_state", 1)]
    assert states.shape == (2, 11, C, 3)
    assert isinstance(kv.layers[1], RWKVState)
    torch.testing.assert_close(kv.layers[1].wkv, states[:, -1])


def test_unknown_hook_names_raise_with_suggestions(model: HookedTransformer) -> None:
    with pytest.raises(UnknownHookError, match="hook_wkv_state"):
        model.run_with_cache(_tokens(), names_filter=["blocks.0.mixer.hook_wkv_stat"])
    with pytest.raises(UnknownHookError):
        model.run_with_hooks(_tokens(), fwd_hooks=[("blocks.0.attn.hook_pattern", print)])


@pytest.mark.parametrize(
    "hook",
    ["mixer.hook_shifted", "mixer.hook_r", "mixer.hook_k", "mixer.hook_v", "mixer.hook_wkv_state",
     "mixer.hook_wkv", "mixer.hook_gated", "hook_mixer_out", "hook_resid_mid",
     "mlp.hook_shifted", "mlp.hook_pre", "mlp.hook_post", "mlp.hook_r", "hook_mlp_out"],
)  # fmt: skip
def test_replacing_a_hook_changes_the_output(model: HookedTransformer, hook: str) -> None:
    tokens = _tokens()
    with torch.no_grad():
        clean = model(tokens)
        out = model.run_with_hooks(
            tokens, fwd_hooks=[(f"blocks.0.{hook}", lambda act, hook: act * 0.5)]
        )
    assert not torch.allclose(out, clean, atol=1e-4), hook


def test_residual_decomposition_sums_to_the_final_stream(model: HookedTransformer) -> None:
    with torch.no_grad():
        _, cache = model.run_with_cache(_tokens())
    parts, labels = cache.decompose_resid(return_labels=True)
    assert labels == ["embed", "0_mixer_out", "0_mlp_out", "1_mixer_out", "1_mlp_out"]
    torch.testing.assert_close(parts.sum(0), cache[name("resid_post", 1)], atol=1e-5, rtol=0)
    # the stream channel mixing reads: the embeddings and the layer's time mixing
    parts, labels = cache.decompose_resid(layer=1, mlp_input=True, return_labels=True)
    assert labels == ["embed", "0_mixer_out", "0_mlp_out", "1_mixer_out"]
    torch.testing.assert_close(parts.sum(0), cache[name("resid_mid", 1)], atol=1e-5, rtol=0)
    _, acc_labels = cache.accumulated_resid(incl_mid=True, return_labels=True)
    assert acc_labels == ["0_pre", "0_mid", "1_pre", "1_mid", "final_post"]


def test_logit_attribution_by_component_sums_to_the_logit_difference(
    model: HookedTransformer,
) -> None:
    tokens = _tokens()
    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens)
    answer, wrong = torch.tensor([3, 5]), torch.tensor([7, 1])
    attribution = logit_attribution(model, cache, answer, wrong, pos=-2)
    assert attribution.labels == [
        "embed", "0_mixer_out", "0_mlp_out", "1_mixer_out", "1_mlp_out", "ln_final.b", "b_U",
    ]  # fmt: skip
    expected = logits[:, -2].gather(1, answer[:, None]) - logits[:, -2].gather(1, wrong[:, None])
    torch.testing.assert_close(attribution.actual, expected[:, 0], atol=1e-5, rtol=0)
    torch.testing.assert_close(attribution.total(), attribution.actual, atol=1e-5, rtol=0)
    for by in ("head", "neuron"):
        with pytest.raises(UnsupportedModelError, match=r"RWKV mixer.*by='component'"):
            logit_attribution(model, cache, answer, wrong, by=by)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "site", ["resid_pre", "resid_mid", "mixer_out", "gated", "wkv", "mlp_out", "post"]
)
def test_activation_patching_equals_one_forward_per_cell(
    model: HookedTransformer, site: str
) -> None:
    result, expected = patched_both_ways(model, _tokens(pos=7, seed=4), 2, site)
    assert result.per_prompt.abs().max() > 0
    torch.testing.assert_close(result.per_prompt, expected, atol=1e-5, rtol=0)


def test_attention_and_neuron_analyses_are_refused_by_name(model: HookedTransformer) -> None:
    with torch.no_grad():
        _, cache = model.run_with_cache(_tokens())
    for ask in (
        lambda: model.blocks[0].attn,
        lambda: model.W_Q,
        lambda: model.OV,
        lambda: model.QK,
        lambda: cache.stack_head_results(),
        lambda: cache.stack_neuron_results(),
        lambda: cache.get_full_resid_decomposition(),
        lambda: model.process_weights(fold_ln=True),
        lambda: model.to_transformer_lens(),
    ):
        with pytest.raises(UnsupportedModelError, match="RWKV"):
            ask()


def test_incremental_forward_carries_a_constant_size_state(model: HookedTransformer) -> None:
    shapes = state_shapes_after_incremental_run(model, _tokens(pos=14), RWKVState)
    assert shapes[0] == ((2, 2, D), (2, C, 3))


def test_generation_with_the_state_equals_rerunning_the_prefix(model: HookedTransformer) -> None:
    assert_generation_runs_the_prefix_once(model, _tokens(pos=6))


def test_left_padding_reads_as_the_prompt_alone(model: HookedTransformer) -> None:
    tokens = _tokens(batch=1, pos=7)
    padded = torch.cat([torch.full((1, 3), 9), tokens], 1)
    mask = torch.cat([torch.zeros(1, 3), torch.ones(1, 7)], 1).long()
    with torch.no_grad():
        alone = model(tokens)
        with_pad = model(padded, attention_mask=mask)
    torch.testing.assert_close(with_pad[:, 3:], alone, atol=1e-5, rtol=0)
    assert bool(torch.isfinite(with_pad).all())


def test_trains() -> None:
    fresh = HookedTransformer(_config(), seed=1)
    loss = fresh(_tokens(), return_type="loss")
    loss.backward()
    mixer, mlp = fresh.blocks[0].mixer, fresh.blocks[0].mlp
    params = (mixer.time_decay, mixer.time_first, mixer.mix_k, mixer.W_r, mlp.mix_r, mlp.W_in)
    assert all(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in params)


def test_config_round_trips_and_validates() -> None:
    cfg = _config(rescale_every=2)
    assert TransformerConfig.from_json(cfg.to_json()) == cfg
    assert cfg.has_mixer(0) and not cfg.is_ssm_layer(0)
    assert [cfg.rwkv.norm_eps(1.0, layer) for layer in range(5)] == [1, 1, 4, 4, 16]  # type: ignore[union-attr]
    with pytest.raises(ConfigError, match="d_attn"):
        _config(d_attn=0)
    with pytest.raises(ConfigError, match="rescale_every"):
        _config(rescale_every=-1)
    with pytest.raises(ConfigError, match="positional='learned'"):
        TransformerConfig(d_model=D, n_layers=1, n_heads=1, d_vocab=VOCAB, n_ctx=8,
                          rwkv=RWKVConfig(d_attn=C))  # fmt: skip
    assert name("wkv_state", 2) == "blocks.2.mixer.hook_wkv_state"


def test_left_padded_generation_equals_each_prompt_alone(model: HookedTransformer) -> None:
    short, long = _tokens(batch=1, pos=4, seed=5), _tokens(batch=1, pos=7, seed=6)
    batch = torch.cat([torch.cat([torch.zeros(1, 3, dtype=torch.long), short], 1), long])
    mask = torch.ones_like(batch)
    mask[0, :3] = 0
    greedy = {"do_sample": False, "stop_at_eos": False, "verbose": False}
    together = model.generate(batch, 6, attention_mask=mask, **greedy)
    for row, prompt in enumerate((short, long)):
        alone = model.generate(prompt, 6, **greedy)
        assert together[row, -6:].tolist() == alone[0, -6:].tolist()
