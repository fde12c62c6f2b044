"""Kernel linear attention: the defining formula, both forms, generation with the state, padding."""

from __future__ import annotations

import copy
from dataclasses import replace
import itertools
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mitk import HookedTransformer, TransformerConfig
from mitk.errors import ConfigError, UnsupportedModelError
from mitk.model.kv_cache import KVCache
from mitk.model.linear_attention import RECURRENT, LinearAttentionState, recurrent_form
from mitk.sequences import periodic_segments
from mitk.train import TrainConfig, train_language_model
from tests.naive_patching import patched_both_ways

CFG = TransformerConfig(
    d_model=32,
    n_layers=2,
    n_heads=4,
    n_key_value_heads=2,
    d_vocab=50,
    n_ctx=160,
    d_mlp=64,
    attention_type="linear",
    positional="learned",
)


PERFORMER = replace(CFG, attention_type="performer", performer_features=48)


@pytest.fixture(scope="module")
def model() -> HookedTransformer:
    return HookedTransformer(CFG, seed=0).eval()


@pytest.fixture(scope="module", params=["linear", "performer"])
def either(request: pytest.FixtureRequest) -> HookedTransformer:
    """A linear-attention model, then a Performer: what holds for both forms of both."""
    return HookedTransformer(CFG if request.param == "linear" else PERFORMER, seed=0).eval()


def _tokens(batch: int = 2, pos: int = 150, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, CFG.d_vocab, (batch, pos), generator=gen)


def _slow_linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The definition, one query at a time: ``[batch, pos, head, d]`` in and out (GQA by index)."""
    group = q.shape[2] // k.shape[2]
    out = torch.zeros(*q.shape[:3], v.shape[-1], dtype=torch.float64)
    fq, fk = (F.elu(t.double()) + 1 for t in (q, k))
    for head in range(q.shape[2]):
        kv = head // group
        for t in range(q.shape[1]):
            weights = fk[:, : t + 1, kv] @ fq[:, t, head, :, None]  # [batch, t + 1, 1]
            out[:, t, head] = (weights * v[:, : t + 1, kv].double()).sum(1) / weights.sum(1)
    return out


def test_recurrent_form_matches_the_definition_through_the_hooks(model: HookedTransformer) -> None:
    tokens = _tokens()  # 150 positions: three chunks of the recurrent form, the last partial
    wanted = {f"blocks.1.attn.hook_{name}" for name in "qkvz"}
    _, cache = model.run_with_cache(tokens, names_filter=lambda name: name in wanted)
    assert model.attention_paths() == [RECURRENT, RECURRENT]
    q, k, v = (cache[f"blocks.1.attn.hook_{name}"] for name in "qkv")
    expected = _slow_linear_attention(q, k, v)
    assert torch.allclose(cache["blocks.1.attn.hook_z"].double(), expected, atol=1e-5)


def test_explicit_and_recurrent_forms_agree_and_the_pattern_is_normalised(
    either: HookedTransformer,
) -> None:
    model = either
    tokens = _tokens()
    recurrent = model(tokens)
    patterns: dict[str, torch.Tensor] = {}

    def keep(pattern: torch.Tensor, hook: object) -> None:
        patterns[getattr(hook, "name", "")] = pattern.detach()

    explicit = model.run_with_hooks(tokens, fwd_hooks=[("blocks.0.attn.hook_pattern", keep)])
    paths = model.attention_paths()
    assert paths[0].startswith("eager") and paths[1] == RECURRENT
    assert torch.allclose(recurrent, explicit, atol=1e-5)
    pattern = patterns["blocks.0.attn.hook_pattern"]
    assert pattern.shape == (2, CFG.n_heads, 150, 150)
    assert torch.allclose(pattern.sum(-1), torch.ones(2, CFG.n_heads, 150), atol=1e-5)
    visible = torch.ones(150, 150, dtype=torch.bool).tril()
    assert (pattern[..., ~visible] == 0).all() and (pattern[..., visible] > 0).all()  # phi > 0
    eager = HookedTransformer(replace(model.cfg, attention_backend="eager"), seed=0).eval()
    assert torch.allclose(eager(tokens), recurrent, atol=1e-5)


@pytest.mark.parametrize("chunk", [1, 7, 64, 200])
def test_chunk_size_does_not_change_the_result(chunk: int) -> None:
    gen = torch.Generator().manual_seed(1)
    fq, fk = torch.rand(2, 2, 3, 40, 8, generator=gen), torch.rand(2, 2, 40, 8, generator=gen)
    v = torch.randn(2, 2, 40, 5, generator=gen)
    state = LinearAttentionState(torch.zeros(2, 2, 8, 5), torch.zeros(2, 2, 8))
    reference, last = recurrent_form(fq, fk, v, state, chunk=40)
    out, after = recurrent_form(fq, fk, v, state, chunk=chunk)
    assert torch.allclose(out, reference, atol=1e-5)
    assert torch.allclose(after.kv, last.kv, atol=1e-4) and torch.allclose(after.k_sum, last.k_sum)


def test_incremental_forward_carries_a_constant_size_state(either: HookedTransformer) -> None:
    model = either
    tokens = _tokens(pos=40)
    full = model(tokens)
    cache = KVCache(CFG.n_layers)
    steps = [model(tokens[:, :25], past_kv_cache=cache)]
    shapes = [tuple(cache.layers[0].kv.shape)]
    for t in range(25, 40):
        steps.append(model(tokens[:, t : t + 1], past_kv_cache=cache))
        shapes.append(tuple(cache.layers[0].kv.shape))
    assert isinstance(cache.layers[1], LinearAttentionState) and cache.length == 40
    assert len(set(shapes)) == 1  # [batch, kv_head, d_head, d_head] at every length
    assert cache.entries == []  # no keys or values are kept
    assert torch.allclose(torch.cat(steps, dim=1), full, atol=1e-5)


def test_generation_with_the_state_equals_rerunning_the_prefix(
    either: HookedTransformer,
) -> None:
    model = either
    prompt = _tokens(batch=1, pos=12)
    cached = model.generate(prompt, max_new_tokens=10, do_sample=False, use_past_kv_cache=True,
                            stop_at_eos=False)  # fmt: skip
    rerun = model.generate(prompt, max_new_tokens=10, do_sample=False, use_past_kv_cache=False,
                           stop_at_eos=False)  # fmt: skip
    assert torch.equal(cached, rerun)


def test_left_padding_changes_nothing_for_the_real_tokens() -> None:
    short = _tokens(batch=1, pos=9, seed=3)
    padded = torch.cat([torch.zeros(1, 4, dtype=torch.long), short], dim=1)
    mask = torch.cat([torch.zeros(1, 4), torch.ones(1, 9)], dim=1).long()
    for backend in ("auto", "eager"):
        net = HookedTransformer(replace(CFG, attention_backend=backend), seed=0).eval()
        logits = net(padded, attention_mask=mask)
        assert torch.isfinite(logits).all()
        assert torch.allclose(logits[:, 4:], net(short), atol=1e-5), backend


@pytest.mark.parametrize("site", ["resid_pre", "attn_out", "z"])
def test_activation_patching_replays_from_the_start_and_equals_one_forward_per_cell(
    model: HookedTransformer, site: str
) -> None:
    result, expected = patched_both_ways(model, _tokens(pos=9, seed=5), 3, site)
    torch.testing.assert_close(result.per_prompt, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["linear", "performer"])
def test_trains_on_copying(kind: str) -> None:
    model = HookedTransformer(replace(CFG, n_ctx=48, d_vocab=20, attention_type=kind), seed=0)
    history = train_language_model(
        model,
        lambda step: periodic_segments(16, 48, 20, torch.Generator().manual_seed(step), 4, 8),
        TrainConfig(steps=120, lr=3e-3, warmup=10, log_every=20),
        progress=False,
    )
    assert history[-1]["loss"] < history[0]["loss"] - 0.3  # from uniform (ln 19) down


def _causal_softmax_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    scores = (q @ k.transpose(-1, -2)) / q.shape[-1] ** 0.5
    causal = torch.ones(q.shape[-2], q.shape[-2], dtype=torch.bool).tril()
    return torch.softmax(scores.masked_fill(~causal, float("-inf")), -1) @ v


def test_performer_error_against_softmax_attention_shrinks_with_more_features() -> None:
    gen = torch.Generator().manual_seed(0)
    # moderate norms, as trained queries and keys have: the estimator's variance grows as
    # exp(|q + k|^2 scale), and at unit-variance entries of width 16 it converges slowly
    q, k = (torch.randn(4, 1, 64, 16, generator=gen) * 0.5 for _ in range(2))
    v = torch.randn(4, 1, 64, 16, generator=gen)
    exact = _causal_softmax_attention(q, k, v)
    errors = []
    for count in (8, 32, 128, 512):
        per_seed = []
        for seed in range(4):
            cfg = replace(PERFORMER, d_model=16, d_head=16, n_heads=1, n_key_value_heads=1,
                          performer_features=count, performer_seed=seed)  # fmt: skip
            attn = HookedTransformer(cfg, seed=0).blocks[0].attn
            fq = attn.features(q.transpose(1, 2), queries=True).transpose(1, 2)[:, :, None]
            fk = attn.features(k.transpose(1, 2), queries=False).transpose(1, 2)
            empty = LinearAttentionState(torch.zeros(4, 1, count, 16), torch.zeros(4, 1, count))
            approx, _ = recurrent_form(fq, fk, v, empty)
            per_seed.append((approx[:, :, 0] - exact).abs().mean().item())
        errors.append(sum(per_seed) / len(per_seed))
    assert all(a > b for a, b in itertools.pairwise(errors)), errors
    # 64x the features: 1/sqrt(m) predicts 8x less error; the ratio of two estimates
    # (numerator over normaliser) converges more slowly at small m: measured 3.8x
    assert errors[-1] < errors[0] / 3, errors


def test_performer_features_are_fixed_per_seed_and_saved(tmp_path: Path) -> None:
    first, again = (HookedTransformer(PERFORMER, seed=s).blocks[1].attn for s in (0, 1))
    assert torch.equal(first.W_features, again.W_features)  # the performer seed, not the init's
    other = HookedTransformer(replace(PERFORMER, performer_seed=1), seed=0).blocks[1].attn
    assert not torch.equal(first.W_features, other.W_features)
    model = HookedTransformer(PERFORMER, seed=0)
    tokens = _tokens(pos=20)
    loaded = HookedTransformer.from_pretrained(model.save(tmp_path / "performer"))
    assert torch.allclose(loaded(tokens), model(tokens), atol=1e-6)


@pytest.mark.parametrize(
    "change",
    [
        {"positional": "rotary"},
        {"positional": "alibi"},
        {"causal": False},
        {"sliding_window": 8},
        {"attn_softcap": 30.0},
        {"attention_type": "performer", "performer_features": 0},
    ],
)
def test_what_linear_attention_does_not_combine_with_is_refused(change: dict) -> None:
    with pytest.raises(ConfigError, match=r"attention_type='(linear|performer)'"):
        replace(CFG, **change)


def test_weight_processing_keeps_the_output_or_is_refused(either: HookedTransformer) -> None:
    tokens = _tokens(pos=20)
    processed = copy.deepcopy(either)
    processed.process_weights(fold_ln=True, center_writing_weights=True, fold_value_biases=True)
    assert torch.allclose(
        processed(tokens).log_softmax(-1), either(tokens).log_softmax(-1), atol=1e-5
    )
    with pytest.raises(UnsupportedModelError, match="feature maps of q and k"):
        copy.deepcopy(either).process_weights(refactor_factored_attn_matrices=True)


def test_config_round_trips() -> None:
    assert TransformerConfig.from_dict(CFG.to_dict()) == CFG


def test_export_to_transformer_lens_is_refused_by_name(either: HookedTransformer) -> None:
    pytest.importorskip("transformer_lens")
    with pytest.raises(UnsupportedModelError, match=r"attention_type=.*softmax"):
        either.to_transformer_lens()


def test_qk_is_refused_and_ov_is_kept(either: HookedTransformer) -> None:
    with pytest.raises(UnsupportedModelError, match=r"QK: attention_type=.*phi\(q\)"):
        either.QK  # noqa: B018
    # a head still writes pattern @ x @ OV (z = pattern @ v), so OV keeps its meaning
    assert either.OV.shape == (CFG.n_layers, CFG.n_heads, CFG.d_model, CFG.d_model)
