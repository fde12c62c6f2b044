"""Random-weight checkpoints and an offline tokenizer for tests (nothing touches a model hub)."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

WORDS = [
    "the",
    "cat",
    "sat",
    "on",
    "a",
    "mat",
    "and",
    "dog",
    "ran",
    "to",
    "big",
    "red",
    "house",
    "when",
    "it",
    "was",
    "very",
    "late",
]
SPECIALS = ["<|endoftext|>", "<unk>"]


def word_tokenizer() -> PreTrainedTokenizerFast:
    """A whitespace word-level tokenizer over a tiny vocabulary, built offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {w: i for i, w in enumerate([*SPECIALS, *WORDS])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        unk_token="<unk>",
        pad_token="<|endoftext|>",
    )


def gpt2_hf_model(
    n_layer: int = 3,
    n_embd: int = 64,
    n_head: int = 4,
    vocab_size: int = 97,
    n_positions: int = 64,
    activation: str = "gelu_new",
    seed: int = 0,
) -> GPT2LMHeadModel:
    """A randomly initialised GPT-2 in eval mode, with non-trivial norm weights and biases."""
    torch.manual_seed(seed)
    cfg = GPT2Config(
        n_layer=n_layer,
        n_embd=n_embd,
        n_head=n_head,
        vocab_size=vocab_size,
        n_positions=n_positions,
        activation_function=activation,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    model = GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():
        # HF inits norms to (1, 0) and biases to 0; randomise them so parity covers those terms
        for name, param in model.named_parameters():
            if "ln" in name or name.endswith("bias"):
                param.add_(torch.randn_like(param) * 0.1)
    return model


def save_gpt2(directory: Path, with_tokenizer: bool = True, **kwargs: object) -> Path:
    """Write a random GPT-2 (and optionally the word tokenizer) as a HF directory."""
    model = gpt2_hf_model(**kwargs)  # type: ignore[arg-type]
    model.save_pretrained(directory)
    if with_tokenizer:
        word_tokenizer().save_pretrained(directory)
    return directory


def padded_prompt_pairs(
    lengths: tuple[int, ...] = (8, 5, 6), d_vocab: int = 40, seed: int = 3
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded clean/corrupted pairs differing at position 1: (clean, corrupted, mask, last).

    ``last`` is each prompt's last real position, where patching metrics read the answer.
    """
    gen = torch.Generator().manual_seed(seed)
    clean = torch.randint(0, d_vocab, (len(lengths), max(lengths)), generator=gen)
    corrupted = clean.clone()
    corrupted[:, 1] = (clean[:, 1] + 11) % d_vocab
    mask = torch.ones_like(clean)
    for row, n in enumerate(lengths):
        mask[row, n:] = 0
    return clean, corrupted, mask, torch.tensor(lengths) - 1
