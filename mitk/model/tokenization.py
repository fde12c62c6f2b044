"""Text in and out: the tokenizer methods of the transformer, when one is attached."""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from mitk.config import TransformerConfig
from mitk.errors import InvalidTokensError, MitkError, ShapeMismatchError
from mitk.model.inputs import checked_attention_mask, checked_tokens
from mitk.shapes import Bool, Int

PaddingSide = Literal["left", "right"]


class NoTokenizerError(MitkError, RuntimeError):
    """A text method was called on a model that has no tokenizer attached."""


class NotASingleTokenError(InvalidTokensError, AssertionError):
    """A string meant to be one token tokenizes to several (or none).

    Also an ``AssertionError``, which TransformerLens raises there.
    """


class TokenNotFoundError(MitkError, ValueError, AssertionError):
    """``get_token_position`` found no occurrence of the token (TransformerLens asserts)."""


class TextInterface:
    """Mixin: ``to_tokens``, ``to_str_tokens``, ``to_string``, ``tokenize`` over a HF tokenizer.

    Also TransformerLens's token helpers ``to_single_token`` and
    ``get_token_position``. Everywhere,
    ``prepend_bos=None`` means ``cfg.default_prepend_bos`` and
    ``padding_side=None`` the tokenizer's own ``padding_side`` (right unless set).
    """

    cfg: TransformerConfig
    tokenizer: Any

    def _require_tokenizer(self) -> Any:
        if self.tokenizer is None:
            raise NoTokenizerError(
                "this model has no tokenizer; pass token id tensors, or attach one with "
                "model.set_tokenizer(transformers.AutoTokenizer.from_pretrained(path))"
            )
        return self.tokenizer

    def set_tokenizer(self, tokenizer: Any, default_padding_side: str | None = None) -> None:
        """Attach a Hugging Face tokenizer; a pad token is borrowed from EOS when missing.

        ``default_padding_side`` ("left" or "right") sets the tokenizer's
        ``padding_side``, which text inputs are then padded on.
        """
        if tokenizer is not None and tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        if default_padding_side is not None:
            if tokenizer is None:
                raise NoTokenizerError("default_padding_side needs a tokenizer to set it on")
            tokenizer.padding_side = _checked_side(default_padding_side)
        self.tokenizer = tokenizer

    def _padding_side(self, padding_side: str | None) -> PaddingSide:
        """``padding_side``, or the tokenizer's when None (right when it has none)."""
        if padding_side is None:
            padding_side = getattr(self.tokenizer, "padding_side", None) or "right"
        return _checked_side(padding_side)

    def tokenize(
        self,
        text: str | list[str],
        prepend_bos: bool | None = None,
        padding_side: str | None = None,
        truncate: bool = True,
    ) -> tuple[Int[Tensor, "batch pos"], Int[Tensor, "batch pos"]]:
        """Token ids ``[batch, pos]`` and attention mask ``[batch, pos]`` (1 = real token), on CPU.

        ``prepend_bos`` defaults to ``cfg.default_prepend_bos``; sequences of
        different lengths are padded with the pad token on ``padding_side``
        ("right" or "left"; None: the tokenizer's own ``padding_side``, right
        unless set). ``truncate`` (TransformerLens's default) keeps the first
        ``cfg.n_ctx`` tokens of each sequence, BOS included.
        """
        tok = self._require_tokenizer()
        side = self._padding_side(padding_side)
        texts = [text] if isinstance(text, str) else list(text)
        if not texts or not all(isinstance(t, str) for t in texts):
            raise InvalidTokensError("tokenize takes a string or a non-empty list of strings")
        if prepend_bos is None:
            prepend_bos = self.cfg.default_prepend_bos
        ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
        if prepend_bos and tok.bos_token_id is not None:
            ids = [[tok.bos_token_id, *seq] for seq in ids]
        if truncate:
            ids = [seq[: self.cfg.n_ctx] for seq in ids]
        width = max(len(seq) for seq in ids)
        tokens = torch.full((len(ids), width), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(ids), width), dtype=torch.long)
        for row, seq in enumerate(ids):
            cols = slice(width - len(seq), width) if side == "left" else slice(0, len(seq))
            tokens[row, cols] = torch.tensor(seq, dtype=torch.long)
            mask[row, cols] = 1
        return tokens, mask

    def to_tokens(
        self,
        input: str | list[str],
        prepend_bos: bool | None = None,
        padding_side: str | None = None,
        move_to_device: bool = True,
        truncate: bool = True,
    ) -> Int[Tensor, "batch pos"]:
        """Token ids ``[batch, pos]``, padded with the pad token (``tokenize`` adds the mask).

        TransformerLens's arguments: ``move_to_device`` puts them on
        ``cfg.device``; ``truncate`` keeps the first ``cfg.n_ctx`` tokens.
        """
        tokens = self.tokenize(input, prepend_bos, padding_side, truncate)[0]
        return tokens.to(self.cfg.device) if move_to_device else tokens

    def tokens_and_mask(
        self,
        input: Tensor | str | list[str],
        attention_mask: Tensor | None = None,
        prepend_bos: bool | None = None,
        padding_side: str | None = None,
        after_cache: bool = False,
    ) -> tuple[Int[Tensor, "batch pos"], Bool[Tensor, "batch pos"] | None]:
        """The checked token ids and real-token mask a forward runs on, on ``cfg.device``.

        Text is tokenized (``prepend_bos``, ``padding_side``) and brings its own
        mask, so an ``attention_mask`` beside it is refused. Token ids keep
        ``attention_mask``; without one, padding is guessed from pad ids as
        TransformerLens guesses it (``get_attention_mask``): leading pad tokens
        on a left padding side (``padding_side``, else the tokenizer's), and on
        either side when the tokens continue a key-value cache (``after_cache``).
        The mask is None when nothing is padding.
        """
        if isinstance(input, str) or (
            isinstance(input, list) and input and all(isinstance(t, str) for t in input)
        ):
            if attention_mask is not None:
                raise ValueError(
                    "pass either text (the mask is built for you) or an attention_mask"
                )
            input, attention_mask = self.tokenize(input, prepend_bos, padding_side)
        tokens = checked_tokens(input, self.cfg)
        if padding_side is not None:
            _checked_side(padding_side)  # a typo is an error even where no padding is guessed
        side = None if self.tokenizer is None else self._padding_side(padding_side)
        if attention_mask is None and side is not None and (after_cache or side == "left"):
            if prepend_bos is None:
                prepend_bos = self.cfg.default_prepend_bos
            attention_mask = get_attention_mask(self.tokenizer, tokens, prepend_bos, side)
        valid = checked_attention_mask(attention_mask, (tokens.shape[0], tokens.shape[1]))
        device = self.cfg.device
        return tokens.to(device), None if valid is None else valid.to(device)

    def to_single_token(self, string: str) -> int:
        """The id of the one token ``string`` is (no BOS); ``NotASingleTokenError`` otherwise."""
        ids = self.to_tokens(string, prepend_bos=False, move_to_device=False)[0].tolist()
        if len(ids) != 1:
            pieces = [self._require_tokenizer().decode([i]) for i in ids]
            raise NotASingleTokenError(
                f"{string!r} is not a single token: it tokenizes to {len(ids)} tokens "
                f"{pieces} (ids {ids})"
            )
        return int(ids[0])

    def get_token_position(
        self,
        single_token: str | int | Tensor,
        input: str | Tensor,
        mode: str = "first",
        prepend_bos: bool | None = None,
        padding_side: str | None = None,
    ) -> int:
        """Position of ``single_token`` in ``input`` (text, or ids ``[pos]`` / ``[1, pos]``).

        ``single_token`` is an id, a one-element tensor or a string that is one
        token; ``mode`` picks the ``"first"`` or ``"last"`` occurrence. Text is
        tokenized with ``prepend_bos``/``padding_side`` (so BOS shifts positions
        by one). Raises ``TokenNotFoundError`` when it does not occur.
        """
        if mode not in ("first", "last"):
            raise ValueError(f"mode must be 'first' or 'last', not {mode!r}")
        if isinstance(input, str):
            tokens = self.to_tokens(input, prepend_bos, padding_side, move_to_device=False)
        elif isinstance(input, Tensor):
            tokens = input
        else:
            raise InvalidTokensError(
                f"get_token_position searches text or a token tensor, got {type(input).__name__}"
            )
        if tokens.ndim == 2:
            if tokens.shape[0] != 1:
                raise ShapeMismatchError(
                    f"rank-2 tokens must be [1, pos], not {tuple(tokens.shape)}: "
                    "index the batch first"
                )
            tokens = tokens[0]
        if tokens.ndim != 1:
            raise ShapeMismatchError(f"tokens must be [pos] or [1, pos], not {tuple(tokens.shape)}")
        if isinstance(single_token, str):
            single_token = self.to_single_token(single_token)
        elif isinstance(single_token, Tensor):
            single_token = int(single_token.item())
        found = (tokens == single_token).nonzero()[:, 0].tolist()
        if not found:
            raise TokenNotFoundError(f"token {single_token} does not occur in the prompt")
        return int(found[0] if mode == "first" else found[-1])

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

    def to_string(self, tokens: Tensor | np.ndarray | list[Any] | int) -> str | list[str]:
        """Decode ``[pos]`` (or one id) to a string, ``[batch, pos]`` to a list of strings.

        Lists and arrays are read as tensors; as in TransformerLens, spaces are
        decoded as they are (``clean_up_tokenization_spaces=False``).
        """
        tok = self._require_tokenizer()
        ids = torch.as_tensor(tokens)
        if ids.ndim > 2:
            raise ShapeMismatchError(
                f"to_string takes [pos] or [batch, pos], got {tuple(ids.shape)}"
            )
        rows = ids.reshape(1, -1) if ids.ndim < 2 else ids
        texts = [tok.decode(row.tolist(), clean_up_tokenization_spaces=False) for row in rows]
        return texts if ids.ndim == 2 else texts[0]

    def to_single_str_token(self, int_token: int) -> str:
        """The string of one token id (TransformerLens's name)."""
        if not isinstance(int_token, int) or isinstance(int_token, bool):
            raise InvalidTokensError(f"to_single_str_token takes one int id, got {int_token!r}")
        return str(self.to_str_tokens([int_token])[0])


def get_attention_mask(
    tokenizer: Any,
    tokens: Int[Tensor, "batch pos"],
    prepend_bos: bool,
    padding_side: str | None = None,
) -> Int[Tensor, "batch pos"]:
    """An attention mask guessed from pad tokens, as TransformerLens's ``get_attention_mask``.

    Leading (``padding_side="left"``) or trailing (``"right"``; None: the
    tokenizer's side) pad-token ids are padding (0). With left padding, when
    BOS shares the pad id and ``prepend_bos``, the last leading pad is the BOS
    and stays 1. A guess: a sequence that really starts (or ends) with pad-id
    tokens looks padded; pass the mask ``tokenize`` returns where you have it.
    """
    side = _checked_side(padding_side or getattr(tokenizer, "padding_side", None) or "right")
    real = tokens != tokenizer.pad_token_id
    if side == "right":
        return (real.flip(-1).cumsum(-1).flip(-1) > 0).long()
    seen = real.cumsum(-1) > 0
    if prepend_bos and tokenizer.bos_token_id == tokenizer.pad_token_id:
        # the BOS is the pad-id token just before the first real one
        bos_at = ((~seen).sum(-1, keepdim=True) - 1).clamp(min=0)
        seen = seen.scatter(-1, bos_at, True)
    return seen.long()


def _checked_side(side: str) -> PaddingSide:
    if side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {side!r}")
    return side  # type: ignore[return-value]
