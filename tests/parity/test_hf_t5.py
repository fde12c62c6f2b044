"""HookedEncoderDecoder against Hugging Face ``T5ForConditionalGeneration`` (fp32, CPU).

Two tiny random T5s: v1.0 (relu MLP, tied unembedding with the ``d_model**-0.5``
rescale) and v1.1 (gated-gelu, untied, no rescale), with non-trivial norm
weights, a padded encoder batch and sequences longer than the exact relative
buckets, so the log-spaced buckets are exercised too.
"""

from __future__ import annotations

from pathlib import Path
import re
from typing import Any

import pytest
import torch
from torch import nn

from mitk import HookedEncoderDecoder, HookedTransformer
from mitk.errors import UnknownHookError, UnsupportedModelError

TOL = 1e-4
VOCAB = 61
ENC_LAYERS, DEC_LAYERS = 2, 3
VARIANTS = {"v1.0-relu-tied": ("relu", True), "v1.1-gated-gelu-untied": ("gated-gelu", False)}


def _hf_t5(feed_forward_proj: str, tied: bool) -> nn.Module:
    from transformers import T5Config, T5ForConditionalGeneration

    cfg = T5Config(
        vocab_size=VOCAB,
        d_model=32,
        d_kv=8,
        d_ff=48,
        num_layers=ENC_LAYERS,
        num_decoder_layers=DEC_LAYERS,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=12,
        feed_forward_proj=feed_forward_proj,
        tie_word_embeddings=tied,
        dropout_rate=0.0,
    )
    torch.manual_seed(0)
    model = T5ForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # norms initialise to ones, which would hide a missing norm weight
        for pname, param in model.named_parameters():
            if "layer_norm" in pname:
                param.uniform_(0.5, 1.5)
    return model


@pytest.fixture(scope="module", params=list(VARIANTS))
def pair(request: Any, tmp_path_factory: Any) -> tuple[nn.Module, HookedEncoderDecoder, Path]:
    hf = _hf_t5(*VARIANTS[request.param])
    directory = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(directory)
    return hf, HookedEncoderDecoder.from_pretrained(directory), directory


def _inputs() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    input_ids = torch.randint(2, VOCAB, (2, 20), generator=gen)
    attention_mask = torch.ones(2, 20, dtype=torch.long)
    attention_mask[1, 13:] = 0  # right-padded second row
    decoder_input_ids = torch.randint(2, VOCAB, (2, 16), generator=gen)
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "decoder_input_ids": decoder_input_ids,
    }


def test_log_probs_and_residual_streams_match_hf(pair: Any) -> None:
    hf, model, _ = pair
    inputs = _inputs()
    real = inputs["attention_mask"].bool()
    with torch.no_grad():
        out = hf(**inputs, output_hidden_states=True)
        logits, cache = model.run_with_cache(**inputs)
    ref = out.logits.log_softmax(-1)
    assert (logits.log_softmax(-1) - ref).abs().max() < TOL
    # HF hidden_states: the stream entering each block, then the final-norm output
    for layer in range(ENC_LAYERS):
        ours = cache[f"encoder.{layer}.hook_resid_pre"]
        assert (ours - out.encoder_hidden_states[layer])[real].abs().max() < TOL, layer
    enc_final = cache["encoder.ln_final.hook_normalized"] * model.encoder.ln_final.w
    assert (enc_final - out.encoder_last_hidden_state)[real].abs().max() < TOL
    for layer in range(DEC_LAYERS):
        ours = cache[f"decoder.{layer}.hook_resid_pre"]
        assert (ours - out.decoder_hidden_states[layer]).abs().max() < TOL, layer
    hidden = model(**inputs, return_type="hidden")
    assert (hidden - out.decoder_hidden_states[-1]).abs().max() < TOL


def test_loss_is_next_token_cross_entropy_over_decoder_tokens(pair: Any) -> None:
    hf, model, _ = pair
    inputs = _inputs()
    dec = inputs["decoder_input_ids"]
    with torch.no_grad():
        ref_logits = hf(**inputs).logits
        loss = model(**inputs, return_type="loss")
    ref = nn.functional.cross_entropy(ref_logits[:, :-1].flatten(0, 1), dec[:, 1:].flatten())
    assert abs(loss.item() - ref.item()) < TOL


def test_fused_equals_explicit_and_paths_are_recorded(pair: Any) -> None:
    _, model, _ = pair
    inputs = _inputs()
    with torch.no_grad():
        fused = model(**inputs)
        paths = model.attention_paths()
        assert set(paths.values()) == {"sdpa"}
        assert len(paths) == ENC_LAYERS + 2 * DEC_LAYERS
        with model.backend("eager"):
            explicit = model(**inputs)
        assert all(p.startswith("eager") for p in model.attention_paths().values())
    # fp32 agreement to 1e-5 of the logits' scale: T5's unscaled scores give logits near 10
    # (with transformers 5's init), where one float32 rounding step is already ~1e-6
    assert (fused - explicit).abs().max() < 1e-5 * fused.abs().max().clamp(min=1)


def test_cross_attention_pattern_covers_real_encoder_tokens_only(pair: Any) -> None:
    _, model, _ = pair
    inputs = _inputs()
    name = "decoder.1.cross_attn.hook_pattern"
    with torch.no_grad():
        _, cache = model.run_with_cache(**inputs, names_filter=name)
    pattern = cache[name]
    assert pattern.shape == (2, 4, 16, 20)  # [batch, head, dec_pos, enc_pos]
    real = inputs["attention_mask"].bool()[:, None, None, :]
    assert torch.allclose(pattern.sum(-1), torch.ones(2, 4, 16), atol=1e-5)
    assert pattern.masked_select(~real.expand_as(pattern)).abs().max() == 0
    assert model.attention_paths()["decoder.1.cross_attn"].startswith("eager: hooked")
    assert model.attention_paths()["decoder.0.cross_attn"] == "sdpa"


def test_hooks_are_removed_after_an_exception(pair: Any) -> None:
    _, model, _ = pair

    def boom(act: torch.Tensor, hook: Any) -> None:
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        model.run_with_hooks(**_inputs(), fwd_hooks=[("encoder.1.hook_resid_mid", boom)])
    assert not any(point.has_hooks for point in model.hook_dict.values())


def test_unknown_hook_name_suggests_the_real_one(pair: Any) -> None:
    _, model, _ = pair
    with pytest.raises(UnknownHookError, match=re.escape("decoder.0.cross_attn.hook_pattern")):
        model.run_with_hooks(**_inputs(), fwd_hooks=[("decoder.0.cross_attn.hook_patern", print)])
    assert "decoder.0.hook_resid_mid_cross" in model.hook_dict
    assert "decoder.0.hook_cross_attn_out" in model.hook_dict


def test_hooked_transformer_points_t5_to_the_encoder_decoder(pair: Any) -> None:
    _, _, directory = pair
    with pytest.raises(UnsupportedModelError, match="HookedEncoderDecoder"):
        HookedTransformer.from_pretrained(directory)


def test_loads_from_an_in_memory_hf_model(pair: Any) -> None:
    hf, model, _ = pair
    inputs = _inputs()
    with torch.no_grad():
        direct = HookedEncoderDecoder.from_pretrained(hf)(**inputs)
        assert (direct - model(**inputs)).abs().max() < 1e-6
