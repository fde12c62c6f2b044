"""The model methods a TransformerLens notebook calls: return types, losses, unembed hooks,
input_to_embed, cfg.device, TransformerLens's switches.

The first section ports TransformerLens's ``tests/integration/test_cross_entropy_loss.py``
with its assertions as written (``solu-1l`` becomes the random local GPT-2 of
``conftest.py``). The rest are mitk's own: identities that must hold between the new
entry points and the ones they share a mechanism with, and bad input. Parity with
transformer-lens on the same weights is in ``tests/parity/test_tl_model_api.py``.
"""

from __future__ import annotations

import json
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st
import pytest
import torch
import torch.nn.functional as F

from mitk import HookedTransformer, TransformerConfig
from mitk.errors import ConfigError, HookError, ShapeMismatchError, UnsupportedModelError
from mitk.model.transformer import LogitsAndLoss

# --- ported: TransformerLens tests/integration/test_cross_entropy_loss.py --------------


def test_cross_entropy_attention_mask(gpt2: HookedTransformer):
    """Check that adding a bunch of masked tokens to the input does not change the loss."""
    model = gpt2  # TransformerLens: HookedTransformer.from_pretrained("solu-1l")

    # Step 1: Get the default loss on a prompt
    prompt = ["The quick brown fox jumps over the lazy dog."]
    default_tokens = model.to_tokens(prompt)
    default_attention_mask = torch.ones_like(default_tokens)
    default_loss = model(default_tokens, return_type="loss")
    ones_mask_loss = model(
        default_tokens, attention_mask=default_attention_mask, return_type="loss"
    )
    assert torch.allclose(default_loss, ones_mask_loss, atol=1e-6)

    # Step 2: Get the loss when we add some extra tokens to the input and set their attention mask
    # to zero
    extra_prompt = ["Lorem ipsum dolor sit amet, consectetur adipiscing elit."]
    extra_tokens = model.to_tokens(extra_prompt)
    extra_zeros_attention_mask = torch.zeros_like(extra_tokens)

    combined_tokens = torch.cat([default_tokens, extra_tokens], dim=1)
    combined_attention_mask = torch.cat([default_attention_mask, extra_zeros_attention_mask], dim=1)
    combined_masked_loss = model(
        combined_tokens, attention_mask=combined_attention_mask, return_type="loss"
    )
    assert torch.allclose(default_loss, combined_masked_loss)


# --- return types and losses ----------------------------------------------------------


@pytest.fixture(scope="module")
def padded() -> tuple[torch.Tensor, torch.Tensor]:
    tokens = torch.randint(0, 50, (3, 9), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(tokens)
    mask[1, :3] = 0  # left padding
    mask[2, 6:] = 0  # right padding
    return tokens, mask


def _reference_losses(logits: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor):
    """Per-pair cross-entropy written out, 0 where either token is padding."""
    log_probs = logits.double().log_softmax(-1)[:, :-1]
    picked = -log_probs.gather(-1, tokens[:, 1:, None])[..., 0]
    pairs = mask[:, 1:].bool() & mask[:, :-1].bool()
    return picked.masked_fill(~pairs, 0.0), pairs


def test_every_loss_entry_point_agrees(tiny: HookedTransformer, padded) -> None:
    tokens, mask = padded
    with torch.no_grad():
        logits = tiny(tokens, attention_mask=mask)
        both = tiny(tokens, attention_mask=mask, return_type="both")
        both_per_token = tiny(tokens, attention_mask=mask, return_type="both", loss_per_token=True)
        loss = tiny(tokens, attention_mask=mask, return_type="loss")
        per_token = tiny(tokens, attention_mask=mask, return_type="loss", loss_per_token=True)
    expected, pairs = _reference_losses(logits, tokens, mask)
    assert isinstance(both, LogitsAndLoss) and both.logits is both[0] and both.loss is both[1]
    torch.testing.assert_close(both.logits, logits)
    assert per_token.shape == (3, 8) and per_token.dtype == torch.float32
    torch.testing.assert_close(per_token.double(), expected, atol=1e-5, rtol=0)
    assert not per_token[~pairs].any()
    torch.testing.assert_close(both_per_token.loss, per_token, atol=1e-6, rtol=0)
    for mean in (loss, both.loss, tiny.loss_fn(logits, tokens, mask)):
        torch.testing.assert_close(mean.double(), expected.sum() / pairs.sum(), atol=1e-5, rtol=0)
    torch.testing.assert_close(tiny.loss_fn(logits, tokens, mask, per_token=True), per_token)


@settings(max_examples=15, deadline=None)
@given(batch=st.integers(1, 4), pos=st.integers(2, 16), chunk=st.integers(1, 40))
def test_chunking_never_changes_the_loss(batch: int, pos: int, chunk: int) -> None:
    from mitk.model.loss import loss_from_logits, next_token_loss, next_token_losses

    gen = torch.Generator().manual_seed(batch * 100 + pos)
    hidden = torch.randn(batch, pos, 8, generator=gen)
    w_u = torch.randn(8, 11, generator=gen)
    tokens = torch.randint(0, 11, (batch, pos), generator=gen)
    valid = torch.rand(batch, pos, generator=gen) > 0.3
    valid[:, :2] = True  # at least one pair counts
    unembed = lambda x: x @ w_u  # noqa: E731
    whole = loss_from_logits(hidden @ w_u, tokens, valid, per_token=True)
    chunked = next_token_losses(hidden, tokens, valid, unembed, chunk=chunk)
    torch.testing.assert_close(chunked, whole, atol=1e-5, rtol=0)
    mean = next_token_loss(hidden, tokens, valid, unembed, chunk=chunk)
    pairs = valid[:, 1:] & valid[:, :-1]
    torch.testing.assert_close(mean, whole.sum() / pairs.sum(), atol=1e-5, rtol=0)
    plain = F.cross_entropy((hidden @ w_u)[:, :-1].reshape(-1, 11), tokens[:, 1:].reshape(-1))
    torch.testing.assert_close(next_token_loss(hidden, tokens, None, unembed, chunk), plain)


def test_return_type_none_runs_the_final_norm_and_returns_nothing(tiny: HookedTransformer) -> None:
    tokens = torch.randint(0, 50, (2, 5))
    seen: list[str] = []
    fwd = [(n, lambda a, h: seen.append(h.name)) for n in ["ln_final.hook_normalized"]]
    assert tiny.run_with_hooks(tokens, return_type=None, fwd_hooks=fwd) is None
    assert seen == ["ln_final.hook_normalized"]
    with pytest.raises(HookError, match=r"would never fire.*return_type=None"):
        tiny.run_with_hooks(tokens, return_type=None, fwd_hooks=[("unembed.hook_out", print)])
    with pytest.raises(HookError, match="return_type='hidden'"):
        tiny.run_with_cache(tokens, return_type="hidden", names_filter="unembed.hook_in")


def test_bad_return_types_and_combinations(tiny: HookedTransformer) -> None:
    tokens = torch.randint(0, 50, (2, 5))
    with pytest.raises((ValueError, TypeError), match="return_type"):
        tiny(tokens, return_type="probs")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="logit_positions selects logits"):
        tiny(tokens, return_type="both", logit_positions=-1)
    resid = tiny(tokens, stop_at_layer=1)
    with pytest.raises(ValueError, match=r"return_type='both' with start_at_layer needs tokens"):
        tiny(resid, start_at_layer=1, return_type="both")
    with pytest.raises(UnsupportedModelError, match="shortformer"):
        tiny(tokens, shortformer_pos_embed=torch.zeros(2, 5, 32))
    with pytest.raises(ShapeMismatchError, match="same shape as tokens"):
        tiny.loss_fn(torch.zeros(2, 5, 50), tokens, attention_mask=torch.ones(2, 4))
    with pytest.raises(ShapeMismatchError, match=r"\[batch, pos, d_vocab\]"):
        tiny.loss_fn(torch.zeros(2, 4, 50), tokens)


# --- unembed hooks ----------------------------------------------------------------------


@pytest.mark.parametrize("return_type", ["logits", "loss", "both"])
def test_unembed_hooks_fire_once_on_every_position(
    tiny: HookedTransformer, padded, return_type: str
) -> None:
    """Hooked, the loss unembeds whole (the chunked path would hand the hooks the real pairs
    flattened, [1, pairs, d_model]) and sees what the hook returned."""
    tokens, mask = padded
    calls: list[tuple[str, tuple[int, ...]]] = []

    def bump(logits: torch.Tensor, hook) -> torch.Tensor:
        calls.append((hook.name, tuple(logits.shape)))
        return logits + torch.arange(50.0) * 0.1  # a change the loss must see

    def record(x: torch.Tensor, hook) -> None:
        calls.append((hook.name, tuple(x.shape)))

    with torch.no_grad():
        plain_logits = tiny(tokens, attention_mask=mask)
        hooks = [("unembed.hook_in", record), ("unembed.hook_out", bump)]
        out = tiny.run_with_hooks(tokens, attention_mask=mask, return_type=return_type,
                                  fwd_hooks=hooks)  # fmt: skip
    assert calls == [("unembed.hook_in", (3, 9, 32)), ("unembed.hook_out", (3, 9, 50))]
    bumped = plain_logits + torch.arange(50.0) * 0.1
    if return_type == "logits":
        torch.testing.assert_close(out, bumped)
    else:
        loss = out.loss if return_type == "both" else out
        torch.testing.assert_close(loss, tiny.loss_fn(bumped, tokens, mask))


def test_unembed_hooks_see_what_the_chunks_would(
    tiny: HookedTransformer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Chunked (unhooked) and whole (hooked) losses agree, with chunks that split batches."""
    import mitk.model.loss as loss_module

    tokens = torch.randint(0, 50, (3, 9), generator=torch.Generator().manual_seed(2))
    monkeypatch.setattr(loss_module, "LOSS_CHUNK", 5)
    with torch.no_grad():
        chunked = tiny(tokens, return_type="loss", loss_per_token=True)
        _, cache = tiny.run_with_cache(tokens, return_type="loss", names_filter="unembed.hook_out")
    assert cache["unembed.hook_out"].shape == (3, 9, 50)
    torch.testing.assert_close(chunked, tiny.loss_fn(cache["unembed.hook_out"], tokens, None, True))


def test_unembed_hooks_are_pre_softcap_logits() -> None:
    cfg = TransformerConfig(d_model=16, n_layers=1, n_heads=2, d_vocab=20, n_ctx=8,
                            output_softcap=2.0)  # fmt: skip
    model = HookedTransformer(cfg, seed=3)
    with torch.no_grad():
        model.unembed.W_U.mul_(40)
        logits, cache = model.run_with_cache(torch.randint(0, 20, (1, 6)))
    raw = cache["unembed.hook_out"]
    assert raw.abs().max() > 2.0 >= logits.abs().max()
    torch.testing.assert_close(logits, 2.0 * torch.tanh(raw / 2.0))


# --- input_to_embed ---------------------------------------------------------------------


def test_input_to_embed_is_forwards_embedding(gpt2: HookedTransformer) -> None:
    """Its residual is blocks.0.hook_resid_pre of the same input, hooks and all."""
    texts = ["the cat sat on a mat", "a dog"]
    for side in ["left", "right"]:
        with torch.no_grad():
            resid, tokens, shortformer, mask = gpt2.input_to_embed(texts, padding_side=side)
            _, cache = gpt2.run_with_cache(texts, padding_side=side,
                                           names_filter="blocks.0.hook_resid_pre")  # fmt: skip
        expected_tokens, expected_mask = gpt2.tokenize(texts, padding_side=side)
        assert shortformer is None and torch.equal(tokens, expected_tokens)
        assert torch.equal(mask, expected_mask)
        real = mask.bool()
        torch.testing.assert_close(resid[real], cache["blocks.0.hook_resid_pre"][real])
    doubled = lambda x, hook: x * 2  # noqa: E731
    with torch.no_grad(), gpt2.hooks([("hook_embed", doubled)]):
        hooked, *_ = gpt2.input_to_embed("the cat")
    plain, *_ = gpt2.input_to_embed("the cat")
    torch.testing.assert_close(hooked - plain, gpt2.W_E[gpt2.to_tokens("the cat")])


def test_input_to_embed_mask_rules(gpt2: HookedTransformer) -> None:
    tokens = gpt2.to_tokens(["the cat", "a big red dog"])  # right-padded
    assert gpt2.input_to_embed(tokens)[3] is None  # nothing said or inferred
    given = torch.ones_like(tokens)
    assert torch.equal(gpt2.input_to_embed(tokens, attention_mask=given)[3], given)
    left = gpt2.to_tokens(["the cat", "a big red dog"], padding_side="left")
    mask = gpt2.input_to_embed(left, padding_side="left")[3]
    assert torch.equal(mask, gpt2.tokenize(["the cat", "a big red dog"], padding_side="left")[1])


# --- cfg.device -------------------------------------------------------------------------


def test_cfg_device_follows_the_weights_and_stays_out_of_json(tmp_path: Path) -> None:
    model = HookedTransformer(TransformerConfig(d_model=8, n_layers=1, n_heads=2, d_vocab=10,
                                                n_ctx=4))  # fmt: skip
    assert model.cfg.device == "cpu" and model.blocks[0].cfg is model.cfg
    model.to(torch.float64)
    assert model.cfg.device == "cpu" and model.cfg.dtype == "float64"
    moved = model.cfg.replace(device="meta")
    assert moved == model.cfg  # where a model lives is not what it is
    assert "device" not in json.loads(model.cfg.to_json())
    model.to("meta")
    assert model.cfg.device == "meta" and model.blocks[0].cfg is model.cfg
    assert TransformerConfig.from_json(model.cfg.to_json()).device == "cpu"
    built = HookedTransformer(moved)  # a config's device is where the model is built
    assert built.W_E.device.type == "meta" and built.cfg.device == "meta"
    with pytest.raises(ConfigError, match="device must name a torch device"):
        TransformerConfig(d_model=8, n_layers=1, n_heads=2, d_vocab=10, n_ctx=4, device="gpu0")
    assert (
        TransformerConfig(
            d_model=8, n_layers=1, n_heads=2, d_vocab=10, n_ctx=4, device=torch.device("cpu")
        ).device
        == "cpu"
    )  # type: ignore[arg-type]


def test_tokens_go_to_cfg_device(tiny: HookedTransformer, gpt2: HookedTransformer) -> None:
    assert gpt2.to_tokens("the cat").device == torch.device(gpt2.cfg.device)
    assert gpt2.to_tokens("the cat", move_to_device=False).device == torch.device("cpu")


# --- TransformerLens's switches and loaders -----------------------------------------------


def test_set_use_switches(tiny: HookedTransformer) -> None:
    tiny.set_use_attn_result(True)  # accepted: hook_result is there whenever asked for
    _, cache = tiny.run_with_cache(
        torch.randint(0, 50, (1, 4)), names_filter="blocks.0.attn.hook_result"
    )
    assert cache["blocks.0.attn.hook_result"].shape == (1, 4, 4, 32)
    refusals = {
        "set_use_split_qkv_input": "ln1.hook_normalized",
        "set_use_attn_in": "hook_resid_pre",
        "set_use_hook_mlp_in": "hook_resid_mid",
        "set_ungroup_grouped_query_attention": "per_query_head",
    }
    for method, instead in refusals.items():
        getattr(tiny, method)(False)  # off is what mitk does anyway
        with pytest.raises(UnsupportedModelError, match=instead):
            getattr(tiny, method)(True)


def test_loader_spellings(gpt2_dir: Path, gpt2: HookedTransformer) -> None:
    plain = HookedTransformer.from_pretrained_no_processing(gpt2_dir)
    assert "processing" not in plain.cfg.extra
    assert all(
        torch.equal(a, b) for a, b in zip(plain.parameters(), gpt2.parameters(), strict=True)
    )
    no_bos = HookedTransformer.from_pretrained(gpt2_dir, default_prepend_bos=False)
    assert not no_bos.cfg.default_prepend_bos and no_bos.to_tokens("the cat").shape == (1, 2)
    refactored = HookedTransformer.from_pretrained(
        gpt2_dir, fold_ln=True, refactor_factored_attn_matrices=True
    )
    assert refactored.cfg.extra["processing"] == ["fold_ln", "refactor_factored_attn_matrices"]
    processed = HookedTransformer.from_pretrained_no_processing(gpt2_dir).process_weights_()
    assert processed.cfg.extra["processing"] == [
        "fold_ln", "center_writing_weights", "center_unembed", "fold_value_biases"]  # fmt: skip
    tokens = torch.randint(0, 97, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = gpt2(tokens).log_softmax(-1)
        for model in (refactored, processed):
            torch.testing.assert_close(model(tokens).log_softmax(-1), expected, atol=1e-4, rtol=0)
    rms = HookedTransformer(TransformerConfig(d_model=8, n_layers=1, n_heads=2, d_vocab=10,
                                              n_ctx=4, normalization="rmsnorm"))  # fmt: skip
    with pytest.raises(UnsupportedModelError, match="center_writing_weights"):
        rms.process_weights_()
    rms.process_weights_(center_writing_weights=False)
