"""Where a command's prompts come from: inline text, a token file, or synthetic induction probes.

Three sources, exactly one per run:

- ``--prompt TEXT`` (repeatable): tokenised with the model's tokenizer, padded on the right.
- ``--tokens FILE``: JSONL, one prompt per line, either a list of token ids or an object
  ``{"tokens": [...], "answer": id, "wrong": id}``; or a ``.safetensors`` file holding an
  integer ``tokens`` tensor ``[n, pos]`` (and optionally ``answer`` / ``wrong`` ``[n]``).
  Shorter JSONL rows are padded on the right and masked.
- ``--induction N``: BOS + ``N`` random tokens + the same tokens again (``mitk.sequences``),
  for models without a tokenizer. For prompts with answers the last token is cut off and
  becomes the answer, which only an induction circuit can predict.

Answers given with ``--answer`` / ``--wrong`` override those in a file: each is a token id
or a text that is exactly one token, given once for all prompts or once per prompt.
"""

from __future__ import annotations

from dataclasses import dataclass
import json
from pathlib import Path
import re
from typing import Annotated, Any

from safetensors import SafetensorError, safe_open
import torch
from torch import Tensor
import typer

from mitk.errors import ConfigError, InputFileError, InvalidTokensError
from mitk.model import HookedTransformer
from mitk.model.memory import GB, memory_limit
from mitk.sequences import repeated_random_tokens
from mitk.sweeps.reading import read_text, short_repr

MAX_SEED = 2**63 - 1
"""Largest seed torch's generators take."""
_TOKEN_ID = re.compile(r"^-?\d{1,12}$", re.ASCII)

PromptOption = Annotated[
    list[str] | None,
    typer.Option("--prompt", "-p", help="Prompt text; repeat for several (needs a tokenizer)."),
]
TokensOption = Annotated[
    Path | None,
    typer.Option(
        "--tokens",
        help="JSONL of token-id lists (or {tokens, answer, wrong} objects), or a .safetensors "
        "file with a 'tokens' tensor.",
    ),
]
InductionOption = Annotated[
    int | None,
    typer.Option(
        "--induction",
        min=1,
        help="Synthetic prompts: BOS, N random tokens, the same N again (no tokenizer needed).",
    ),
]
CountOption = Annotated[
    int, typer.Option("--n-prompts", min=1, help="How many synthetic --induction prompts.")
]
SeedOption = Annotated[
    int, typer.Option("--seed", min=0, max=MAX_SEED, help="Seed for synthetic prompts.")
]
AnswerOption = Annotated[
    list[str] | None,
    typer.Option(
        "--answer",
        help="Correct next token: an id or one-token text; once for all prompts or per prompt.",
    ),
]
WrongOption = Annotated[
    list[str] | None,
    typer.Option("--wrong", help="Competing token (same forms as --answer): scores a difference."),
]


@dataclass(frozen=True)
class Prompts:
    """Token ids to run, their padding mask, and the answers a metric reads.

    ``tokens`` is ``[batch, pos]``; ``attention_mask`` (1 = real token) is None
    when every prompt fills the row; ``answers`` / ``wrong`` are ``[batch]`` or None.
    """

    tokens: Tensor
    attention_mask: Tensor | None
    answers: Tensor | None
    wrong: Tensor | None
    source: str

    def positions(self, pos: int) -> Tensor:
        """Per-prompt index of ``pos``; a negative ``pos`` counts back from each last real token."""
        width = self.tokens.shape[1]
        lengths = (
            self.attention_mask.sum(1).long()
            if self.attention_mask is not None
            else torch.full((self.tokens.shape[0],), width)
        )
        index = lengths + pos if pos < 0 else torch.full_like(lengths, pos)
        if bool(((index < 0) | (index >= lengths)).any()):
            raise ConfigError(f"--pos {pos} lies outside a prompt of {int(lengths.min())} tokens")
        return index


def check_one_source(**given: object) -> None:
    """Raise ``ConfigError`` unless exactly one input option was given."""
    chosen = [name for name, value in given.items() if value]
    if len(chosen) != 1:
        names = ", ".join(f"--{name.replace('_', '-')}" for name in given)
        which = f"got {', '.join(chosen)}" if chosen else "got none"
        raise ConfigError(f"give exactly one input: {names} ({which})")


def read_prompts(
    model: HookedTransformer,
    *,
    prompt: list[str] | None,
    tokens_file: Path | None,
    induction: int | None,
    n_prompts: int = 16,
    seed: int = 0,
    answer: list[str] | None = None,
    wrong: list[str] | None = None,
) -> Prompts:
    """The prompts and answers of one command run, from whichever single source was given."""
    check_one_source(prompt=prompt, tokens=tokens_file, induction=induction)
    if prompt:
        tokens, mask = model.tokenize(prompt)
        full = bool(mask.all())
        found = Prompts(tokens, None if full else mask, None, None, f"{len(prompt)} prompt(s)")
    elif tokens_file is not None:
        found = _read_token_file(tokens_file)
        _check_vocabulary(found, tokens_file, model.cfg.d_vocab)
    else:
        assert induction is not None
        probe = _induction_tokens(model, induction, n_prompts, seed)
        description = f"{n_prompts} induction probes (BOS + {induction} random tokens, repeated)"
        found = Prompts(probe[:, :-1], None, probe[:, -1], None, description)
    batch = found.tokens.shape[0]
    answers = _answer_ids(model, answer, batch, "--answer") if answer else found.answers
    wrongs = _answer_ids(model, wrong, batch, "--wrong") if wrong else found.wrong
    return Prompts(found.tokens, found.attention_mask, answers, wrongs, found.source)


def read_token_matrix(
    model: HookedTransformer,
    *,
    tokens_file: Path | None,
    induction: int | None,
    n_sequences: int = 256,
    seed: int = 0,
) -> Tensor | Path:
    """Equal-length token sequences for an activation store: a ``[n, ctx]`` tensor.

    A directory of token shards is passed through as its path (the store reads it lazily).
    """
    check_one_source(tokens=tokens_file, induction=induction)
    if induction is not None:
        return _induction_tokens(model, induction, n_sequences, seed)
    assert tokens_file is not None
    if tokens_file.is_dir():
        return tokens_file
    found = _read_token_file(tokens_file)
    if found.attention_mask is not None:
        raise ConfigError(f"{tokens_file}: sequences differ in length; training needs equal ones")
    return found.tokens


def _induction_tokens(model: HookedTransformer, half: int, n: int, seed: int) -> Tensor:
    if half < 1 or n < 1:
        raise ConfigError(f"--induction and the prompt count must be >= 1, got {half} and {n}")
    length = 1 + 2 * half
    if length > model.cfg.n_ctx:
        longest = (model.cfg.n_ctx - 1) // 2
        raise ConfigError(
            f"--induction {half} makes {length} tokens; the model's context is "
            f"{model.cfg.n_ctx}, so use at most {longest}"
        )
    check_fits(n * length * 8, f"{n} synthetic prompts of {length} tokens")
    bos = model.tokenizer.bos_token_id if model.tokenizer is not None else None
    generator = torch.Generator().manual_seed(seed)
    return repeated_random_tokens(n, half, model.cfg.d_vocab, generator, bos=bos or 0)


def check_cache_fits(model: HookedTransformer, tokens: Tensor) -> None:
    """``ConfigError`` before a cached forward of ``tokens`` [batch, pos] would exceed the limit.

    A rough upper bound on every cached activation (residual writes, q/k/v/z, the MLP,
    attention scores and pattern), so a million synthetic prompts fail at once.
    """
    cfg = model.cfg
    batch, pos = tokens.shape
    per_position = 8 * cfg.d_model + 4 * cfg.n_heads * max(cfg.d_head, 1) + 3 * max(cfg.d_mlp, 0)
    per_layer = batch * pos * (per_position + 2 * cfg.n_heads * pos)
    element = max(model.W_E.element_size(), 4)
    check_fits(
        per_layer * cfg.n_layers * element, f"the cached activations of {batch} x {pos} tokens"
    )


def check_fits(need: int, what: str) -> None:
    """``ConfigError`` instead of allocating ``need`` bytes beyond ``memory_limit()``."""
    limit, source = memory_limit()
    if limit is not None and need > limit:
        raise ConfigError(f"{what} need about {need / GB:.2f} GB, more than {limit / GB:.2f} GB "
                          f"({source})")  # fmt: skip


def _read_token_file(path: Path) -> Prompts:
    if not path.exists():
        raise FileNotFoundError(f"token file {str(path)!r} does not exist")
    if path.suffix == ".safetensors":
        return _read_safetensors(path)
    rows, answers, wrongs = [], [], []
    for number, line in enumerate(read_text(path, "token file").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            item: Any = json.loads(line)
        except json.JSONDecodeError as err:
            raise ConfigError(f"{path}:{number}: not JSON ({err.msg})") from None
        except (ValueError, RecursionError) as err:  # too many digits, too deeply nested
            raise InputFileError(f"{path}:{number}: not a usable JSON value ({err})") from None
        if isinstance(item, dict):
            answers.append(item.get("answer"))
            wrongs.append(item.get("wrong"))
            item = item.get("tokens")
        if not isinstance(item, list) or not item or not all(_is_id(t) for t in item):
            raise InvalidTokensError(f"{path}:{number}: expected a non-empty list of token ids, "
                                     f"got {short_repr(item)}")  # fmt: skip
        rows.append(item)
    if not rows:
        raise ConfigError(f"token file {str(path)!r} holds no prompts")
    tokens, mask = _pad_right(rows)
    return Prompts(
        tokens, mask, _optional_ids(answers, path, "answer"), _optional_ids(wrongs, path, "wrong"),
        f"{len(rows)} prompt(s) from {path.name}",
    )  # fmt: skip


def _check_vocabulary(found: Prompts, path: Path, d_vocab: int) -> None:
    """``InvalidTokensError`` naming the file for an id outside ``[0, d_vocab)``."""
    for name, ids in (("tokens", found.tokens), ("answer", found.answers), ("wrong", found.wrong)):
        if ids is not None and ids.numel() and not 0 <= int(ids.min()) <= int(ids.max()) < d_vocab:
            bad = int(ids.min()) if int(ids.min()) < 0 else int(ids.max())
            raise InvalidTokensError(f"{path}: {name} id {bad} is outside the vocabulary "
                                     f"[0, {d_vocab})")  # fmt: skip


def _is_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**63


def _read_safetensors(path: Path) -> Prompts:
    try:
        with safe_open(str(path), framework="pt") as handle:
            names = set(handle.keys())
            if "tokens" not in names:
                raise ConfigError(f"{path} has no 'tokens' tensor (it has {sorted(names)})")
            tensors = {name: handle.get_tensor(name) for name in ("tokens", "answer", "wrong")
                       if name in names}  # fmt: skip
    except (SafetensorError, OSError, RuntimeError) as err:
        raise InputFileError(f"{path}: not a readable safetensors file ({err})") from err
    tokens = tensors["tokens"]
    if tokens.dtype.is_floating_point or tokens.ndim != 2 or tokens.numel() == 0:
        raise InvalidTokensError(
            f"{path}: 'tokens' must be a non-empty integer [n, pos] tensor, "
            f"got {tokens.dtype} {tuple(tokens.shape)}"
        )
    extra = {name: t.long().reshape(-1) for name, t in tensors.items() if name != "tokens"}
    for name, ids in extra.items():
        if ids.shape[0] != tokens.shape[0]:
            raise ConfigError(f"{path}: {name!r} has {ids.shape[0]} entries for "
                              f"{tokens.shape[0]} prompts")  # fmt: skip
    source = f"{tokens.shape[0]} prompt(s) from {path.name}"
    return Prompts(tokens.long(), None, extra.get("answer"), extra.get("wrong"), source)


def _pad_right(rows: list[list[int]]) -> tuple[Tensor, Tensor | None]:
    width = max(len(row) for row in rows)
    tokens = torch.zeros((len(rows), width), dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        tokens[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    return tokens, (None if bool(mask.all()) else mask)


def _optional_ids(values: list[Any], path: Path, key: str) -> Tensor | None:
    """Per-prompt ids from a file: all present, or None when no prompt gives one."""
    if all(value is None for value in values):
        return None
    if not all(_is_id(value) for value in values):
        raise ConfigError(f"{path}: give {key!r} as a token id on every line or on none")
    return torch.tensor(values, dtype=torch.long)


def _answer_ids(model: HookedTransformer, given: list[str], batch: int, flag: str) -> Tensor:
    """Token ids from ``--answer``-style values: one for all prompts or one per prompt."""
    if len(given) not in (1, batch):
        raise ConfigError(f"{flag} given {len(given)} times for {batch} prompts; give 1 or {batch}")
    ids = [_one_token(model, value, flag) for value in given]
    return torch.tensor(ids * batch if len(ids) == 1 else ids, dtype=torch.long)


def _one_token(model: HookedTransformer, value: str, flag: str) -> int:
    if _TOKEN_ID.match(value.strip()):
        token = int(value)
    else:
        tokenizer = model.tokenizer
        if tokenizer is None:
            raise ConfigError(f"{flag} {value!r}: this model has no tokenizer; give a token id")
        ids = tokenizer(value, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise ConfigError(f"{flag} {value!r} is {len(ids)} tokens, not one: {ids}")
        token = ids[0]
    if not 0 <= token < model.cfg.d_vocab:
        vocab = model.cfg.d_vocab
        raise InvalidTokensError(f"{flag} {token} lies outside the vocabulary [0, {vocab})")
    return token
