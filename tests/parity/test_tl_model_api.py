"""The model methods a TransformerLens notebook calls, against transformer-lens on the same weights.

The first section ports the loss and processing tests of TransformerLens's
``tests/acceptance/test_hooked_transformer.py`` (``test_model``,
``test_from_pretrained_no_processing``, ``test_process_weights_inplace``,
``test_pos_embed_hook``) with their assertions as written. Hub models become the random
local GPT-2 of ``conftest.py``, so the expected losses TransformerLens stored for its hub
models are replaced by the loss transformer-lens computes on the same weights and text.
Tests that need other hub models, a GPU or a revision are left out; two are marked as
documented differences. The rest checks each new method's values, shapes and errors
against transformer-lens's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoTokenizer

from mitk import HookedTransformer
from tests.parity.test_transformer_lens import _tl_hooked_transformer, tl_deprecation

pytestmark = tl_deprecation
TEXTS = ["the cat sat on a mat", "a big red dog ran", "it was late"]


def _tl(gpt2_dir: Path, padding_side: str = "right") -> Any:
    """transformer-lens's HookedTransformer on the same weights, with the tokenizer and
    TransformerLens's own defaults (prepend BOS)."""
    tl = _tl_hooked_transformer(gpt2_dir)
    tl.set_tokenizer(AutoTokenizer.from_pretrained(gpt2_dir), padding_side)
    tl.cfg.default_prepend_bos = True
    return tl


@pytest.fixture(scope="module")
def tl(gpt2_dir: Path) -> Any:
    return _tl(gpt2_dir)


# --- ported: TransformerLens tests/acceptance/test_hooked_transformer.py ----------------
text = "Hello world!"


@pytest.fixture(scope="module")
def loss_store(gpt2_dir: Path) -> dict[str, float]:
    """TransformerLens's stored losses, recomputed by transformer-lens on the local weights."""
    with torch.no_grad():
        return {"gpt2-small": _tl(gpt2_dir)(text, return_type="loss").item()}


@pytest.fixture(scope="module")
def no_processing(gpt2_dir: Path) -> list[tuple[str, float]]:
    tl = _tl(gpt2_dir)  # TransformerLens's from_pretrained_no_processing: no processing at all
    with torch.no_grad():
        return [(str(gpt2_dir), tl(text, return_type="loss").item())]


def test_model(gpt2_dir: Path, loss_store: dict[str, float]):
    for _name, expected_loss in loss_store.items():  # TransformerLens: parametrised over names
        # Runs the model on short text and checks if the loss is as expected
        model = HookedTransformer.from_pretrained(gpt2_dir)  # TransformerLens: (name)
        loss = model(text, return_type="loss")
        assert (loss.item() - expected_loss) < 4e-5
        assert abs(loss.item() - expected_loss) < 4e-5  # mitk: the one-sided check, both ways


@pytest.mark.xfail(
    reason="documented difference: mitk's from_pretrained loads unprocessed (processing is "
    "opt-in), so from_pretrained(name) equals from_pretrained_no_processing(name), not the "
    "fold_ln/center_* load TransformerLens's from_pretrained gives",
    raises=AssertionError,
    strict=True,
)
def test_from_pretrained_no_processing(no_processing: list[tuple[str, float]]):
    for name, expected_loss in no_processing:  # TransformerLens: parametrised
        # Checks if manually overriding the boolean flags in from_pretrained
        # is equivalent to using from_pretrained_no_processing

        model_ref = HookedTransformer.from_pretrained_no_processing(name)
        model_ref_config = model_ref.cfg
        reff_loss = model_ref(text, return_type="loss")
        del model_ref
        model_override = HookedTransformer.from_pretrained(
            name,
            fold_ln=False,
            center_writing_weights=False,
            center_unembed=False,
            refactor_factored_attn_matrices=False,
        )
        assert model_ref_config == model_override.cfg

        if name != "redwood_attn_2l":  # TODO can't be loaded with from_pretrained
            # Do the converse check, i.e. check that overriding boolean flags in
            # from_pretrained_no_processing is equivalent to using from_pretrained
            model_ref = HookedTransformer.from_pretrained(name)
            model_ref_config = model_ref.cfg
            reff_loss = model_ref(text, return_type="loss")
            del model_ref
            model_override = HookedTransformer.from_pretrained_no_processing(
                name,
                fold_ln=True,
                center_writing_weights=True,
                center_unembed=True,
                refactor_factored_attn_matrices=False,
            )
            assert model_ref_config == model_override.cfg

        # also check losses
        print(reff_loss.item())
        assert (reff_loss.item() - expected_loss) < 4e-5


def test_from_pretrained_no_processing_first_half(no_processing: list[tuple[str, float]]):
    """The part of the test above that holds in mitk: the flags off are the same load."""
    for name, expected_loss in no_processing:
        model_ref = HookedTransformer.from_pretrained_no_processing(name)
        model_override = HookedTransformer.from_pretrained(
            name, fold_ln=False, center_writing_weights=False, center_unembed=False,
            refactor_factored_attn_matrices=False,
        )  # fmt: skip
        assert model_ref.cfg == model_override.cfg
        assert abs(model_ref(text, return_type="loss").item() - expected_loss) < 4e-5
        flagged = HookedTransformer.from_pretrained_no_processing(
            name, fold_ln=True, center_writing_weights=True, center_unembed=True
        )
        assert abs(flagged(text, return_type="loss").item() - expected_loss) < 4e-5


@pytest.mark.xfail(
    reason="documented difference: folded norms stay mitk LayerNorms with w=1, b=0 "
    "(processing.py's design note) instead of becoming TransformerLens's LayerNormPre",
    raises=AssertionError,
    strict=True,
)
def test_process_weights_inplace(gpt2_dir: Path, loss_store: dict[str, float]):
    """Check that process_weights_ works"""
    from transformer_lens.components import LayerNormPre

    model = HookedTransformer.from_pretrained_no_processing(gpt2_dir)  # TransformerLens: hub
    model.process_weights_()
    loss = model.forward(text, return_type="loss")
    assert (loss.item() - loss_store["gpt2-small"]) < 4e-5
    assert isinstance(model.ln_final, LayerNormPre)


def test_process_weights_inplace_loss(gpt2_dir: Path, loss_store: dict[str, float]) -> None:
    """The part of the test above that holds in mitk, with the check made two-sided."""
    model = HookedTransformer.from_pretrained_no_processing(gpt2_dir)
    model.process_weights_()
    loss = model.forward(text, return_type="loss")
    assert abs(loss.item() - loss_store["gpt2-small"]) < 4e-5
    assert torch.equal(model.ln_final.w, torch.ones_like(model.ln_final.w))


@torch.no_grad()
def test_pos_embed_hook(gpt2_dir: Path):
    """
    Checks that pos embed hooks:
    - do not permanently change the pos embed
    - can be used to alter the pos embed for a specific batch element
    """
    model = HookedTransformer.from_pretrained(gpt2_dir)  # TransformerLens: "gpt2-small"
    initial_W_pos = model.W_pos.detach().clone()

    def remove_pos_embed(z, hook):
        z[:] = 0.0
        return z

    _ = model.run_with_hooks("Hello, world", fwd_hooks=[("hook_pos_embed", remove_pos_embed)])

    # Check that pos embed has not been permanently changed
    assert (model.W_pos == initial_W_pos).all()

    def edit_pos_embed(z, hook):
        sequence_length = z.shape[1]
        z[1, :] = 0.0
        # Check that the second batch element is zeroed
        assert (z[1, :] == 0.0).all()
        # Check that the first batch element is unchanged
        assert (z[0, :] == initial_W_pos[:sequence_length]).all()
        return z

    _ = model.run_with_hooks(
        ["Hello, world", "Goodbye, world"],
        fwd_hooks=[("hook_pos_embed", edit_pos_embed)],
    )


# --- parity: tokens, positions, directions ----------------------------------------------


@pytest.mark.parametrize("prepend_bos", [None, True, False])
@pytest.mark.parametrize("padding_side", [None, "left", "right"])
def test_text_methods_match(gpt2: HookedTransformer, tl: Any, prepend_bos, padding_side) -> None:
    kwargs: dict[str, Any] = {}
    if prepend_bos is not None:
        kwargs["prepend_bos"] = prepend_bos
    if padding_side is not None:
        kwargs["padding_side"] = padding_side
    assert torch.equal(gpt2.to_tokens(TEXTS, **kwargs), tl.to_tokens(TEXTS, **kwargs))
    assert gpt2.to_str_tokens(TEXTS[0], **kwargs) == tl.to_str_tokens(TEXTS[0], **kwargs)
    assert gpt2.to_str_tokens(TEXTS, **kwargs) == tl.to_str_tokens(TEXTS, **kwargs)
    for word, mode in [("sat", "first"), ("the", "last"), ("cat", "last")]:
        text = "the cat sat on the cat"
        ours = gpt2.get_token_position(word, text, mode=mode, **kwargs)
        assert ours == tl.get_token_position(word, text, mode=mode, **kwargs)
    with torch.no_grad():
        if padding_side is not None:  # TransformerLens's forward takes padding_side for text
            logits = gpt2(TEXTS, **kwargs)
            their = tl(TEXTS, **kwargs)
            mask = gpt2.tokenize(TEXTS, prepend_bos, padding_side)[1].bool()
            torch.testing.assert_close(logits[mask], their[mask], atol=1e-4, rtol=0)


def test_single_tokens_and_strings_match(gpt2: HookedTransformer, tl: Any) -> None:
    for word in ["cat", "mat", "<|endoftext|>"]:
        assert gpt2.to_single_token(word) == tl.to_single_token(word)
    for token in [0, 3, 19]:
        assert gpt2.to_single_str_token(token) == tl.to_single_str_token(token)
    ids = torch.tensor([[0, 2, 3], [4, 5, 6]])
    assert gpt2.to_string(ids) == tl.to_string(ids)
    assert gpt2.to_string(ids[0]) == tl.to_string(ids[0])
    assert gpt2.to_string([2, 3]) == tl.to_string([2, 3])


@pytest.mark.parametrize(
    "tokens",
    [
        3,
        "cat",
        torch.tensor(3),
        torch.tensor([3]),
        torch.tensor([3, 4]),
        torch.tensor([[3, 4, 5], [6, 7, 8]]),
    ],
    ids=["int", "str", "0-d", "1-element", "pos", "batch-pos"],
)
def test_tokens_to_residual_directions_match(gpt2: HookedTransformer, tl: Any, tokens) -> None:
    ours, theirs = (
        gpt2.tokens_to_residual_directions(tokens),
        tl.tokens_to_residual_directions(tokens),
    )
    assert ours.shape == theirs.shape
    torch.testing.assert_close(ours, theirs)


def test_errors_match(gpt2: HookedTransformer, tl: Any) -> None:
    """Where transformer-lens raises, mitk raises an error of the same (Python) kind."""
    cases = [
        (AssertionError, lambda m: m.to_single_token("the cat")),
        (AssertionError, lambda m: m.get_token_position("mat", "the cat")),
        (AssertionError, lambda m: m.get_token_position(2, torch.tensor([[2, 3], [2, 3]]))),
        (ValueError, lambda m: m.get_token_position("cat", "the cat", mode="middle")),
        # a float is refused by the annotation first under test (TypeError), else ValueError
        ((ValueError, TypeError), lambda m: m.tokens_to_residual_directions(3.5)),
        (
            AssertionError,
            lambda m: m.loss_fn(torch.zeros(1, 3, 97), torch.zeros(1, 3).long(), torch.ones(1, 2)),
        ),
    ]
    for kind, call in cases:
        for model in (gpt2, tl):
            with pytest.raises(kind):
                call(model)


# --- parity: embedding, losses, return types, unembed hooks -------------------------------


@pytest.mark.parametrize("side", ["left", "right"])
def test_input_to_embed_matches(gpt2_dir: Path, side: str) -> None:
    ours = HookedTransformer.from_pretrained(gpt2_dir, default_padding_side=side)
    tl = _tl(gpt2_dir, side)
    with torch.no_grad():
        for given in (TEXTS, TEXTS[0], ours.to_tokens(TEXTS)):
            resid, tokens, short, mask = ours.input_to_embed(given)
            their_resid, their_tokens, their_short, their_mask = tl.input_to_embed(given)
            assert torch.equal(tokens, their_tokens) and short is None and their_short is None
            if their_mask is not None:
                assert torch.equal(mask, their_mask)
            elif mask is not None:  # right-padded text: mitk masks the padding, TL gives None
                assert isinstance(given, list) and side == "right"
                assert torch.equal(mask, ours.tokenize(given)[1])
            if mask is not None:
                resid, their_resid = resid[mask.bool()], their_resid[mask.bool()]
            torch.testing.assert_close(resid, their_resid, atol=1e-6, rtol=0)


def test_losses_and_return_types_match(gpt2: HookedTransformer, tl: Any) -> None:
    tokens = torch.randint(0, 97, (3, 12), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(tokens)
    mask[0, :4] = 0
    mask[2, 9:] = 0
    with torch.no_grad():
        for attention_mask in (None, mask):
            for per_token in (False, True):
                kw = dict(attention_mask=attention_mask, loss_per_token=per_token)
                ours, theirs = (
                    gpt2(tokens, return_type="both", **kw),
                    tl(tokens, return_type="both", **kw),
                )
                torch.testing.assert_close(ours.logits[mask.bool()], theirs.logits[mask.bool()],
                                           atol=1e-4, rtol=0)  # fmt: skip
                torch.testing.assert_close(ours.loss, theirs.loss, atol=1e-5, rtol=0)
                loss = gpt2(tokens, return_type="loss", **kw)
                torch.testing.assert_close(loss, tl(tokens, return_type="loss", **kw), atol=1e-5,
                                           rtol=0)  # fmt: skip
                logits = tl(tokens, attention_mask=attention_mask)
                torch.testing.assert_close(
                    gpt2.loss_fn(logits, tokens, attention_mask, per_token),
                    tl.loss_fn(logits, tokens, attention_mask, per_token), atol=1e-6, rtol=0,
                )  # fmt: skip
            assert gpt2(tokens, attention_mask=attention_mask, return_type=None) is None
            assert tl(tokens, attention_mask=attention_mask, return_type=None) is None


def test_unembed_hooks_match(gpt2: HookedTransformer, tl: Any) -> None:
    tokens = torch.randint(0, 97, (2, 10), generator=torch.Generator().manual_seed(5))
    names = ["unembed.hook_in", "unembed.hook_out"]
    for return_type in ["logits", "loss"]:
        with torch.no_grad():
            _, ours = gpt2.run_with_cache(tokens, return_type=return_type, names_filter=names)
            _, theirs = tl.run_with_cache(tokens, return_type=return_type, names_filter=names)
        for name in names:
            torch.testing.assert_close(ours[name], theirs[name], atol=1e-4, rtol=0)


def test_process_weights_inplace_matches(gpt2_dir: Path) -> None:
    ours = HookedTransformer.from_pretrained(gpt2_dir).process_weights_()
    tl = _tl_hooked_transformer(gpt2_dir)
    tl.process_weights_()
    for attr in ["W_E", "W_pos", "W_Q", "W_K", "W_V", "W_O", "b_Q", "b_V", "b_O", "W_in",
                 "b_in", "W_out", "b_out", "W_U", "b_U"]:  # fmt: skip
        torch.testing.assert_close(getattr(ours, attr), getattr(tl, attr), atol=1e-5, rtol=0,
                                   msg=lambda m, a=attr: f"{a}: {m}")  # fmt: skip
