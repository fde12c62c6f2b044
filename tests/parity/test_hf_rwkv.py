"""RWKV-4 against Hugging Face: log-probs, every block's stream, generation.

Tiny random checkpoints (norm weights and biases perturbed, so those terms count;
decays, bonuses and mixes spread, so every position matters) are saved and loaded
with ``HookedTransformer.from_pretrained``. The reference is HF's eval mode, which
rescales (``rescale_every``): its stream after ``h`` halvings is mitk's divided by
``2**h``. HF ignores ``attention_mask``, so a padded batch is compared row by row
with HF on each prompt alone.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from mitk import HookedTransformer
from mitk.errors import ModelFileError, UnsupportedModelError
from mitk.hooks import name
from tests.parity.hf_compare import token_batch
from tests.parity.test_hf_families import _randomised
from tests.parity.test_hf_generate import _sharpened

VOCAB = 64
VARIANTS: dict[str, dict[str, Any]] = {
    "rwkv": {"rescale_every": 0},
    # HF's eval halves the stream after every block: the norms' epsilons grow 4x per block
    "rwkv-rescaled": {"rescale_every": 1},
    # time mixing narrower and channel mixing wider than the stream, rescaled every 2 blocks
    "rwkv-widths": {"rescale_every": 2, "attention_hidden_size": 24, "intermediate_size": 80},
}


def _build(variant: str) -> nn.Module:
    from transformers import RwkvConfig, RwkvForCausalLM

    config = RwkvConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=3, context_length=128,
        **VARIANTS[variant],
    )  # fmt: skip
    return RwkvForCausalLM(config)


def _lively(hf: nn.Module) -> nn.Module:
    """HF's init gives tiny embeddings, a bonus of 1 everywhere and mixes on a ramp; spread
    decays (some fast, ``w = e^2``), bonuses and mixes so that each part of the recurrence
    and the token shift moves the output."""
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        hf.rwkv.embeddings.weight.normal_(0, 1, generator=gen)  # type: ignore[union-attr]
        for block in hf.rwkv.blocks:  # type: ignore[union-attr]
            att, ffn = block.attention, block.feed_forward
            att.time_decay.copy_(torch.randn(att.time_decay.shape, generator=gen) * 1.5)
            att.time_first.copy_(torch.randn(att.time_first.shape, generator=gen))
            for mix in (att.time_mix_key, att.time_mix_value, att.time_mix_receptance,
                        ffn.time_mix_key, ffn.time_mix_receptance):  # fmt: skip
                mix.copy_(torch.rand(mix.shape, generator=gen))
            att.key.weight.mul_(3.0)  # keys far apart: the running maximum matters
    return hf


def _pair(variant: str, directory: Path, sharpen: bool = False) -> tuple[nn.Module, Any]:
    torch.manual_seed(0)
    hf = _lively(_randomised(_build(variant), seed=1))
    if sharpen:
        hf = _sharpened(hf)
    hf.save_pretrained(directory, safe_serialization=True)
    return hf.eval(), HookedTransformer.from_pretrained(directory)


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def pair(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Any:
    hf, model = _pair(request.param, tmp_path_factory.mktemp(request.param))
    return request.param, hf, model


def _hf_alone(hf: nn.Module, tokens: torch.Tensor) -> Any:
    # use_cache=False: HF's cached path cannot hold attention_hidden_size != hidden_size
    with torch.no_grad():
        return hf(tokens, output_hidden_states=True, use_cache=False)


def test_log_probs_and_every_block_output_match(pair: Any) -> None:
    _, hf, model = pair
    tokens, _ = token_batch(VOCAB, padded=False)
    hf_out = _hf_alone(hf, tokens)
    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens, names_filter=lambda n: "resid_post" in n)
        hidden = model(tokens, return_type="hidden")
    torch.testing.assert_close(
        logits.log_softmax(-1), hf_out.logits.log_softmax(-1), atol=1e-4, rtol=0
    )
    rwkv = model.cfg.rwkv
    for layer in range(model.cfg.n_layers):  # HF's hidden_states[L]: block L's output, rescaled
        scale = 2.0 ** rwkv.halvings_before(layer + 1)
        ours = cache[name("resid_post", layer)] / scale
        torch.testing.assert_close(ours, hf_out.hidden_states[layer], atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(hidden, hf_out.hidden_states[-1], atol=1e-4, rtol=0)


@pytest.mark.parametrize("variant", ["rwkv-rescaled", "rwkv-widths"])
def test_rescaling_matters_and_is_matched(variant: str, tmp_path: Path) -> None:
    """HF's train mode does not rescale: where eval rescales, the two differ, and mitk
    follows eval (the loaded model's mode)."""
    hf, model = _pair(variant, tmp_path)
    tokens, _ = token_batch(VOCAB, padded=False)
    with torch.no_grad():
        hf.train()
        unrescaled = hf(tokens, use_cache=False).logits.log_softmax(-1)
        hf.eval()
        rescaled = hf(tokens, use_cache=False).logits.log_softmax(-1)
        ours = model(tokens).log_softmax(-1)
    off_eval, off_train = ((ours - ref).abs().max().item() for ref in (rescaled, unrescaled))
    assert off_eval < 3e-5 and off_train > 10 * off_eval, (off_eval, off_train)


@pytest.mark.parametrize("padding", ["left", "right"])
def test_a_padded_batch_equals_each_prompt_alone(pair: Any, padding: str) -> None:
    _, hf, model = pair
    tokens, mask = token_batch(VOCAB, padded=True)
    assert mask is not None
    if padding == "right":
        mask = mask.flip(-1)
    with torch.no_grad():
        logits = model(tokens, attention_mask=mask).log_softmax(-1)
    for row in range(tokens.shape[0]):
        real = mask[row].bool()
        expected = _hf_alone(hf, tokens[row, real][None]).logits.log_softmax(-1)[0]
        torch.testing.assert_close(logits[row, real], expected, atol=1e-4, rtol=0)


def test_state_hook_leaves_the_output_unchanged(pair: Any) -> None:
    _, hf, model = pair
    tokens, _ = token_batch(VOCAB, padded=False)
    expected = _hf_alone(hf, tokens).logits
    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens, names_filter=name("wkv_state", 2))
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=0)
    assert cache[name("wkv_state", 2)].shape == (3, 12, model.cfg.rwkv.d_attn, 3)


@pytest.mark.parametrize("variant", ["rwkv", "rwkv-rescaled"])
def test_greedy_matches_hf_generate(variant: str, tmp_path: Path) -> None:
    hf, model = _pair(variant, tmp_path, sharpen=True)
    tokens = torch.randint(1, VOCAB, (2, 6), generator=torch.Generator().manual_seed(2))
    hf.generation_config.eos_token_id = None  # both run all 10 steps
    with torch.no_grad():  # one prompt at a time: HF's one-token step mixes a batch's rows
        expected = torch.cat([
            hf.generate(row[None], do_sample=False, max_new_tokens=10, pad_token_id=0)
            for row in tokens
        ])  # fmt: skip
    ours = model.generate(tokens, 10, do_sample=False, stop_at_eos=False, verbose=False)
    assert ours.tolist() == expected.tolist()
    assert len(set(ours[:, 6:].flatten().tolist())) > 2  # not one token repeated


def test_the_carried_state_equals_hf_state(tmp_path: Path) -> None:
    """After a prompt, mitk's cache holds HF's state: the last inputs and (num, den, max)."""
    from mitk.model.kv_cache import KVCache

    hf, model = _pair("rwkv", tmp_path)
    tokens, _ = token_batch(VOCAB, padded=False)
    cache = KVCache(model.cfg.n_layers)
    with torch.no_grad():
        state = hf(tokens, use_cache=True).state
        model(tokens, past_kv_cache=cache)
    for layer, entry in enumerate(cache.layers):
        assert entry is not None
        torch.testing.assert_close(entry.shift[:, 1], state[0][..., layer], atol=1e-5, rtol=0)
        torch.testing.assert_close(entry.shift[:, 0], state[1][..., layer], atol=1e-5, rtol=0)
        num, den, scale = entry.wkv.unbind(-1)
        hf_num, hf_den, hf_scale = (s[..., layer] for s in state[2:])
        # the same sums, held at possibly different scales
        torch.testing.assert_close(num / den, hf_num / hf_den, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(den.log() + scale, hf_den.log() + hf_scale, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize(
    ("field", "value"), [("use_wkv_kernel", True), ("hidden_act", "gelu"), ("num_heads", 4)]
)
def test_unknown_fields_are_refused_by_name(field: str, value: Any) -> None:
    from mitk.model.pretrained import hf_config

    hf = _build("rwkv").config.to_dict()
    with pytest.raises(UnsupportedModelError, match=field):
        hf_config({**hf, field: value}, {}, "test")


def test_a_wrong_weight_shape_is_refused_by_name(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    _pair("rwkv", tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    for key, bad in (
        ("rwkv.blocks.1.attention.time_decay", torch.zeros(31)),
        ("rwkv.blocks.0.feed_forward.time_mix_key", torch.zeros(2, 1, 16)),
    ):
        broken = {**weights, key: bad}
        save_file(broken, tmp_path / "model.safetensors", metadata={"format": "pt"})
        with pytest.raises(ModelFileError, match=r"time_decay|time_mix_key"):
            HookedTransformer.from_pretrained(tmp_path)
