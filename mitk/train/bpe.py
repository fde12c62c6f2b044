"""A byte-level BPE tokenizer trained from texts (Hugging Face ``tokenizers``), ready to save.

Byte-level, as GPT-2's: any string encodes (no unknown token) and decodes back
exactly. Special tokens take the first ids: ``BOS`` = 0 (the id
``mitk.analysis.detectors`` prepends by default), ``EOS`` = 1, ``PAD`` = 2.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
SPECIAL_TOKENS = (BOS, EOS, PAD)


def train_bpe(texts: Iterable[str], vocab_size: int, n_ctx: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with ``vocab_size`` ids (special tokens included).

    Deterministic for the same texts and ``tokenizers`` version. The tokenizer
    adds no special tokens itself: ``to_tokens`` prepends BOS (TransformerLens's
    ``prepend_bos``). ``n_ctx`` becomes its ``model_max_length``.
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        model_max_length=n_ctx,
        clean_up_tokenization_spaces=False,
    )


def token_bytes(tokenizer: PreTrainedTokenizerFast) -> list[int]:
    """UTF-8 bytes each id stands for (0 for special tokens), for bits-per-byte."""
    # byte-level vocab entries spell one printable character per byte
    lengths = [0] * len(tokenizer)
    for piece, idx in tokenizer.get_vocab().items():
        if piece not in SPECIAL_TOKENS:
            lengths[idx] = len(piece)
    return lengths
