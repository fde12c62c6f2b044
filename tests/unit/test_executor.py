"""One executor: every entry point runs blocks through ``run_blocks`` with a ForwardContext.

No module's attributes change during any entry point; held values replace
activations for one pass; the public key-value cache extends a sequence
exactly as a full forward would and is left untouched by a failed forward.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
import pytest
import torch
from torch import nn

from mitk import EncoderDecoderConfig, HookedEncoderDecoder, HookedTransformer, TransformerConfig
from mitk.analysis.patching import activation_patch, logit_diff
from mitk.analysis.patching.path import path_patch
from mitk.errors import InvalidTokensError, SequenceTooLongError, ShapeMismatchError
from mitk.model.kv_cache import KVCache


def _snapshot(model: nn.Module) -> dict[tuple[str, str], Any]:
    """Every module attribute by identity, and the contents of hook lists."""
    state: dict[tuple[str, str], Any] = {}
    for module_name, module in model.named_modules():
        for key, value in vars(module).items():
            state[(module_name, key)] = id(value)
            if isinstance(value, list):
                state[(module_name, key + "[]")] = [id(v) for v in value]
            if isinstance(value, dict) and key.startswith("_") and key != "_path_record":
                # nn.Module's registries (_parameters, _modules, hooks); _path_record is the
                # one report a forward leaves behind (attention_paths), checked below
                state[(module_name, key + "{}")] = {k: id(v) for k, v in value.items()}
    return state


@pytest.fixture(scope="module")
def rotary() -> HookedTransformer:
    cfg = TransformerConfig(
        d_model=32, n_layers=3, n_heads=4, n_key_value_heads=2, d_vocab=40, n_ctx=32,
        positional="rotary", normalization="rmsnorm", act_fn="silu", gated_mlp=True,
    )  # fmt: skip
    return HookedTransformer(cfg, seed=3)


def _tokens(batch: int = 2, pos: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.randint(1, 40, (batch, pos), generator=torch.Generator().manual_seed(seed))


def _entry_points(model: HookedTransformer) -> dict[str, Callable[[], object]]:
    tokens = _tokens()
    corrupted = tokens.clone()
    corrupted[:, 3] = (tokens[:, 3] + 7) % 40
    mask = torch.ones_like(tokens)
    mask[0, :2] = 0
    metric = logit_diff(answer=3, wrong=5)
    pattern = ("blocks.1.attn.hook_pattern", lambda p, h: None)
    return {
        "forward": lambda: model(tokens, attention_mask=mask),
        "forward_hooked": lambda: model.run_with_hooks(tokens, fwd_hooks=[pattern]),
        "run_with_cache": lambda: model.run_with_cache(tokens),
        "cache_with_grads": lambda: model.run_with_cache(tokens, return_type="loss", incl_bwd=True),
        "generate": lambda: model.generate(tokens, 3, attention_mask=mask, eos_token_id=()),
        "generate_no_cache": lambda: model.generate(
            tokens, 2, stop_at_eos=False, use_past_kv_cache=False
        ),
        "activation_patch": lambda: activation_patch(model, tokens, corrupted, metric, "z", "pos"),
        "path_patch": lambda: path_patch(model, tokens, corrupted, metric, [(0, 1)], "logits"),
        "partial": lambda: model(model(tokens, stop_at_layer=1), start_at_layer=1),
    }


@pytest.mark.parametrize(
    "entry",
    ["forward", "forward_hooked", "run_with_cache", "cache_with_grads", "generate",
     "generate_no_cache", "activation_patch", "path_patch", "partial"],
)  # fmt: skip
def test_no_module_attribute_changes_during_an_entry_point(
    rotary: HookedTransformer, entry: str
) -> None:
    run = _entry_points(rotary)[entry]
    before = _snapshot(rotary)
    run()
    assert _snapshot(rotary) == before
    rotary.zero_grad(set_to_none=True)


def test_no_module_attribute_changes_in_the_encoder_decoder() -> None:
    cfg = EncoderDecoderConfig(
        d_model=16, n_heads=2, d_head=8, d_mlp=32, n_layers=2, n_decoder_layers=2, d_vocab=30
    )
    model = HookedEncoderDecoder(cfg)
    enc, dec = _tokens(2, 6, 1) % 30, _tokens(2, 4, 2) % 30
    before = _snapshot(model)
    model.run_with_cache(enc, dec)
    model(enc, dec)
    assert _snapshot(model) == before
    assert set(model.attention_paths().values()) == {"sdpa"}  # the last pass cached nothing


def test_the_path_report_follows_the_last_forward(rotary: HookedTransformer) -> None:
    tokens = _tokens()
    with rotary.hooks([("blocks.2.attn.hook_attn_scores", lambda s, h: None)]) as hooked:
        assert hooked is rotary  # as TransformerLens's hooks() context gives the model back
        rotary(tokens)
    assert rotary.attention_paths() == [
        "sdpa", "sdpa", "eager: hooked blocks.2.attn.hook_attn_scores"
    ]  # fmt: skip
    rotary(tokens, stop_at_layer=1)
    assert rotary.attention_paths() == ["sdpa", "not run", "not run"]


def test_run_blocks_in_pieces_equals_one_forward(rotary: HookedTransformer) -> None:
    tokens = _tokens()
    with torch.no_grad():
        whole = rotary(tokens, stop_at_layer=3)
        resid = rotary(tokens, stop_at_layer=1)
        for layer in (1, 2):
            ctx = rotary.forward_context(tokens.shape[1], start=layer, stop=layer + 1)
            resid = rotary.run_blocks(resid, ctx)
            assert list(ctx.paths) == [f"blocks.{layer}.attn"]
    torch.testing.assert_close(resid, whole, atol=1e-6, rtol=0)


def test_held_pattern_replaces_the_computed_one_and_runs_explicitly(
    rotary: HookedTransformer,
) -> None:
    clean, other = _tokens(seed=0), _tokens(seed=1)
    name = "blocks.1.attn.hook_pattern"
    with torch.no_grad():
        _, cache = rotary.run_with_cache(other, names_filter=name)
        held = rotary(clean, hold={name: cache[name]})
        assert rotary.attention_paths()[1] == f"eager: hooked {name}"
        hooked = rotary.run_with_hooks(clean, fwd_hooks=[(name, lambda p, h: cache[name])])
        free = rotary(clean)
    torch.testing.assert_close(held, hooked, atol=0, rtol=0)
    assert not torch.allclose(held, free)
    seen: list[torch.Tensor] = []
    with torch.no_grad(), rotary.hooks([(name, lambda p, h: seen.append(p))]):
        rotary(clean, hold={name: cache[name]})  # user hooks see the held value
    torch.testing.assert_close(seen[0], cache[name], atol=0, rtol=0)


def test_held_norm_scale_is_a_constant_for_gradients(rotary: HookedTransformer) -> None:
    """Holding ``ln_final.hook_scale`` makes the final norm linear in its input."""
    tokens = _tokens()
    with torch.no_grad():
        _, cache = rotary.run_with_cache(tokens, names_filter="ln_final.hook_scale")
    scale = cache["ln_final.hook_scale"]
    resid = rotary(tokens, stop_at_layer=3).detach().requires_grad_(True)
    hidden = rotary(resid, start_at_layer=3, return_type="hidden",
                    hold={"ln_final.hook_scale": scale})  # fmt: skip
    (grad,) = torch.autograd.grad(hidden.sum(), resid)
    expected = (rotary.ln_final.w / scale).expand_as(resid)  # RMSNorm with a fixed scale
    torch.testing.assert_close(grad, expected, atol=1e-5, rtol=1e-5)


def test_hold_refuses_unknown_names_and_wrong_shapes(rotary: HookedTransformer) -> None:
    tokens = _tokens()
    with pytest.raises(Exception, match="did you mean"):
        rotary(tokens, hold={"blocks.1.attn.hook_patern": torch.zeros(1)})
    with pytest.raises(ShapeMismatchError, match="hook_pattern"):
        rotary(tokens, hold={"blocks.1.attn.hook_pattern": torch.zeros(1, 4, 8, 8)})
    assert not any(point.has_hooks for point in rotary.hook_dict.values())


@pytest.mark.parametrize("padded", [False, True])
def test_kv_cache_forward_equals_a_full_forward(rotary: HookedTransformer, padded: bool) -> None:
    tokens = _tokens(2, 10)
    mask = torch.ones_like(tokens)
    if padded:
        mask[1, :3] = 0  # left padding
    with torch.no_grad():
        full = rotary(tokens, attention_mask=mask)
        cache = KVCache(rotary.cfg.n_layers)
        parts = [rotary(tokens[:, :6], attention_mask=mask[:, :6], past_kv_cache=cache)]
        for pos in range(6, 10):
            parts.append(rotary(tokens[:, pos : pos + 1], past_kv_cache=cache))
    assert cache.length == 10
    real = mask.bool()
    torch.testing.assert_close(torch.cat(parts, 1)[real], full[real], atol=1e-5, rtol=0)


def test_a_failed_forward_leaves_the_kv_cache_as_it_was(rotary: HookedTransformer) -> None:
    tokens = _tokens(2, 6)
    cache = KVCache(rotary.cfg.n_layers)
    with torch.no_grad():
        rotary(tokens, past_kv_cache=cache)
        kept = [kv for kv in cache.layers]
        with pytest.raises(InvalidTokensError):
            rotary(torch.full((2, 1), 99), past_kv_cache=cache)

        def fail(x: torch.Tensor, hook: object) -> None:
            raise RuntimeError("boom")

        with (
            pytest.raises(RuntimeError, match="boom"),
            rotary.hooks([("blocks.2.hook_resid_post", fail)]),
        ):
            rotary(tokens[:, :1], past_kv_cache=cache)
        with pytest.raises(ShapeMismatchError, match="batch of 2"):
            rotary(_tokens(3, 1), past_kv_cache=cache)
        with pytest.raises(ValueError, match="whole pass"):
            rotary(tokens[:, :1], stop_at_layer=2, past_kv_cache=cache)
    assert cache.length == 6 and all(a is b for a, b in zip(cache.layers, kept, strict=True))


@settings(
    max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    cuts=st.lists(st.integers(1, 4), min_size=1, max_size=4),  # tiny has 16 positions
    pad=st.integers(0, 2),
    rotary_model=st.booleans(),
)
def test_any_chunking_through_the_kv_cache_equals_one_forward(
    rotary: HookedTransformer,
    tiny: HookedTransformer,
    cuts: list[int],
    pad: int,
    rotary_model: bool,
) -> None:
    """Feeding a sequence in arbitrary chunks through a KVCache gives the one-pass logits."""
    model = rotary if rotary_model else tiny
    length = sum(cuts)
    tokens = _tokens(2, length, seed=length) % model.cfg.d_vocab
    mask = torch.ones_like(tokens)
    mask[0, : min(pad, cuts[0] - 1)] = 0  # left padding inside the first chunk
    with torch.no_grad():
        full = model(tokens, attention_mask=mask)
        cache, parts, start = KVCache(model.cfg.n_layers), [], 0
        for cut in cuts:
            piece = slice(start, start + cut)
            parts.append(
                model(tokens[:, piece], attention_mask=mask[:, piece], past_kv_cache=cache)
            )
            start += cut
    real = mask.bool()
    torch.testing.assert_close(torch.cat(parts, 1)[real], full[real], atol=1e-5, rtol=0)


def test_learned_positions_refuse_a_cache_past_n_ctx(tiny: HookedTransformer) -> None:
    cache = KVCache(tiny.cfg.n_layers)
    n_ctx = tiny.cfg.n_ctx
    with torch.no_grad():
        tiny(_tokens(1, n_ctx - 1) % tiny.cfg.d_vocab, past_kv_cache=cache)
        with pytest.raises(SequenceTooLongError, match="n_ctx"):
            tiny(_tokens(1, 2) % tiny.cfg.d_vocab, past_kv_cache=cache)
    assert cache.length == n_ctx - 1
