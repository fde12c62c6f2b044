"""``mitk demo`` on a model with a tokenizer: real text, token labels, a name swap, an SAE.

Nothing about the model is assumed: which position the attribution explains,
which heads the attention figure shows, which prompts the name swap uses and
which SAE features are listed are all measured when the demo runs.
"""

from __future__ import annotations

from dataclasses import dataclass
import json
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import typer

from mitk.analysis.detectors import head_detector_scores
from mitk.analysis.dla import Attribution, logit_attribution
from mitk.analysis.lens import LogitLens, logit_lens
from mitk.cli.demo_sae import TEXT, TextSAE, train_text_sae
from mitk.cli.demo_swap import NameSwap, choose_name_swap
from mitk.model import HookedTransformer
from mitk.sae import logit_effects
from mitk.viz import (
    Section,
    cached_attention_heatmap,
    dashboard,
    dla_bar,
    feature_card,
    head_scores_heatmap,
    logit_lens_heatmap,
    patching_heatmap,
)

DEFAULT_PROMPT = (
    "VALENTINE.\nCease to persuade, my loving Proteus:\nHome-keeping youth have ever homely "
    "wits.\nWere't not affection chains thy tender days\nTo the sweet glances of thy "
    "honour'd love,\nI rather would entreat thy company\nTo see the wonders of the world abroad"
)
"""The opening of The Two Gentlemen of Verona, the play the model's training held out."""

BEHAVIOURS = ("previous_token", "duplicate_token", "induction")


@dataclass(frozen=True)
class TextFindings:
    """Everything the real-text demo measured, for printing, JSON and the report."""

    str_tokens: list[str]
    loss: float
    repeated: tuple[float, float]
    """Mean loss on the prompt's first copy and on its repetition (prompt fed twice)."""
    predictions: list[tuple[str, float]]
    """Top next tokens after the prompt, with probabilities."""
    dla_position: int
    dla_answer: str
    dla_probability: float
    attribution: Attribution
    lens: LogitLens
    detectors: pd.DataFrame
    swap: NameSwap
    sae: TextSAE


def _loss_per_token(net: HookedTransformer, tokens: torch.Tensor) -> tuple[torch.Tensor, Any]:
    with torch.no_grad():
        logits, cache = net.run_with_cache(tokens)
    log_probs = logits.log_softmax(-1)
    return -log_probs[0, :-1].gather(-1, tokens[0, 1:, None])[:, 0], (log_probs, cache)


def _repeated_losses(net: HookedTransformer, tokens: torch.Tensor) -> tuple[float, float]:
    """Loss on the prompt, then on the same tokens again right after it (induction on real text)."""
    n = tokens.shape[1] - 1
    twice = torch.cat([tokens, tokens[:, 1:]], 1)[:, : net.cfg.n_ctx]
    nll, _ = _loss_per_token(net, twice)
    return nll[1:n].mean().item(), nll[n + 1 :].mean().item()  # first token of each copy left out


def _dla_position(str_tokens: list[str], log_probs: torch.Tensor, tokens: torch.Tensor) -> int:
    """The position whose next token, a word of three letters or more, the model finds likeliest."""
    next_lp = log_probs[0, :-1].gather(-1, tokens[0, 1:, None])[:, 0]
    words = torch.tensor([sum(c.isalpha() for c in s) >= 3 for s in str_tokens[1:]])
    if not bool(words.any()):
        return int(next_lp.argmax())
    return int(torch.where(words, next_lp, torch.full_like(next_lp, -torch.inf)).argmax())


def _heads(detectors: pd.DataFrame) -> list[tuple[int, int]]:
    """The strongest head for each detector behaviour, each once."""
    heads: list[tuple[int, int]] = []
    for behaviour in BEHAVIOURS:
        row = detectors.loc[detectors[behaviour].idxmax()]
        head = (int(row["layer"]), int(row["head"]))
        heads += [head] if head not in heads else []
    return heads


def measure_text(
    net: HookedTransformer, prompt: str, seed: int, top: int
) -> tuple[TextFindings, Any, torch.Tensor]:
    """Run every measurement of the real-text report; returns the findings, cache and tokens."""
    tokens = net.to_tokens(prompt)
    str_tokens = net.to_str_tokens(prompt)
    nll, (log_probs, cache) = _loss_per_token(net, tokens)
    probs, ids = log_probs[0, -1].exp().topk(top)
    pos = _dla_position(str_tokens, log_probs, tokens)
    answer = tokens[:, pos + 1]
    found = TextFindings(
        str_tokens=str_tokens,
        loss=nll.mean().item(),
        repeated=_repeated_losses(net, tokens),
        predictions=[
            (str(net.to_string(int(i))), float(p)) for p, i in zip(probs, ids, strict=True)
        ],
        dla_position=pos,
        dla_answer=str_tokens[pos + 1],
        dla_probability=float(log_probs[0, pos, answer[0]].exp()),
        attribution=logit_attribution(net, cache, answer, pos=pos, by="head"),
        lens=logit_lens(net, cache),
        detectors=head_detector_scores(net, seed=seed + 1),
        swap=choose_name_swap(net),
        sae=train_text_sae(net, seed),
    )
    return found, cache, tokens


def _swap_note(swap: NameSwap) -> str:
    pairs = "; ".join(
        f"{a} vs {b}: clean {c:+.2f}, corrupted {d:+.2f}"
        for (a, b), c, d in zip(swap.answers, swap.clean_diff, swap.corrupted_diff, strict=True)
    )
    verdict = (
        f"the model prefers the right name in both prompts of {swap.right} of the "
        f"{swap.tried} pairs tried over all templates; the best template's are shown"
        if swap.right
        else "no template got any pair right: the best pair is shown"
    )
    return (
        f"Clean prompt {swap.clean[0]!r}, corrupted {swap.corrupted[0]!r} (the slotted word "
        f"swapped). Metric: logit of the clean answer minus the corrupted one at the last "
        f"position. {verdict}. Per pair: {pairs}. 1 means patching that activation from "
        "the clean run into the corrupted run restores the clean logit difference."
    )


def _feature_table(sae: TextSAE) -> pd.DataFrame:
    return pd.DataFrame(
        [
            {
                "latent": f.latent,
                "frequency": round(f.frequency, 4),
                "max activation": round(f.max_activation, 2),
                "top contexts": " | ".join(f.contexts),
            }
            for f in sae.features
        ]
    )


def _sae_sections(net: HookedTransformer, sae: TextSAE) -> list[Section]:
    intro = (
        f"A TopK SAE (d_sae {sae.d_sae}, k {sae.k}) on {sae.hook}, trained for a few seconds "
        f"on the activations of {TEXT.name} (held out from the model's training, shipped "
        f"in mitk/data/texts), last FVU {sae.fvu:.3f}. Features firing on "
        f"0.1-5% of {sae.n_tokens} tokens, by largest activation; the peak token is in "
        "[[ ]]."
    )
    sections = [Section("Sparse autoencoder features", _feature_table(sae), note=intro)]
    for feature in sae.features[:3]:
        card = feature_card(
            sae.statistics.examples(feature.latent), logit_effects(sae.sae, net, feature.latent)
        )
        sections.append(
            Section(
                f"Feature {feature.latent}",
                card,
                note=f"fires on {feature.frequency:.2%} of tokens",
            )
        )
    return sections


def write_text_report(
    out: Path,
    model_name: str,
    net: HookedTransformer,
    found: TextFindings,
    cache: Any,
    tokens: torch.Tensor,
) -> tuple[Path, list[str]]:
    """The real-text HTML report (every figure labelled with the prompt's tokens) and its titles."""
    labels = found.str_tokens
    swap = found.swap
    header = {
        "model": f"{model_name} ({net.cfg.n_layers} layers, d_model {net.cfg.d_model}, "
        f"{net.cfg.n_heads} heads)",
        "prompt": f"{len(labels)} tokens: {''.join(labels[1:])[:80]!r}…",
        "loss": f"{found.loss:.3f} nats/token; the prompt repeated: first copy "
        f"{found.repeated[0]:.3f}, second copy {found.repeated[1]:.3f}",
    }
    pos, answer = found.dla_position, found.dla_answer
    sections = [
        Section(
            "Direct logit attribution of a real next token",
            dla_bar(found.attribution, answer=answer),
            note=f"After {''.join(labels[max(1, pos - 6) : pos + 1])!r} the model gives "
            f"{answer!r} probability {found.dla_probability:.2f} (the likeliest next word "
            "of the prompt). Each head's and MLP's direct contribution to its logit; the "
            "bars sum to the logit.",
        ),
        Section(
            "Logit lens",
            _lens_figure(found.lens, tokens, labels),
            note="Rank (0 = top) of each position's actual next token, read from the "
            "residual stream after each block.",
        ),
        Section(
            "Attention patterns",
            cached_attention_heatmap(cache, _heads(found.detectors), labels),
            note="The strongest previous-token, duplicate-token and induction heads by the "
            "detectors below, on the prompt's tokens; pick a head from the menu.",
        ),
        Section("Previous-token heads", head_scores_heatmap(found.detectors, "previous_token")),
        Section("Induction heads", head_scores_heatmap(found.detectors, "induction")),
        Section(
            "Name swap: patching the residual stream",
            patching_heatmap(swap.by_position, tokens=swap.str_tokens),
            note=_swap_note(swap),
        ),
        Section("Name swap: patching each head's output", patching_heatmap(swap.by_head)),
        *_sae_sections(net, found.sae),
        Section(
            "Head detector scores",
            found.detectors,
            note="BOS + 20 random tokens twice, 32 rows: mean attention to the key each "
            "behaviour predicts.",
        ),
    ]
    path = dashboard(out, title=f"mitk demo: {model_name}", header=header, items=sections)
    return path, [section.title for section in sections]


def _lens_figure(lens: LogitLens, tokens: torch.Tensor, labels: list[str]) -> Any:
    """The lens at every position that has a next token."""
    trimmed = LogitLens(lens.logits[:, :, :-1], lens.labels)
    return logit_lens_heatmap(trimmed, tokens[:, 1:], tokens=labels[:-1])


def print_text_json(model: str, found: TextFindings, path: Path, titles: list[str]) -> None:
    """``--json``: the findings as one JSON object."""
    swap = found.swap
    result = {
        "model": model,
        "str_tokens": found.str_tokens,
        "loss": found.loss,
        "loss_first_copy": found.repeated[0],
        "loss_second_copy": found.repeated[1],
        "predictions": [{"token": t, "probability": p} for t, p in found.predictions],
        "dla": {
            "position": found.dla_position,
            "answer": found.dla_answer,
            "probability": found.dla_probability,
            "top": found.attribution.top(5),
        },
        "heads": found.detectors.to_dict(orient="records"),
        "name_swap": {
            "clean": swap.clean,
            "corrupted": swap.corrupted,
            "answers": swap.answers,
            "clean_logit_diff": swap.clean_diff,
            "corrupted_logit_diff": swap.corrupted_diff,
            "right": swap.right,
            "tried": swap.tried,
            "by_head_normalized": swap.by_head.normalized().tolist(),
        },
        "sae": {
            "hook": found.sae.hook,
            "d_sae": found.sae.d_sae,
            "fvu": found.sae.fvu,
            "l0": found.sae.l0,
            "features": [vars(f) for f in found.sae.features],
        },
        "sections": titles,
        "report": str(path),
    }
    typer.echo(json.dumps(result))


def print_text_summary(model: str, net: HookedTransformer, found: TextFindings, path: Path) -> None:
    """The human-readable summary of the real-text demo."""
    cfg = net.cfg
    typer.echo(f"model {model}: {cfg.n_layers} layers, d_model {cfg.d_model}, {cfg.n_heads} heads")
    typer.echo(
        f"prompt: {len(found.str_tokens)} tokens, loss {found.loss:.3f} nats/token; "
        f"repeated once: {found.repeated[0]:.3f} -> {found.repeated[1]:.3f} nats"
    )
    tops = ", ".join(f"{t!r}: {p:.2f}" for t, p in found.predictions)
    typer.echo(f"next-token predictions after the prompt: {tops}")
    typer.echo(
        f"\nlargest direct logit attributions to {found.dla_answer!r} "
        f"(p = {found.dla_probability:.2f}) at position {found.dla_position}:"
    )
    for label, value in found.attribution.top(5):
        typer.echo(f"  {label:<14} {value:+.3f}")
    heads = found.detectors
    for behaviour in BEHAVIOURS:
        row = heads.loc[heads[behaviour].idxmax()]
        typer.echo(
            f"strongest {behaviour.replace('_', '-')} head {row['label']} ({row[behaviour]:.2f})"
        )
    swap = found.swap
    typer.echo(f"\nname swap: {swap.clean[0]!r} vs {swap.corrupted[0]!r}")
    typer.echo(
        f"  logit diff {swap.answers[0][0]!r} - {swap.answers[0][1]!r}: clean "
        f"{swap.clean_diff[0]:+.2f}, corrupted {swap.corrupted_diff[0]:+.2f} "
        f"({swap.right} of {swap.tried} pairs right in both prompts)"
    )
    recovery = swap.by_head.normalized()
    layer, head = divmod(int(recovery.flatten().argmax()), recovery.shape[1])
    typer.echo(f"  patching one head restores most: L{layer}H{head} ({recovery.max():.2f})")
    sae = found.sae
    typer.echo(
        f"\nSAE on {sae.hook} (d_sae {sae.d_sae}, k {sae.k}, FVU {sae.fvu:.3f}); "
        "top features, peak token in [[ ]]:"
    )
    for feature in sae.features:
        typer.echo(
            f"  latent {feature.latent:>4} ({feature.frequency:.2%}): {feature.contexts[0]!r}"
        )
    typer.echo(f"\nreport written to {path.resolve()}")
