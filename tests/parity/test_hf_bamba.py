"""Bamba (Mamba-2 mixers and attention layers, each followed by a SwiGLU MLP) against
Hugging Face: log-probs, every block's stream, fused and explicit attention, generation.

Tiny random checkpoints (norm weights and biases perturbed, so those terms count;
larger mixer writes and time steps, so the mixers move the output) with the attention
layers in the middle of the stack and grouped-query heads are saved and loaded with
``HookedTransformer.from_pretrained``. HF runs eager attention; position ids count
real tokens under padding, as mitk's do.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from mitk import HookedTransformer
from mitk.errors import ConfigError, ModelFileError, UnsupportedModelError
from mitk.hooks import name
from mitk.model.kv_cache import KVCache
from mitk.model.ssm import SSMState
from tests.parity.hf_compare import hf_forward, token_batch
from tests.parity.test_hf_families import _randomised
from tests.parity.test_hf_generate import _sharpened

VOCAB = 64
VARIANTS: dict[str, dict[str, Any]] = {
    # attention at layers 1 and 3 (4 query heads, 2 key-value heads), half of each head rotated
    "bamba": {"attn_layer_indices": [1, 3]},
    # two groups of heads sharing B and C, every bias, a 3-wide convolution, attention in the
    # middle only, 4 heads of 16 (wider than hidden_size / heads) sharing 1 key-value head,
    # the whole head rotated
    "bamba-groups-biases": {
        "attn_layer_indices": [2], "mamba_n_groups": 2, "mamba_proj_bias": True,
        "mamba_conv_bias": False, "mamba_d_conv": 3, "attention_bias": True,
        "num_key_value_heads": 1, "head_dim": 16,
        "rope_parameters": {"rope_type": "default", "rope_theta": 500.0,
                            "partial_rotary_factor": 1.0},
    },
}  # fmt: skip


def _build(variant: str) -> nn.Module:
    from transformers import BambaConfig, BambaForCausalLM

    config = BambaConfig(**{
        "vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 4,
        "num_attention_heads": 4, "num_key_value_heads": 2, "mamba_n_heads": 8,
        "mamba_d_state": 8, "mamba_chunk_size": 8, "max_position_embeddings": 128,
        **VARIANTS[variant],
    })  # fmt: skip
    return BambaForCausalLM(config)


def _lively(hf: nn.Module) -> nn.Module:
    """HF's init: tiny embeddings beside the (perturbed) biases, small mixer writes and slow
    time steps; larger ones make the next token depend on the context, through the mixers too."""
    with torch.no_grad():
        hf.model.embed_tokens.weight.mul_(20.0)  # type: ignore[union-attr]
        for layer in hf.model.layers:  # type: ignore[union-attr]
            if layer.block_type == "linear_attention":
                layer.mamba.dt_bias.add_(1.0)
                layer.mamba.out_proj.weight.mul_(8.0)
    return hf


def _hf(variant: str) -> nn.Module:
    torch.manual_seed(0)
    hf = _lively(_randomised(_build(variant), seed=1))
    hf.config._attn_implementation = "eager"  # the reference computes attention explicitly
    return hf


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def pair(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Any:
    hf = _hf(request.param)
    directory = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(directory, safe_serialization=True)
    return request.param, hf, HookedTransformer.from_pretrained(directory)


def test_the_layers_are_what_the_config_says(pair: Any) -> None:
    variant, hf, model = pair
    attention = VARIANTS[variant]["attn_layer_indices"]
    assert [not model.cfg.is_ssm_layer(i) for i in range(4)] == [i in attention for i in range(4)]
    assert model.cfg.ssm.mlp and model.cfg.n_key_value_heads == hf.config.num_key_value_heads
    fraction = hf.config.rope_parameters["partial_rotary_factor"]
    assert model.cfg.rotary_dim == int(model.cfg.d_head * fraction)


@pytest.mark.parametrize("padding", ["none", "left", "right"])
def test_log_probs_and_every_residual_match(pair: Any, padding: str) -> None:
    _, hf, model = pair
    tokens, mask = token_batch(VOCAB, padding != "none")
    if mask is not None and padding == "right":
        mask = mask.flip(-1)
    hf_out = hf_forward(hf, tokens, mask)
    with torch.no_grad():
        logits, cache = model.run_with_cache(
            tokens, attention_mask=mask, names_filter=lambda n: "hook_resid_p" in n
        )
    real = torch.ones_like(tokens, dtype=torch.bool) if mask is None else mask.bool()
    torch.testing.assert_close(
        logits.log_softmax(-1)[real], hf_out.logits.log_softmax(-1)[real], atol=1e-4, rtol=0
    )
    for layer in range(model.cfg.n_layers):  # HF's hidden_states[L] enters block L
        torch.testing.assert_close(
            cache[name("resid_pre", layer)][real], hf_out.hidden_states[layer][real],
            atol=1e-4, rtol=0,
        )  # fmt: skip
    final = model.ln_final(cache[name("resid_post", model.cfg.n_layers - 1)])
    torch.testing.assert_close(final[real], hf_out.hidden_states[-1][real], atol=1e-4, rtol=0)


def test_attention_layers_run_fused_unless_a_pattern_is_read(pair: Any) -> None:
    _, _, model = pair
    tokens, mask = token_batch(VOCAB, padded=True)
    attention = [i for i in range(4) if not model.cfg.is_ssm_layer(i)]
    with torch.no_grad():
        fused = model(tokens, attention_mask=mask)
        paths = model.attention_paths()
        explicit, cache = model.run_with_cache(
            tokens, attention_mask=mask, names_filter=[name("pattern", i) for i in attention]
        )
        explicit_paths = model.attention_paths()
    assert all(paths[i] == "sdpa" for i in attention)
    assert all(explicit_paths[i].startswith("eager") for i in attention)
    assert all(paths[i].startswith("ssm") for i in range(4) if i not in attention)
    real = mask.bool()
    torch.testing.assert_close(fused[real], explicit[real], atol=1e-5, rtol=0)
    heads = model.cfg.n_heads
    assert cache[name("pattern", attention[0])].shape == (3, heads, 12, 12)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_greedy_matches_hf_generate_and_the_cache(variant: str, tmp_path: Path) -> None:
    hf = _sharpened(_hf(variant))
    hf.save_pretrained(tmp_path, safe_serialization=True)
    model = HookedTransformer.from_pretrained(tmp_path)
    tokens = torch.randint(1, VOCAB, (2, 6), generator=torch.Generator().manual_seed(2))
    hf.generation_config.eos_token_id = None  # both run all 10 steps
    with torch.no_grad():
        expected = hf.generate(tokens, do_sample=False, max_new_tokens=10, pad_token_id=0)
    ours = model.generate(tokens, 10, do_sample=False, stop_at_eos=False, verbose=False)
    rerun = model.generate(
        tokens, 10, do_sample=False, stop_at_eos=False, verbose=False, use_past_kv_cache=False
    )
    assert ours.tolist() == expected.tolist() == rerun.tolist()
    assert len(set(ours[:, 6:].flatten().tolist())) > 2  # not one token repeated


def test_the_cache_carries_keys_on_attention_layers_and_a_state_on_mixers(pair: Any) -> None:
    _, _, model = pair
    tokens = torch.randint(1, VOCAB, (2, 14), generator=torch.Generator().manual_seed(3))
    cache = KVCache(model.cfg.n_layers)
    with torch.no_grad():
        full = model(tokens)
        parts = [model(tokens[:, :9], past_kv_cache=cache)]
        parts += [model(tokens[:, t : t + 1], past_kv_cache=cache) for t in range(9, 14)]
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-4, rtol=0)
    for layer, entry in enumerate(cache.layers):
        if model.cfg.is_ssm_layer(layer):
            assert isinstance(entry, SSMState)
        else:
            kv_shape = (2, model.cfg.n_key_value_heads, 14, model.cfg.d_head)
            assert entry is not None and entry[0].shape == kv_shape


def test_left_padded_greedy_matches_hf_generate(tmp_path: Path) -> None:
    hf = _sharpened(_hf("bamba"))
    hf.save_pretrained(tmp_path, safe_serialization=True)
    model = HookedTransformer.from_pretrained(tmp_path)
    tokens = torch.randint(1, VOCAB, (2, 7), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(tokens)
    mask[0, :3] = 0
    tokens[0, :3] = 0
    hf.generation_config.eos_token_id = None
    with torch.no_grad():
        expected = hf.generate(
            tokens, attention_mask=mask, do_sample=False, max_new_tokens=8, pad_token_id=0
        )
    greedy = {"do_sample": False, "stop_at_eos": False, "verbose": False}
    assert model.generate(tokens, 8, attention_mask=mask, **greedy).tolist() == expected.tolist()


def test_the_carried_state_and_keys_equal_hf_cache(pair: Any) -> None:
    """After a prompt, each mixer's convolution tail and state and each attention layer's
    (rotated) keys and values are Hugging Face's."""
    _, hf, model = pair
    tokens = torch.randint(1, VOCAB, (2, 9), generator=torch.Generator().manual_seed(3))
    cache = KVCache(model.cfg.n_layers)
    with torch.no_grad():
        theirs = hf(tokens, use_cache=True).cache.layers
        model(tokens, past_kv_cache=cache)
    for layer, (ours, hf_layer) in enumerate(zip(cache.layers, theirs, strict=True)):
        if model.cfg.is_ssm_layer(layer):  # HF holds its states by index; Bamba's is 0
            assert isinstance(ours, SSMState)
            conv, state = ours
            torch.testing.assert_close(
                conv, hf_layer.conv_states[0][..., 1:], atol=1e-5, rtol=0
            )  # HF keeps d_conv inputs, the first of which no later step reads
            torch.testing.assert_close(
                state, hf_layer.recurrent_states[0].flatten(1, 2), atol=1e-5, rtol=0
            )
        else:
            assert ours is not None
            torch.testing.assert_close(ours[0], hf_layer.keys, atol=1e-5, rtol=0)
            torch.testing.assert_close(ours[1], hf_layer.values, atol=1e-5, rtol=0)


def test_state_hooks_leave_the_output_unchanged(pair: Any) -> None:
    _, hf, model = pair
    tokens, _ = token_batch(VOCAB, padded=False)
    mixer = next(i for i in range(4) if model.cfg.is_ssm_layer(i))
    with torch.no_grad():
        expected = hf(tokens).logits
        logits, cache = model.run_with_cache(tokens, names_filter=name("ssm_state", mixer))
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=0)
    assert cache[name("ssm_state", mixer)].shape == (3, 12, model.cfg.ssm.d_inner, 8)
    assert model.attention_paths()[mixer].startswith("ssm: sequential")


@pytest.mark.parametrize(
    ("field", "value"),
    [("attention_multiplier", 0.5), ("partial_rotary_factor", 1.0), ("use_mamba_kernels", True),
     ("time_step_limit", [0.0, 1.0]), ("mlp_bias", True), ("mamba_d_head", 4)],
)  # fmt: skip
def test_unknown_and_unsupported_fields_are_refused_by_name(field: str, value: Any) -> None:
    from mitk.model.pretrained import hf_config

    hf = _build("bamba").config.to_dict()
    with pytest.raises(UnsupportedModelError, match=field):
        hf_config({**hf, field: value}, {}, "test")


def test_without_rope_parameters_half_of_each_head_rotates_as_in_hf() -> None:
    from transformers import BambaConfig

    from mitk.model.pretrained import hf_config

    hf = {k: v for k, v in _build("bamba").config.to_dict().items() if k != "rope_parameters"}
    hf["rope_theta"] = 500.0
    cfg, _ = hf_config(hf, {}, "test")
    reference = BambaConfig(**{k: v for k, v in hf.items() if k != "model_type"})
    assert reference.rope_parameters["partial_rotary_factor"] == 0.5
    assert reference.rope_parameters["rope_theta"] == 500.0
    assert (cfg.rotary_dim, cfg.rotary_base) == (cfg.d_head // 2, 500.0)


def test_attention_layers_outside_the_model_are_refused() -> None:
    from mitk.model.pretrained import hf_config

    hf = _build("bamba").config.to_dict()
    with pytest.raises(ConfigError, match="attn_layer_indices"):
        hf_config({**hf, "attn_layer_indices": [1, 4]}, {}, "test")


def test_a_wrong_weight_shape_is_refused_by_name(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    _build("bamba").save_pretrained(tmp_path, safe_serialization=True)
    weights = load_file(tmp_path / "model.safetensors")
    for key, bad in (
        ("model.layers.0.mamba.A_log", torch.zeros(7)),
        ("model.layers.1.self_attn.k_proj.weight", torch.zeros(32, 32)),
        ("model.layers.2.feed_forward.gate_proj.weight", torch.zeros(40, 32)),
    ):
        broken = {**weights, key: bad}
        save_file(broken, tmp_path / "model.safetensors", metadata={"format": "pt"})
        with pytest.raises(ModelFileError, match=r"A_log|W_qkv|W_gate"):
            HookedTransformer.from_pretrained(tmp_path)
