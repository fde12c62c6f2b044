"""Measurements of ``shakespeare-small`` on held-out text, for its model card and its tests.

- ``score_text``: per-token loss and top-1 hits of the model on a text, read in
  windows of BOS + ``n_ctx - 1`` tokens, next to the unigram and bigram baselines.
- ``repeated_passage_losses``: induction on real text, the loss on a passage's
  first and second copy.
- ``speaker_structure``: loss and accuracy on the tokens of speaker names and on
  line ends of a held-out play, next to the bigram baseline.
"""

from __future__ import annotations

from dataclasses import dataclass
import math
import re
from typing import Any

import torch
from torch import Tensor

from mitk.model import HookedTransformer
from mitk.shapes import Bool, Float, Int
from mitk.train.ngram import NgramBaselines

SPEAKER_LINE = re.compile(r"(?<=\n\n)(?!ACT |SCENE )([A-Z][A-Za-z' ]{0,24})\.\n(?=[^\n])")
"""A speaker's name alone on a line after a blank line, then the speech (``VALENTINE.``)."""


@dataclass(frozen=True)
class TextScores:
    """One text's tokens with the model's and the baselines' per-token losses (nats)."""

    ids: Int[Tensor, " n"]
    offsets: list[tuple[int, int]]
    """Character span of each token in the text."""
    model_nll: Float[Tensor, " n"]
    model_hit: Bool[Tensor, " n"]
    """The model's most likely next token was this one."""
    unigram_nll: Float[Tensor, " n"]
    bigram_nll: Float[Tensor, " n"]
    n_bytes: Int[Tensor, " n"]


def encode(tokenizer: Any, text: str) -> tuple[Int[Tensor, " n"], list[tuple[int, int]]]:
    """Token ids of ``text`` (no special tokens) and each token's character span."""
    enc = tokenizer.backend_tokenizer.encode(text, add_special_tokens=False)
    return torch.tensor(enc.ids, dtype=torch.long), list(enc.offsets)


@torch.no_grad()
def model_nll(
    model: HookedTransformer, ids: Int[Tensor, " n"], batch: int = 16
) -> tuple[Float[Tensor, " n"], Bool[Tensor, " n"]]:
    """Per-token loss and top-1 hits of ``ids`` read in BOS-led windows of ``n_ctx`` tokens."""
    width = model.cfg.n_ctx - 1
    bos = model._require_tokenizer().bos_token_id
    chunks = list(ids.split(width))
    nll, hit = [], []
    for i in range(0, len(chunks), batch):
        group = chunks[i : i + batch]
        same = [c for c in group if len(c) == len(group[0])]
        for part in (same, [c for c in group if len(c) != len(group[0])]):
            if not part:
                continue
            rows = torch.stack(part)
            inputs = torch.cat([torch.full((len(part), 1), bos), rows], dim=1)
            logits = model(inputs.to(model.cfg.device))[:, :-1].float().cpu()
            nll.append(torch.nn.functional.cross_entropy(
                logits.flatten(0, 1), rows.flatten(), reduction="none"
            ))  # fmt: skip
            hit.append((logits.argmax(-1) == rows).flatten())
    return torch.cat(nll), torch.cat(hit)


def score_text(
    model: HookedTransformer, baselines: NgramBaselines, text: str, byte_lengths: list[int]
) -> TextScores:
    """Model and baseline losses on every token of ``text``.

    The bigram sees each token's true predecessor (EOS for the first), also
    across the model's window boundaries, which can only favour the baseline.
    """
    tokenizer = model._require_tokenizer()
    ids, offsets = encode(tokenizer, text)
    nll, hit = model_nll(model, ids)
    previous = torch.cat([torch.tensor([tokenizer.eos_token_id]), ids[:-1]])
    return TextScores(
        ids=ids,
        offsets=offsets,
        model_nll=nll,
        model_hit=hit,
        unigram_nll=baselines.unigram_nll(ids).float(),
        bigram_nll=baselines.bigram_nll(previous, ids).float(),
        n_bytes=torch.tensor(byte_lengths)[ids],
    )


def loss_summary(scores: list[TextScores]) -> dict[str, float]:
    """Tokens, bytes, and each model's loss in nats/token and bits/byte over the texts."""
    n_bytes = sum(int(s.n_bytes.sum()) for s in scores)
    out: dict[str, float] = {
        "tokens": sum(len(s.ids) for s in scores),
        "bytes": n_bytes,
        "model_top1": sum(int(s.model_hit.sum()) for s in scores) / sum(len(s.ids) for s in scores),
    }
    for name in ("model", "unigram", "bigram"):
        nats = sum(float(getattr(s, f"{name}_nll").double().sum()) for s in scores)
        out[f"{name}_nats_per_token"] = nats / out["tokens"]
        out[f"{name}_bits_per_byte"] = nats / math.log(2) / n_bytes
    return out


@torch.no_grad()
def repeated_passage_losses(
    model: HookedTransformer, ids: Int[Tensor, " n"], length: int = 100, passages: int = 16
) -> tuple[float, float]:
    """Mean loss on the first and on the second copy of ``passages`` repeated held-out passages.

    Each input is BOS, a passage of ``length`` tokens, and the same passage
    again; the first token of each copy is left out (the second copy's first
    token cannot be predicted by copying). Passages are evenly spaced in ``ids``.
    """
    if 1 + 2 * length > model.cfg.n_ctx:
        raise ValueError(f"1 + 2 * {length} tokens do not fit n_ctx={model.cfg.n_ctx}")
    starts = torch.linspace(0, len(ids) - length, passages).long()
    rows = torch.stack([ids[s : s + length] for s in starts.tolist()])
    bos = torch.full((passages, 1), model._require_tokenizer().bos_token_id)
    inputs = torch.cat([bos, rows, rows], dim=1)
    logits = model(inputs.to(model.cfg.device))[:, :-1].float().cpu()
    nll = torch.nn.functional.cross_entropy(
        logits.flatten(0, 1), inputs[:, 1:].flatten(), reduction="none"
    ).view(passages, -1)
    return nll[:, 1:length].mean().item(), nll[:, length + 1 :].mean().item()


def speaker_categories(text: str, offsets: list[tuple[int, int]]) -> dict[str, Bool[Tensor, " n"]]:
    """Masks over tokens: first and later tokens of speaker names, and line ends within speeches.

    A line end is the newline ending a line of speech that the same speech
    continues after (so the next line is neither blank nor a new speaker).
    """
    starts = torch.tensor([start for start, _ in offsets])
    first = torch.zeros(len(offsets), dtype=torch.bool)
    name = torch.zeros(len(offsets), dtype=torch.bool)
    after_name: set[int] = set()  # where the newline ending each speaker line starts
    for match in SPEAKER_LINE.finditer(text):
        inside = (starts >= match.start(1)) & (starts < match.end(1))
        name |= inside
        first |= starts == match.start(1)
        after_name.add(match.end(1) + 1)
    line_end = torch.tensor([
        text[a:b] == "\n" and text[b : b + 1] not in ("\n", "") and a not in after_name
        for a, b in offsets
    ])  # fmt: skip
    return {"speaker_first": first, "speaker_rest": name & ~first, "line_end": line_end}


def speaker_structure(scores: TextScores, text: str) -> dict[str, dict[str, float]]:
    """Per category: token count, model loss and top-1 accuracy, bigram loss; and all tokens."""
    masks = speaker_categories(text, scores.offsets)
    masks["all"] = torch.ones(len(scores.ids), dtype=torch.bool)
    return {
        category: {
            "tokens": int(mask.sum()),
            "model_nats": float(scores.model_nll[mask].mean()),
            "model_top1": float(scores.model_hit[mask].float().mean()),
            "bigram_nats": float(scores.bigram_nll[mask].mean()),
            "unigram_nats": float(scores.unigram_nll[mask].mean()),
        }
        for category, mask in masks.items()
    }
