"""TransformerLens's attention-mask, left-padding and prepend-BOS tests, ported to mitk.

Ported with their assertions as written from TransformerLens's
``tests/integration/test_attention_mask.py``, ``tests/integration/test_left_padding.py``
and ``tests/integration/test_prepend_bos.py``. Only imports and model construction
changed: hub models (``solu-1l``, ``gpt2-small``, ``gpt2``) become random local GPT-2
checkpoints with the word tokenizer of ``tests/checkpoints.py`` (BOS = EOS = PAD, as
GPT-2's), seven layers where a test reads layer 6; the ``facebook/opt-125m``
parametrisation is dropped (mitk does not load OPT); ``utils.get_attention_mask`` is
mitk's ``get_attention_mask``; ``HookedTransformerKeyValueCache`` is ``KVCache``. The
prompts are kept, so words outside the tiny vocabulary read as ``<unk>``. Tests that
cannot pass because of a documented mitk difference are marked with the reason. mitk's
own padding tests follow.
"""

# TransformerLens's test code is kept as written, so its style is too
# ruff: noqa: B905, RUF012, RUF017

from __future__ import annotations

from dataclasses import FrozenInstanceError
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st
import pytest
import torch
from transformers import AutoTokenizer

from mitk import HookedTransformer, TransformerConfig, utils
from mitk.model import KVCache
from mitk.model.tokenization import get_attention_mask
from tests.checkpoints import WORDS, save_gpt2

FROZEN_CONFIG = pytest.mark.xfail(
    reason="documented difference: mitk's config is frozen; set default_prepend_bos with "
    "from_pretrained(..., default_prepend_bos=False) or pass prepend_bos= per call",
    raises=FrozenInstanceError,
    strict=True,
)

# --- ported: TransformerLens tests/integration/test_attention_mask.py ------------------


def test_attention_mask():
    # Verify the attention mask attends properly, including for low attention scores
    cfg = TransformerConfig(  # TransformerLens: d_head=1, attn_only=True, attention_dir="causal"
        d_head=1,
        d_model=12,
        n_heads=12,
        d_vocab=2,
        n_ctx=5,
        n_layers=1,
        d_mlp=0,
        causal=True,
    )
    model = HookedTransformer(cfg)
    input_length = 5
    input = torch.ones((1, input_length), dtype=torch.int64)
    layer = 0
    low_attn_score = 1e-6
    ones_input_matrix = torch.ones((input_length, input_length))
    masked = torch.triu(ones_input_matrix, diagonal=1).bool()

    def attn_scores_hook(attn_scores, hook):
        assert torch.all(attn_scores[:, :, masked] == float("-inf")), (
            "Attention scores excluded by the mask are not being set to -inf"
        )

        # Set low attention scores that are attended to by the mask
        attn_scores[:, :, ~masked] = low_attn_score

        return attn_scores

    def attn_hook(attn, hook):
        assert torch.all(attn[:, :, masked] == 0), "Attention pattern attends outside the mask"

        return attn

    fwd_hooks = [
        (utils.get_act_name("attn_scores", layer), attn_scores_hook),
        (utils.get_act_name("attn", layer), attn_hook),
    ]

    model.run_with_hooks(input, fwd_hooks=fwd_hooks)


def test_masked_tokens(gpt2: HookedTransformer):
    """Test that masking tokens works as expected."""
    prompts = [
        "Hello world!",
        "The quick brown fox jumps over the lazy dog.",
    ]
    model = gpt2  # TransformerLens: HookedTransformer.from_pretrained("solu-1l")
    tokens = model.to_tokens(prompts)

    # Part 1: If the mask is all ones, the output should be the same as if there was no mask.
    full_mask = torch.ones_like(tokens)
    no_mask_out = model(tokens)
    full_mask_out = model(tokens, attention_mask=full_mask)
    assert torch.allclose(no_mask_out, full_mask_out), "Full mask should be equivalent to no mask"

    # Part 2: If the mask has a column of zeros, the output should be the same as if that token
    # position was removed from the input.
    remove_tok_idx = 2
    edited_tokens = torch.cat([tokens[:, :remove_tok_idx], tokens[:, remove_tok_idx + 1 :]], dim=1)
    edited_mask = full_mask.clone()
    edited_mask[:, remove_tok_idx] = 0
    edited_no_mask_out = model(edited_tokens)
    edited_mask_out = model(tokens, attention_mask=edited_mask)
    edited_mask_out = torch.cat(
        [edited_mask_out[:, :remove_tok_idx], edited_mask_out[:, remove_tok_idx + 1 :]], dim=1
    )
    assert torch.allclose(edited_no_mask_out, edited_mask_out, atol=1e-4), (
        "Edited mask should be equivalent to no mask"
    )


# --- ported: TransformerLens tests/integration/test_left_padding.py --------------------


@pytest.fixture(scope="module")
def seven_layer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """gpt2-small's stand-in: TransformerLens's test reads layer 6 ("k6a")."""
    return save_gpt2(tmp_path_factory.mktemp("gpt2_7l"), n_layer=7, n_embd=32, n_head=4)


class TestLeftPadding:
    prompts = [
        "Hello world!",
        "How are you today?",
        "I'm fine, thank you.",
        "I am happy.",
    ]

    # helpers
    def check_outputs_identity(
        self,
        i,
        single_outputs,
        left_outputs,
        right_outputs,
        left_token_start,
        left_token_end,
        right_token_start,
        right_token_end,
    ):
        atol = 1e-4

        assert torch.allclose(
            left_outputs[i, left_token_start:left_token_end, :],
            right_outputs[i, right_token_start:right_token_end, :],
            atol=atol,
        )

        assert torch.allclose(
            left_outputs[i, left_token_start:left_token_end, :],
            single_outputs[0],
            atol=atol,
        )

        assert torch.allclose(
            right_outputs[i, right_token_start:right_token_end, :],
            single_outputs[0],
            atol=atol,
        )

    # fixtures
    @pytest.fixture(scope="class", params=["gpt2-small"])
    @classmethod  # pytest 9 deprecates class-scoped fixtures on instances
    def model_name(cls, request, seven_layer_dir):
        return seven_layer_dir  # TransformerLens: the hub name request.param

    @pytest.fixture(scope="class")
    @classmethod
    def model(cls, model_name):
        model = HookedTransformer.from_pretrained(model_name)
        return model

    # tests
    @pytest.mark.parametrize("padding_side", ["left", "right"])
    @pytest.mark.parametrize("prepend_bos", [True, False])
    def test_pos_embed(self, model, padding_side, prepend_bos):
        # setup
        model.tokenizer.padding_side = padding_side

        prompts = self.prompts
        tokens = model.to_tokens(prompts, prepend_bos=prepend_bos)
        str_tokens = model.to_str_tokens(prompts, prepend_bos=prepend_bos)

        attention_mask = get_attention_mask(model.tokenizer, tokens, prepend_bos)  # [batch pos]

        output_pos_embed = model.pos_embed(
            tokens, 0, attention_mask=attention_mask
        )  # [batch pos d_model]

        # check if the output pos_embeds have the correct shape
        assert output_pos_embed.shape == (
            tokens.shape[0],
            tokens.shape[1],
            model.pos_embed.W_pos.shape[1],
        )

        # check if the target pos_embeds are the same as the output pos_embeds
        target_position_ids = torch.tensor(
            sum([list(range(len(t))) for t in str_tokens], []), device=tokens.device
        )
        target_output_pos_embed = model.pos_embed.W_pos[target_position_ids, :]

        attended_output_pos_embed = output_pos_embed[attention_mask.bool()]

        assert torch.allclose(attended_output_pos_embed, target_output_pos_embed, atol=1e-4)

        # padded positions should have zero pos_embed
        assert output_pos_embed[~attention_mask.bool()].sum() == 0

    @pytest.mark.skipif(
        not hasattr(KVCache, "append_attention_mask"),
        reason="uses TransformerLens's KV-cache method append_attention_mask, which mitk's "
        "KVCache does not have: the forward keeps the cache's mask itself",
    )
    @pytest.mark.parametrize("padding_side", ["left", "right"])
    @pytest.mark.parametrize("prepend_bos", [True, False])
    def test_pos_embed_with_cache(self, model, padding_side, prepend_bos):
        # setup
        model.tokenizer.padding_side = padding_side

        prompts = self.prompts
        tokens = model.to_tokens(prompts, prepend_bos=prepend_bos)
        tokens_2 = model.to_tokens(prompts, prepend_bos=False)

        past_kv_cache = KVCache.init_cache(model.cfg, model.cfg.device, tokens.shape[0])

        str_tokens = model.to_str_tokens(prompts, prepend_bos=prepend_bos)
        str_tokens_2 = model.to_str_tokens(prompts, prepend_bos=False)

        attention_mask = get_attention_mask(model.tokenizer, tokens, prepend_bos)  # [batch pos]
        past_kv_cache.append_attention_mask(attention_mask)
        attention_mask_2 = get_attention_mask(model.tokenizer, tokens_2, False)  # [batch pos]
        cached_attention_mask = past_kv_cache.append_attention_mask(attention_mask_2)

        output_pos_embed = model.pos_embed(
            tokens_2, tokens.shape[1], attention_mask=cached_attention_mask
        )  # [batch pos d_model]

        # check if the target pos_embeds are the same as the output pos_embeds
        target_position_ids = torch.tensor(
            sum(
                [
                    list(range(len(t1), len(t1) + len(t2)))
                    for t1, t2 in zip(str_tokens, str_tokens_2)
                ],
                [],
            ),
            device=tokens.device,
        )
        target_output_pos_embed = model.pos_embed.W_pos[target_position_ids, :]

        attended_output_pos_embed = output_pos_embed[attention_mask_2.bool()]

        assert torch.allclose(attended_output_pos_embed, target_output_pos_embed, atol=1e-4)

        # padded positions should have zero pos_embed
        assert output_pos_embed[~attention_mask_2.bool()].sum() == 0

    def test_left_padding_by_comparing_outputs(self, model):
        prompts = self.prompts

        num_str_tokens_list = [len(t) for t in model.to_str_tokens(prompts)]

        # left padding output
        model.tokenizer.padding_side = "left"
        left_logits, left_cache = model.run_with_cache(prompts)
        left_last_logits = left_logits[:, -1, :]
        left_first_token_positions = left_logits.shape[1] - torch.tensor(
            num_str_tokens_list, device=left_logits.device
        )
        left_first_logits = left_logits[
            torch.arange(len(prompts)), left_first_token_positions, :
        ].squeeze(1)

        # right padding output
        model.tokenizer.padding_side = "right"
        right_logits, right_cache = model.run_with_cache(prompts)
        right_last_token_positions = (
            torch.tensor(num_str_tokens_list, device=right_logits.device) - 1
        )
        right_last_logits = right_logits[
            torch.arange(len(prompts)), right_last_token_positions, :
        ].squeeze(1)
        right_first_logits = right_logits[:, 0, :]

        # check if the left and right padding outputs are the same for the first and last tokens
        assert torch.allclose(left_last_logits, right_last_logits, atol=1e-4)
        assert torch.allclose(left_first_logits, right_first_logits, atol=1e-4)

        # check if the left and right padding outputs are the same for all tokens
        # and if the batched padded outputs are the same as the single prompt outputs
        right_token_start = 0
        left_token_end = left_logits.shape[1]
        for i, (prompt, left_token_start, right_token_end) in enumerate(
            zip(
                prompts,
                left_first_token_positions.tolist(),
                (right_last_token_positions + 1).tolist(),
            )
        ):
            single_logits, single_cache = model.run_with_cache(prompt)

            assert (
                right_token_end - right_token_start
                == left_token_end - left_token_start
                == single_logits.shape[1]
            )

            self.check_outputs_identity(
                i,
                single_logits,
                left_logits,
                right_logits,
                left_token_start,
                left_token_end,
                right_token_start,
                right_token_end,
            )

            # check cache
            for name in ["k6a", "pre2", "embed", "k6", "scale4ln1", "pre5"]:
                self.check_outputs_identity(
                    i,
                    single_cache[name],
                    left_cache[name],
                    right_cache[name],
                    left_token_start,
                    left_token_end,
                    right_token_start,
                    right_token_end,
                )


# --- ported: TransformerLens tests/integration/test_prepend_bos.py ---------------------


class TestPrependBos:
    prompt = "Hello world!"

    # helper functions
    def get_num_tokens_in_prompt(self, model, prompt, intended_prepend_bos):
        tokenizer = AutoTokenizer.from_pretrained(model.tokenizer.name_or_path, add_bos_token=False)
        tokens = tokenizer(
            prompt,
        )["input_ids"]

        return len(tokens) + int(intended_prepend_bos)

    def check_first_token(self, model, str_tokens, tokens, intended_prepend_bos):
        if intended_prepend_bos:
            assert str_tokens[0] == model.tokenizer.bos_token
            assert tokens[0][0] == model.tokenizer.bos_token_id
        else:
            assert str_tokens[0] != model.tokenizer.bos_token
            assert tokens[0][0] != model.tokenizer.bos_token_id

    def check_tokens_length(self, model, logits, str_tokens, tokens, intended_prepend_bos):
        expected_num_tokens = self.get_num_tokens_in_prompt(
            model, self.prompt, intended_prepend_bos
        )
        assert logits.shape[1] == len(str_tokens) == tokens.shape[1] == expected_num_tokens

    # fixtures
    @pytest.fixture(scope="class", params=["gpt2"])
    @classmethod  # pytest 9 deprecates class-scoped fixtures on instances
    def model_name(cls, request, gpt2_dir):
        return gpt2_dir  # TransformerLens: the hub name request.param

    @pytest.fixture(scope="class")
    @classmethod
    def model(cls, model_name):
        return HookedTransformer.from_pretrained(model_name)

    # tests
    def test_default_prepend_bos(self, model_name):
        intended_prepend_bos = True

        model = HookedTransformer.from_pretrained(model_name)
        assert model.cfg.default_prepend_bos == intended_prepend_bos, (
            "Default prepend_bos should be True"
        )

        logits = model(self.prompt)  # [batch pos d_vocab]
        str_tokens = model.to_str_tokens(self.prompt)
        tokens = model.to_tokens(self.prompt)  # [batch pos]

        self.check_first_token(model, str_tokens, tokens, intended_prepend_bos)
        self.check_tokens_length(model, logits, str_tokens, tokens, intended_prepend_bos)

        bos_position = model.get_token_position(model.tokenizer.bos_token_id, self.prompt)
        assert bos_position == 0

    def test_default_prepend_bos_to_false(self, model_name):
        intended_prepend_bos = False

        model = HookedTransformer.from_pretrained(
            model_name, default_prepend_bos=intended_prepend_bos
        )

        logits = model(self.prompt)  # [batch pos d_vocab]
        str_tokens = model.to_str_tokens(self.prompt)
        tokens = model.to_tokens(self.prompt)

        self.check_first_token(model, str_tokens, tokens, intended_prepend_bos)
        self.check_tokens_length(model, logits, str_tokens, tokens, intended_prepend_bos)

    @FROZEN_CONFIG
    @pytest.mark.parametrize("intended_prepend_bos", [True, False])
    def test_override_prepend_bos(self, model, intended_prepend_bos):
        for default_prepend_bos in [True, False]:
            model.cfg.default_prepend_bos = default_prepend_bos

            logits = model(self.prompt, prepend_bos=intended_prepend_bos)  # [batch pos d_vocab]
            str_tokens = model.to_str_tokens(self.prompt, prepend_bos=intended_prepend_bos)
            tokens = model.to_tokens(self.prompt, prepend_bos=intended_prepend_bos)

            self.check_first_token(model, str_tokens, tokens, intended_prepend_bos)
            self.check_tokens_length(model, logits, str_tokens, tokens, intended_prepend_bos)

    @FROZEN_CONFIG
    def test_prepend_bos_with_get_token_position(self, model_name):
        model = HookedTransformer.from_pretrained(model_name)

        bos_position = model.get_token_position(model.tokenizer.bos_token_id, self.prompt)
        assert bos_position == 0

        with pytest.raises(AssertionError):
            bos_position = model.get_token_position(
                model.tokenizer.bos_token_id, self.prompt, prepend_bos=False
            )

        model.cfg.default_prepend_bos = False
        with pytest.raises(AssertionError):
            bos_position = model.get_token_position(model.tokenizer.bos_token_id, self.prompt)

        bos_position = model.get_token_position(
            model.tokenizer.bos_token_id, self.prompt, prepend_bos=True
        )
        assert bos_position == 0

    def test_same_tokenization(self, model):
        prompt = self.prompt
        prompts = [
            "Italy is in Europe.",
            "Pyeongchang Olympics was held in 2018",
            "2023-09-09",
            "287594812673495",
        ]

        model.tokenizer.padding_side = "right"

        for input in [prompt, prompts]:
            tokens_with_bos = model.to_tokens(input, prepend_bos=True)
            tokens_without_bos = model.to_tokens(input, prepend_bos=False)
            assert tokens_with_bos[..., 1:].equal(tokens_without_bos)

            str_tokens_with_bos = model.to_str_tokens(input, prepend_bos=True)
            str_tokens_without_bos = model.to_str_tokens(input, prepend_bos=False)

            if isinstance(str_tokens_with_bos[0], list):
                for i in range(len(str_tokens_with_bos)):
                    assert str_tokens_with_bos[i][1:] == str_tokens_without_bos[i]
            else:
                assert str_tokens_with_bos[1:] == str_tokens_without_bos


# --- mitk's own: what the frozen-config tests check, and padding as a property ----------


def test_prepend_bos_overrides_either_default(gpt2_dir: Path) -> None:
    """test_override_prepend_bos and test_prepend_bos_with_get_token_position without
    mutating the config: each default, each override."""
    prompt = "the cat sat"
    for default in [True, False]:
        model = HookedTransformer.from_pretrained(gpt2_dir, default_prepend_bos=default)
        assert model.cfg.default_prepend_bos is default
        bos = model.tokenizer.bos_token_id
        assert bool(model.to_tokens(prompt)[0, 0] == bos) is default
        for prepend in [True, False]:
            tokens = model.to_tokens(prompt, prepend_bos=prepend)
            assert tokens.shape[1] == 3 + prepend and bool(tokens[0, 0] == bos) is prepend
            assert model(prompt, prepend_bos=prepend).shape[1] == 3 + prepend
            assert len(model.to_str_tokens(prompt, prepend_bos=prepend)) == 3 + prepend
            if prepend:
                assert model.get_token_position(bos, prompt, prepend_bos=True) == 0
            else:
                with pytest.raises(AssertionError, match="does not occur"):
                    model.get_token_position(bos, prompt, prepend_bos=False)


@settings(max_examples=20, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 6), min_size=1, max_size=4),
    side=st.sampled_from(["left", "right"]),
    prepend_bos=st.booleans(),
    seed=st.integers(0, 10_000),
)
def test_guessed_mask_matches_the_tokenizer_mask(
    gpt2: HookedTransformer, lengths: list[int], side: str, prepend_bos: bool, seed: int
) -> None:
    """get_attention_mask recovers tokenize's mask whenever no real token is a pad id, and
    a left-padded token tensor then runs as its text does."""
    gen = torch.Generator().manual_seed(seed)
    words = [" ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (n,), generator=gen))
             for n in lengths]  # fmt: skip
    tokens, mask = gpt2.tokenize(words, prepend_bos=prepend_bos, padding_side=side)
    guessed = get_attention_mask(gpt2.tokenizer, tokens, prepend_bos, side)
    assert torch.equal(guessed, mask)
    if side == "left":
        with torch.no_grad():
            from_tokens = gpt2(tokens, prepend_bos=prepend_bos, padding_side="left")
            from_text = gpt2(words, prepend_bos=prepend_bos, padding_side="left")
        torch.testing.assert_close(from_tokens[mask.bool()], from_text[mask.bool()])
