"""Text in and out: the tokenizer methods of the transformer, when one is attached."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from mitk.config import TransformerConfig
from mitk.errors import InvalidTokensError, MitkError


class NoTokenizerError(MitkError, RuntimeError):
    """A text method was called on a model that has no tokenizer attached."""


class TextInterface:
    """Mixin: ``to_tokens``, ``to_str_tokens``, ``to_string``, ``tokenize`` over a HF tokenizer."""

    cfg: TransformerConfig
    tokenizer: Any

    def _require_tokenizer(self) -> Any:
        if self.tokenizer is None:
            raise NoTokenizerError(
                "this model has no tokenizer; pass token id tensors, or attach one with "
                "model.set_tokenizer(transformers.AutoTokenizer.from_pretrained(path))"
            )
        return self.tokenizer

    def set_tokenizer(self, tokenizer: Any) -> None:
        """Attach a Hugging Face tokenizer; a pad token is borrowed from EOS when missing."""
        if tokenizer is not None and tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.tokenizer = tokenizer

    def tokenize(
        self,
        text: str | list[str],
        prepend_bos: bool | None = None,
        padding_side: str | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Token ids ``[batch, pos]`` and the attention mask ``[batch, pos]`` (1 = real token).

        ``prepend_bos`` defaults to ``cfg.default_prepend_bos``; sequences of
        different lengths are padded on ``padding_side`` ("right" or "left";
        None: the tokenizer's own ``padding_side``, right unless set).
        """
        tok = self._require_tokenizer()
        if padding_side is None:
            padding_side = getattr(tok, "padding_side", "right") or "right"
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        texts = [text] if isinstance(text, str) else list(text)
        if prepend_bos is None:
            prepend_bos = self.cfg.default_prepend_bos
        ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
        if prepend_bos and tok.bos_token_id is not None:
            ids = [[tok.bos_token_id, *seq] for seq in ids]
        width = max(len(seq) for seq in ids)
        tokens = torch.full((len(ids), width), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(ids), width), dtype=torch.long)
        for row, seq in enumerate(ids):
            cols = slice(width - len(seq), width) if padding_side == "left" else slice(0, len(seq))
            tokens[row, cols] = torch.tensor(seq, dtype=torch.long)
            mask[row, cols] = 1
        return tokens, mask

    def to_tokens(
        self,
        text: str | list[str],
        prepend_bos: bool | None = None,
        padding_side: str | None = None,
    ) -> Tensor:
        """Token ids ``[batch, pos]``, padded with the pad token (``tokenize`` adds the mask)."""
        return self.tokenize(text, prepend_bos, padding_side)[0]

    def to_str_tokens(
        self,
        text: str | Tensor | np.ndarray | list[Any],
        prepend_bos: bool | None = None,
        padding_side: str | None = None,
    ) -> list[Any]:
        """The token strings of a text, or of one sequence of ids (tensor, array or list of ints).

        As in TransformerLens, a list of texts or of id sequences gives one list
        per item, and a ``[1, pos]`` tensor counts as one sequence; a batch of
        several sequences must be indexed (or passed as a list) first.
        """
        tok = self._require_tokenizer()
        if isinstance(text, str):
            ids = self.to_tokens(text, prepend_bos, padding_side)[0].tolist()
        elif isinstance(text, list | tuple) and all(isinstance(t, int) for t in text):
            ids = list(text)
        elif isinstance(text, list | tuple):
            return [self.to_str_tokens(item, prepend_bos, padding_side) for item in text]
        else:
            if not hasattr(text, "ndim") or not hasattr(text, "tolist"):
                raise InvalidTokensError(
                    f"to_str_tokens takes text, token ids or a list of either, got {type(text)}"
                )
            sequence = torch.as_tensor(text)
            if sequence.ndim > 1:
                if sequence.shape[0] != 1:
                    raise ValueError(
                        "to_str_tokens takes one sequence; index the batch first or pass a list"
                    )
                sequence = sequence[0]
            ids = sequence.reshape(-1).tolist()
        return [tok.decode([i]) for i in ids]

    def to_string(self, tokens: Tensor) -> str | list[str]:
        """Decode ``[pos]`` to one string or ``[batch, pos]`` to a list of strings."""
        tok = self._require_tokenizer()
        if tokens.ndim == 1:
            return tok.decode(tokens.tolist())
        return [tok.decode(row.tolist()) for row in tokens]
