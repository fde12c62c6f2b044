"""Rotary embeddings: the rotation's properties, hooks, padding, ``past_kv`` positions, scaling."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
import pytest
import torch

from mitk import HookedTransformer, TransformerConfig
from mitk.analysis.patching import activation_patch, logit_diff
from mitk.config import RotaryScaling
from mitk.errors import ConfigError
from mitk.model.rotary import (
    apply_rotary,
    cache_outlives_short_factors,
    inverse_frequencies,
    rotary_angles,
)
from tests.unit.test_patching import last_position_logit_diff, naive

STYLES = ["neox", "gptj"]


def _heads(seed: int, pos: int = 6, d_head: int = 8) -> torch.Tensor:
    return torch.randn(1, pos, 2, d_head, generator=torch.Generator().manual_seed(seed))


def _rotate(x: torch.Tensor, positions: torch.Tensor, style: str, rotary_dim: int = 8):
    return apply_rotary(x, rotary_angles(positions, rotary_dim, 10000.0), style)  # type: ignore[arg-type]


@pytest.mark.parametrize("style", STYLES)
def test_rotation_preserves_norms(style: str) -> None:
    x = _heads(0)
    rotated = _rotate(x, torch.arange(6)[None] * 7, style)
    torch.testing.assert_close(rotated.norm(dim=-1), x.norm(dim=-1))
    assert not torch.allclose(rotated[:, 1:], x[:, 1:])  # position 0 is the identity, others turn
    torch.testing.assert_close(rotated[:, 0], x[:, 0])


@pytest.mark.parametrize("style", STYLES)
def test_scores_depend_only_on_relative_position(style: str) -> None:
    q, k = _heads(1, pos=1), _heads(2, pos=1)

    def score(m: int, n: int) -> torch.Tensor:
        q_m = _rotate(q, torch.tensor([[m]]), style)
        k_n = _rotate(k, torch.tensor([[n]]), style)
        return (q_m * k_n).sum(-1)

    torch.testing.assert_close(score(5, 2), score(13, 10), atol=1e-5, rtol=0)
    torch.testing.assert_close(score(0, 0), score(40, 40), atol=1e-5, rtol=0)
    assert not torch.allclose(score(5, 2), score(5, 3))


@pytest.mark.parametrize("style", STYLES)
def test_partial_rotary_leaves_the_other_dimensions_alone(style: str) -> None:
    x = _heads(3, d_head=12)
    rotated = _rotate(x, torch.arange(6)[None], style, rotary_dim=4)
    torch.testing.assert_close(rotated[..., 4:], x[..., 4:], atol=0, rtol=0)
    assert not torch.allclose(rotated[:, 1:, :, :4], x[:, 1:, :, :4])


def test_styles_pair_different_dimensions() -> None:
    x = torch.zeros(1, 2, 1, 4)
    x[..., 0] = 1.0  # a unit vector in dimension 0 rotates towards its partner
    angle = rotary_angles(torch.tensor([[0, 1]]), 4, 10000.0)[0, 1, 0]
    neox = apply_rotary(x, rotary_angles(torch.tensor([[0, 1]]), 4, 10000.0), "neox")
    gptj = apply_rotary(x, rotary_angles(torch.tensor([[0, 1]]), 4, 10000.0), "gptj")
    torch.testing.assert_close(
        neox[0, 1, 0], torch.stack([angle.cos(), 0 * angle, angle.sin(), 0 * angle])
    )
    torch.testing.assert_close(
        gptj[0, 1, 0], torch.stack([angle.cos(), angle.sin(), 0 * angle, 0 * angle])
    )


def _rotary_model(style: str = "neox", **kw: object) -> HookedTransformer:
    shape = {
        "d_model": 32,
        "n_layers": 2,
        "n_heads": 4,
        "n_key_value_heads": 2,
        "d_vocab": 40,
        "n_ctx": 16,
        "positional": "rotary",
        "rotary_dim": 6,
        "rotary_style": style,
    }
    cfg = TransformerConfig(**{**shape, **kw})  # type: ignore[arg-type]  # fmt: skip
    return HookedTransformer(cfg, seed=7)


def test_rot_hooks_fire_after_rotation_and_only_on_rotary_models() -> None:
    model = _rotary_model()
    tokens = torch.randint(0, 40, (2, 9), generator=torch.Generator().manual_seed(0))
    names = [f"blocks.1.attn.hook_{kind}" for kind in ("q", "k", "rot_q", "rot_k")]
    _, cache = model.run_with_cache(tokens, names_filter=names)
    assert cache["blocks.1.attn.hook_rot_k"].shape == (2, 9, 2, 8)  # kv heads kept
    angles = rotary_angles(torch.arange(9)[None], 6, 10000.0)
    expected = apply_rotary(cache["blocks.1.attn.hook_q"], angles, "neox")
    torch.testing.assert_close(cache["blocks.1.attn.hook_rot_q"], expected)
    learned = HookedTransformer(
        TransformerConfig(d_model=32, n_layers=1, n_heads=4, d_vocab=40, n_ctx=16)
    )
    assert "blocks.0.attn.hook_rot_q" not in learned.hook_dict
    assert "blocks.0.attn.hook_rot_q" in model.hook_dict


@pytest.mark.parametrize("style", STYLES)
def test_left_padding_gives_each_row_its_unpadded_outputs(style: str) -> None:
    model = _rotary_model(style)
    tokens = torch.randint(1, 40, (2, 8), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(tokens)
    mask[0, :3] = 0
    with torch.no_grad():
        batch = model(tokens, attention_mask=mask)
        alone = model(tokens[:1, 3:])
    torch.testing.assert_close(batch[0, 3:], alone[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("padded", [False, True])
def test_past_kv_rotates_new_positions_by_their_absolute_position(padded: bool) -> None:
    model = _rotary_model()
    tokens = torch.randint(1, 40, (2, 10), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(tokens)
    if padded:
        mask[1, :2] = 0
    start = 6
    names = ["blocks.1.hook_resid_pre", "blocks.1.hook_resid_post", "blocks.1.attn.hook_rot_k",
             "blocks.1.attn.hook_v"]  # fmt: skip
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, attention_mask=mask, names_filter=names)
        past = (cache["blocks.1.attn.hook_rot_k"][:, :start].transpose(1, 2),
                cache["blocks.1.attn.hook_v"][:, :start].transpose(1, 2))  # fmt: skip
        key_valid = mask.bool() if padded else None
        ctx = model.forward_context(10 - start, key_valid, start=1, stop=2, past={1: past})
        out = model.run_blocks(cache["blocks.1.hook_resid_pre"][:, start:], ctx)
    torch.testing.assert_close(out, cache["blocks.1.hook_resid_post"][:, start:], atol=1e-5, rtol=0)


@pytest.mark.parametrize("site", ["resid_pre", "k", "z"])
def test_activation_patching_on_a_rotary_model_equals_the_naive_loop(site: str) -> None:
    model = _rotary_model()
    clean = torch.randint(0, 40, (2, 7), generator=torch.Generator().manual_seed(0))
    corrupted = clean.clone()
    corrupted[:, 2] = (clean[:, 2] + 5) % 40
    result = activation_patch(model, clean, corrupted, logit_diff(3, 8), site, "pos")
    expected = naive(model, clean, corrupted, last_position_logit_diff, site, "pos")
    torch.testing.assert_close(
        result.per_prompt.reshape(expected.shape), expected, atol=1e-5, rtol=0
    )


@settings(max_examples=40, deadline=None)
@given(
    kind=st.sampled_from(["linear", "dynamic", "yarn", "llama3"]),
    half=st.integers(2, 32),
    base=st.sampled_from([500.0, 10000.0, 500000.0]),
    factor=st.floats(1.0, 32.0),
    context=st.integers(4, 4096),
    seq_len=st.integers(1, 9000),
    betas=st.sampled_from([(32.0, 1.0), (8.0, 2.0)]),
)
def test_scaled_frequencies_match_hugging_face(
    kind: str, half: int, base: float, factor: float, context: int, seq_len: int,
    betas: tuple[float, float],
) -> None:  # fmt: skip
    """The frequency ladder (and YaRN's cos/sin factor) equals transformers' for the same params."""
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from mitk.model.pretrained.rope import rope_fields

    params: dict = {"rope_type": kind, "factor": factor, "rope_theta": base}
    if kind == "llama3":
        params |= {"low_freq_factor": 1.0, "high_freq_factor": 4.0}
    if kind == "yarn":
        params |= {"beta_fast": betas[0], "beta_slow": betas[1]}
    if kind in ("llama3", "yarn"):
        params["original_max_position_embeddings"] = context
    # dynamic NTK reads max_position_embeddings itself; the others a longer window
    n_ctx = context if kind == "dynamic" else 4 * context
    hf = LlamaConfig(hidden_size=2 * half, num_attention_heads=1, head_dim=2 * half,
                     max_position_embeddings=n_ctx, rope_parameters=dict(params))  # fmt: skip
    expected, attention_factor = ROPE_INIT_FUNCTIONS[kind](hf, None, seq_len=seq_len)
    fields = rope_fields({"model_type": "llama", **hf.to_dict()}, 2 * half, scaled=True)
    scaling = fields["rotary_scaling"]
    ours = inverse_frequencies(2 * half, fields["rotary_base"], scaling, seq_len)
    torch.testing.assert_close(ours, expected.float(), rtol=1e-5, atol=0)
    assert scaling.attention_factor == pytest.approx(attention_factor)


def test_dynamic_scaling_reads_the_longest_position() -> None:
    """Past the original context the ladder stretches; within it, it is the plain one."""
    scaling = RotaryScaling(kind="dynamic", factor=4.0, original_context=8)
    short = rotary_angles(torch.arange(8)[None], 8, 10000.0, scaling)
    torch.testing.assert_close(short, rotary_angles(torch.arange(8)[None], 8, 10000.0))
    long = rotary_angles(torch.arange(12)[None], 8, 10000.0, scaling)
    assert not torch.allclose(long[:, :8], short)  # the same positions turn more slowly
    # a cached step at position 11 alone uses the ladder of the 12-long sequence
    torch.testing.assert_close(
        rotary_angles(torch.tensor([[11]]), 8, 10000.0, scaling), long[:, 11:]
    )


def test_scale_multiplies_the_rotated_dimensions_only() -> None:
    x = _heads(3, d_head=8)
    angles = rotary_angles(torch.arange(6)[None], 4, 10000.0)
    scaled = apply_rotary(x, angles, "neox", scale=1.5)
    plain = apply_rotary(x, angles, "neox")
    torch.testing.assert_close(scaled[..., :4], 1.5 * plain[..., :4])
    torch.testing.assert_close(scaled[..., 4:], x[..., 4:])


def test_each_distinct_ladder_is_built_once_per_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    """Local and global layers (Gemma 3) share one angle table per ladder; NoPE layers none."""
    import mitk.model.attention as attention

    built: list[tuple[float, RotaryScaling | None]] = []

    def counting(positions: torch.Tensor, dim: int, base: float, scaling=None) -> torch.Tensor:  # type: ignore[no-untyped-def]
        built.append((base, scaling))
        return rotary_angles(positions, dim, base, scaling)

    monkeypatch.setattr(attention, "rotary_angles", counting)
    linear = RotaryScaling(kind="linear", factor=8.0)
    model = _rotary_model(n_layers=5, rotary_scaling=linear, rotary_local_layers=[0, 1, 3],
                          rotary_local_base=100.0, no_rotary_layers=[4])  # fmt: skip
    tokens = torch.randint(0, 40, (2, 9), generator=torch.Generator().manual_seed(0))
    model(tokens)
    assert sorted(built, key=lambda b: b[0]) == [(100.0, None), (10000.0, linear)]


def test_layers_rotate_by_their_own_base_or_not_at_all() -> None:
    """``hook_rot_q`` on a local layer uses the local base; on a NoPE layer it is ``hook_q``."""
    model = _rotary_model(n_layers=3, rotary_local_layers=[1], rotary_local_base=100.0,
                          no_rotary_layers=[2])  # fmt: skip
    tokens = torch.randint(0, 40, (2, 9), generator=torch.Generator().manual_seed(0))
    _, cache = model.run_with_cache(tokens, names_filter=lambda n: "hook_q" in n or "rot_q" in n)
    positions = torch.arange(9)[None]
    for layer, base in ((0, 10000.0), (1, 100.0)):
        angles = rotary_angles(positions, 6, base)
        expected = apply_rotary(cache[f"blocks.{layer}.attn.hook_q"], angles, "neox")
        torch.testing.assert_close(cache[f"blocks.{layer}.attn.hook_rot_q"], expected)
    torch.testing.assert_close(cache["blocks.2.attn.hook_rot_q"], cache["blocks.2.attn.hook_q"])


def _longrope(half: int, original: int = 8, **kw: object) -> RotaryScaling:
    short = [1.0 + 0.25 * i for i in range(half)]
    long = [2.0 + 0.5 * ((3 * i) % half) for i in range(half)]
    fields = {"kind": "longrope", "factor": 4.0, "original_context": original,
              "attention_factor": 1.2, "short_factor": short, "long_factor": long,
              **kw}  # fmt: skip
    return RotaryScaling(**fields)  # type: ignore[arg-type]


def _longrope_oracle(half: int, base: float, factors: list[float]) -> list[float]:
    """LongRoPE from its formula, pair by pair: ``1 / (factor_i * base^(2i / rotary_dim))``."""
    return [1.0 / (factors[i] * base ** (2 * i / (2 * half))) for i in range(half)]


@pytest.mark.parametrize("seq_len", [0, 1, 8, 9, 100])
def test_longrope_frequencies_follow_the_formula(seq_len: int) -> None:
    """Short factors up to the original context (8), long ones past it."""
    scaling = _longrope(6)
    factors = scaling.long_factor if seq_len > 8 else scaling.short_factor
    assert factors is not None
    expected = torch.tensor(_longrope_oracle(6, 500.0, factors))
    ours = inverse_frequencies(12, 500.0, scaling, seq_len)
    torch.testing.assert_close(ours, expected, rtol=1e-6, atol=0)


def test_longrope_angles_take_one_factor_set_per_pass() -> None:
    """A pass within the original context rotates by the short set; a longer one (or a cached
    step past it) rotates every position by the long set, on the device (no host sync)."""
    scaling = _longrope(4)
    positions = torch.arange(12)[None]
    within = rotary_angles(positions[:, :8], 8, 10000.0, scaling)
    past = rotary_angles(positions, 8, 10000.0, scaling)
    short = torch.tensor(_longrope_oracle(4, 10000.0, scaling.short_factor or []))
    long = torch.tensor(_longrope_oracle(4, 10000.0, scaling.long_factor or []))
    torch.testing.assert_close(within, positions[:, :8, None] * short)
    torch.testing.assert_close(past, positions[..., None] * long)
    torch.testing.assert_close(
        rotary_angles(torch.tensor([[7]]), 8, 10000.0, scaling), within[:, 7:]
    )
    torch.testing.assert_close(
        rotary_angles(torch.tensor([[8]]), 8, 10000.0, scaling), past[:, 8:9]
    )
    assert rotary_angles(positions[:, :0], 8, 10000.0, scaling).shape == (1, 0, 4)


@settings(max_examples=30, deadline=None)
@given(
    half=st.integers(1, 24),
    base=st.sampled_from([500.0, 10000.0]),
    context=st.integers(2, 4096),
    stretch=st.floats(0.5, 64.0),
    seq_len=st.integers(1, 9000),
    attention_factor=st.sampled_from([None, 1.3]),
    seed=st.integers(0, 1000),
)
def test_longrope_matches_hugging_face(
    half: int, base: float, context: int, stretch: float, seq_len: int,
    attention_factor: float | None, seed: int,
) -> None:  # fmt: skip
    """Frequencies and cos/sin factor equal transformers' ``longrope`` (factor from the lengths)."""
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from mitk.model.pretrained.rope import rope_fields

    gen = torch.Generator().manual_seed(seed)
    short, long = (torch.rand(2, half, generator=gen) * 8 + 0.5).tolist()
    params: dict = {"rope_type": "longrope", "rope_theta": base, "short_factor": short,
                    "long_factor": long, "original_max_position_embeddings": context}  # fmt: skip
    if attention_factor is not None:
        params["attention_factor"] = attention_factor
    n_ctx = max(1, round(context * stretch))
    hf = LlamaConfig(hidden_size=2 * half, num_attention_heads=1, head_dim=2 * half,
                     max_position_embeddings=n_ctx, rope_parameters=dict(params))  # fmt: skip
    expected, expected_factor = ROPE_INIT_FUNCTIONS["longrope"](hf, None, seq_len=seq_len)
    fields = rope_fields({"model_type": "llama", **hf.to_dict()}, 2 * half, scaled=True)
    scaling = fields["rotary_scaling"]
    ours = inverse_frequencies(2 * half, base, scaling, seq_len)
    torch.testing.assert_close(ours, expected.float(), rtol=1e-6, atol=0)
    assert scaling.attention_factor == pytest.approx(expected_factor)


def test_only_a_cached_step_that_passes_the_original_context_reruns() -> None:
    scaling = _longrope(4)
    reruns = [
        cached for cached in range(12) if cache_outlives_short_factors(scaling, cached, cached + 1)
    ]
    assert reruns == [8]  # 8 cached positions, the 9th takes the long factors
    assert cache_outlives_short_factors(scaling, 6, 10)  # several new tokens crossing at once
    assert not cache_outlives_short_factors(scaling, 0, 12)  # no cache: nothing to rerun
    assert not cache_outlives_short_factors(scaling.replace(recompute_at_switch=False), 8, 9)
    assert not cache_outlives_short_factors(RotaryScaling(kind="linear", factor=2.0), 8, 9)
    assert not cache_outlives_short_factors(None, 8, 9)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"short_factor": None}, "short_factor must be a non-empty list of positive numbers"),
        ({"long_factor": [1.0, 0.0, 1.0, 1.0]}, "long_factor must be a non-empty list"),
        ({"long_factor": (1.0,) * 4}, "long_factor must be a non-empty list"),
        ({"long_factor": [1.0] * 3}, "must be equally long, got 4 and 3"),
        ({"kind": "linear", "attention_factor": 1.0},
         "short_factor, long_factor applies to longrope"),
        ({"kind": "yarn", "short_factor": None, "long_factor": None, "recompute_at_switch": False},
         "recompute_at_switch applies to longrope"),
    ],
)  # fmt: skip
def test_invalid_longrope_fields_are_named(change: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        _longrope(4, **change)


def test_longrope_factors_must_number_half_the_rotary_dim() -> None:
    scaling = _longrope(4)
    cfg = _rotary_model(rotary_dim=8, rotary_scaling=scaling).cfg
    assert TransformerConfig.from_json(cfg.to_json()) == cfg  # the lists round-trip
    with pytest.raises(ConfigError, match=r"rotary_dim / 2 = 3 entries .* got 4"):
        _rotary_model(rotary_dim=6, rotary_scaling=scaling)
    with pytest.raises(ConfigError, match="longrope needs 3 per-pair factors, got 4"):
        inverse_frequencies(6, 10000.0, scaling, 9)
