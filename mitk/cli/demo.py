"""``mitk demo``: the README's main job: analyse an embedded model, write a report.

A model with a tokenizer (the default, shakespeare-small) gets the real-text
report (``demo_text``); one without (toy-induction) the repeated-random-token
report below, which finds its induction circuit.
"""

from __future__ import annotations

from dataclasses import dataclass
import json
from pathlib import Path
from typing import Annotated, Any

import pandas as pd
import torch
import typer

from mitk.analysis.circuits import full_ov_circuit, ov_copying_scores
from mitk.analysis.composition import CompositionBaseline, composition_baseline, composition_scores
from mitk.analysis.detectors import head_detector_scores
from mitk.analysis.dla import Attribution, logit_attribution
from mitk.analysis.lens import LogitLens, logit_lens
from mitk.analysis.patching import PatchResult, activation_patch, logit_diff
from mitk.cli.demo_text import (
    DEFAULT_PROMPT,
    measure_text,
    print_text_json,
    print_text_summary,
    write_text_report,
)
from mitk.cli.inputs import MAX_SEED
from mitk.cli.outputs import check_output_file
from mitk.errors import ConfigError
from mitk.model import HookedTransformer
from mitk.sequences import repeated_random_tokens
from mitk.viz import (
    Section,
    cached_attention_heatmap,
    composition_heatmap,
    dashboard,
    dla_bar,
    eigenvalue_scatter,
    head_scores_heatmap,
    logit_lens_heatmap,
    patching_heatmap,
)

DEFAULT_OUT = Path("mitk-demo/report.html")


@dataclass(frozen=True)
class Findings:
    """Everything the demo measured, for printing, JSON and the report."""

    losses: tuple[float, float]
    attribution: Attribution
    detectors: pd.DataFrame
    k_composition: torch.Tensor
    baseline: CompositionBaseline
    patching: PatchResult
    lens: LogitLens
    """Read at every position but the last, against each position's next token."""


def _top(log_probs: torch.Tensor, k: int) -> list[tuple[int, float]]:
    probs, ids = log_probs.exp().topk(k)
    return [(int(i), float(p)) for p, i in zip(probs, ids, strict=True)]


def _predictions(tokens: torch.Tensor, log_probs: torch.Tensor, half: int, top: int) -> list[dict]:
    """Top predictions at the end of each copy of the segment (row 0)."""
    shown = [half - 1, half, 2 * half - 1, 2 * half]
    return [
        {
            "pos": pos,
            "token": int(tokens[0, pos]),
            "next": int(tokens[0, pos + 1]) if pos + 1 < tokens.shape[1] else None,
            "top": _top(log_probs[0, pos], top),
        }
        for pos in shown
    ]


def _next_token_lens(lens: LogitLens) -> LogitLens:
    """The lens without the last position, which has no next token to score."""
    return LogitLens(lens.logits[:, :, :-1], lens.labels)


def _patch_heads(net: HookedTransformer, tokens: torch.Tensor, half: int, seed: int) -> PatchResult:
    """Denoise each head's output: clean = repeated segment, corrupted = a different first copy."""
    other = repeated_random_tokens(tokens.shape[0], half, net.cfg.d_vocab,
                                   torch.Generator().manual_seed(seed + 2))  # fmt: skip
    corrupted = tokens.clone()
    corrupted[:, 1 : half + 1] = other[:, 1 : half + 1]
    # at the second-to-last position the clean context predicts the last token; the
    # corrupted context would predict what followed that token in its own first copy
    metric = logit_diff(tokens[:, -1], corrupted[:, half], pos=-2)
    return activation_patch(net, tokens, corrupted, metric, "z", "head")


def _attention_heads(detectors: pd.DataFrame, n_induction: int = 3) -> list[tuple[int, int]]:
    """The strongest induction heads, then the strongest previous-token head they read from."""
    ranked = detectors.sort_values("induction", ascending=False).head(n_induction)
    previous = detectors.loc[detectors["previous_token"].idxmax()]
    heads = [(int(row.layer), int(row.head)) for row in ranked.itertuples()]
    prev = (int(previous["layer"]), int(previous["head"]))
    return heads + ([prev] if prev not in heads else [])


INDUCTION_HEAD = 0.5  # induction score from which the report calls a head an induction head


def _ov_note(detectors: pd.DataFrame, copying: torch.Tensor) -> str:
    """What the full-OV eigenvalue figure shows, with the induction heads' copying scores."""
    ranked = detectors.sort_values("induction", ascending=False)
    induction, others = [], []
    for row in ranked.itertuples():
        score = float(copying[int(row.layer), int(row.head)])
        if float(row.induction) >= INDUCTION_HEAD:
            induction.append(f"L{row.layer}H{row.head} {score:+.2f}")
        else:
            others.append(score)
    found = ", ".join(induction) or "none"
    rest = f"; the other heads {min(others):+.2f} to {max(others):+.2f}" if others else ""
    return (
        "Eigenvalues of each head's full OV circuit W_E W_V W_O W_U (token attended to → "
        "logits), each head's eigenvalues scaled by its largest |λ|; the legend gives "
        "Σλ/Σ|λ|. Mostly positive eigenvalues (near +1) mean the head raises the logit of the "
        f"token it attends to: it copies. Induction heads (induction score ≥ {INDUCTION_HEAD}): "
        f"{found}{rest}."
    )


def _report(out: Path, model_name: str, net: HookedTransformer, half: int, batch: int,
            seed: int, found: Findings, cache: Any, tokens: torch.Tensor) -> Path:  # fmt: skip
    header = {
        "model": f"{model_name} ({net.cfg.n_layers} layers, d_model {net.cfg.d_model}, "
        f"{net.cfg.n_heads} heads)",
        "prompts": f"{batch} sequences: BOS + {half} random tokens, repeated once (seed {seed})",
        "loss": f"first half {found.losses[0]:.3f} nats, repeated half {found.losses[1]:.3f} nats",
        "settings": f"attribution and patching at position -2; head detectors on {half}-token "
        f"probes (seed {seed + 1}); patching corrupts the first copy (seed {seed + 2})",
    }
    labels = ["BOS", *(str(t) for t in tokens[0, 1:].tolist())]  # random ids: no words to show
    sections = [
        Section("Direct logit attribution of the correct next token", dla_bar(found.attribution),
                note="At the second-to-last position, each component's direct contribution "
                f"to the logit of the token that follows, mean over the {batch} prompts; the "
                "bars sum to the model's logit."),
        Section("Logit lens", logit_lens_heatmap(found.lens, tokens[:, 1:], tokens=labels[:-1]),
                note="Prompt 0: rank (0 = top) of each position's next token, read from the "
                "residual stream after each block. The repeated half becomes predictable only "
                "after block 1, where the induction heads write."),
        Section("Attention patterns", cached_attention_heatmap(
                    cache, _attention_heads(found.detectors), labels),
                note="Prompt 0, token ids on both axes; pick a head from the menu. Induction "
                "heads attend from a repeated token to the token after its first occurrence "
                "(an off-diagonal stripe); the previous-token head to the position before."),
        Section("Previous-token heads", head_scores_heatmap(found.detectors, "previous_token")),
        Section("Induction heads", head_scores_heatmap(found.detectors, "induction")),
        Section("K-composition", composition_heatmap(found.k_composition, found.baseline.mean),
                note=f"Random baseline {found.baseline.mean:.3f} ± {found.baseline.std:.3f}."),
        Section("OV circuit eigenvalues", eigenvalue_scatter(full_ov_circuit(net), "full OV"),
                note=_ov_note(found.detectors, ov_copying_scores(net))),
        Section("Activation patching of each head's output", patching_heatmap(found.patching),
                note="Clean: the repeated sequence; corrupted: a different first copy. 1 means "
                "patching that head alone restores the clean logit difference."),
        Section("Head detector scores", found.detectors),
    ]  # fmt: skip
    return dashboard(out, title=f"mitk demo: {model_name}", header=header, items=sections)


def demo(
    model: Annotated[str, typer.Option(help="Embedded model name or local directory.")] = (
        "shakespeare-small"
    ),
    prompt: Annotated[
        str | None,
        typer.Option(
            help="Text to analyse (models with a tokenizer; default: a held-out play's opening)."
        ),
    ] = None,
    half: Annotated[
        int, typer.Option(min=1, help="Length of the random segment that repeats (no tokenizer).")
    ] = 20,
    batch: Annotated[
        int, typer.Option(min=1, max=4096, help="Number of random prompts (no tokenizer).")
    ] = 16,
    top: Annotated[int, typer.Option(min=1, help="Top predictions to show per position.")] = 3,
    seed: Annotated[int, typer.Option(min=0, max=MAX_SEED, help="Seed for the random tokens.")] = 0,
    out: Annotated[Path, typer.Option(help="Where to write the HTML report.")] = DEFAULT_OUT,
    as_json: Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")] = False,
) -> None:
    """Analyse a model on text (or, without a tokenizer, repeated random tokens); write a report."""
    check_output_file(out, "--out")
    net = HookedTransformer.from_pretrained(model)
    if net.tokenizer is not None:
        text_found, text_cache, text_tokens = measure_text(net, prompt or DEFAULT_PROMPT, seed, top)
        path, titles = write_text_report(out, model, net, text_found, text_cache, text_tokens)
        if as_json:
            print_text_json(model, text_found, path, titles)
        else:
            print_text_summary(model, net, text_found, path)
        return
    if prompt is not None:
        raise ConfigError(f"--prompt needs a model with a tokenizer; {model} has none")
    if 2 * half + 1 > net.cfg.n_ctx:
        longest = (net.cfg.n_ctx - 1) // 2
        raise ConfigError(f"--half {half} makes {2 * half + 1} tokens; the model's context is "
                          f"{net.cfg.n_ctx}, so use at most {longest}")  # fmt: skip
    gen = torch.Generator().manual_seed(seed)
    tokens = repeated_random_tokens(batch, half, net.cfg.d_vocab, gen)
    with torch.no_grad():
        logits, cache = net.run_with_cache(tokens)
    log_probs = logits.log_softmax(-1)
    nll = -log_probs[:, :-1].gather(-1, tokens[:, 1:, None])[..., 0]
    found = Findings(
        losses=(nll[:, :half].mean().item(), nll[:, half + 1 :].mean().item()),
        attribution=logit_attribution(net, cache, tokens[:, -1], pos=-2, by="head"),
        detectors=head_detector_scores(net, half=half, seed=seed + 1),
        k_composition=composition_scores(net, "K"),
        baseline=composition_baseline(net, "K"),
        patching=_patch_heads(net, tokens, half, seed),
        lens=_next_token_lens(logit_lens(net, cache)),
    )
    path = _report(out, model, net, half, batch, seed, found, cache, tokens)
    predictions = _predictions(tokens, log_probs, half, top)
    if as_json:
        _print_json(model, cache, found, predictions, path)
    else:
        _print_text(model, net, batch, half, cache, found, predictions, path)


def _print_json(
    model: str, cache: Any, found: Findings, predictions: list[dict], path: Path
) -> None:
    result = {
        "model": model,
        "loss_first_half": found.losses[0],
        "loss_repeated_half": found.losses[1],
        "cached": {k: list(v.shape) for k, v in cache.items()},
        "predictions": predictions,
        "top_attributions": found.attribution.top(5),
        "heads": found.detectors.to_dict(orient="records"),
        "k_composition_max": float(found.k_composition.max()),
        "k_composition_baseline": list(found.baseline),
        "patching_normalized": found.patching.normalized().tolist(),
        "report": str(path),
    }
    typer.echo(json.dumps(result))


def _print_text(model: str, net: HookedTransformer, batch: int, half: int, cache: Any,
                found: Findings, predictions: list[dict], path: Path) -> None:  # fmt: skip
    cfg = net.cfg
    typer.echo(f"model {model}: {cfg.n_layers} layers, d_model {cfg.d_model}, {cfg.n_heads} heads")
    typer.echo(f"input: {batch} x (BOS + {half} random tokens, then the same {half} again)\n")
    typer.echo(cache.summary())
    first, repeat = found.losses
    typer.echo(f"\nloss on first half {first:.3f} nats, on repeated half {repeat:.3f} nats")
    typer.echo("top predictions for prompt 0 (token id: probability):")
    for row in predictions:
        tops = ", ".join(f"{i}: {p:.2f}" for i, p in row["top"])
        typer.echo(f"  pos {row['pos']:>3} token {row['token']:>4} -> next {row['next']}  [{tops}]")
    typer.echo("\nlargest direct logit attributions (mean over prompts):")
    for label, value in found.attribution.top(5):
        typer.echo(f"  {label:<14} {value:+.3f}")
    heads = found.detectors
    best, prev = heads.loc[heads["induction"].idxmax()], heads.loc[heads["previous_token"].idxmax()]
    typer.echo(f"\nstrongest previous-token head {prev['label']} ({prev['previous_token']:.2f}), "
               f"strongest induction head {best['label']} ({best['induction']:.2f})")  # fmt: skip
    flat = found.k_composition.flatten().argmax().item()
    n_heads = cfg.n_heads
    writer, reader = divmod(flat, cfg.n_layers * n_heads)
    typer.echo(
        f"strongest K-composition L{writer // n_heads}H{writer % n_heads} -> "
        f"L{reader // n_heads}H{reader % n_heads}: {found.k_composition.max():.3f} "
        f"(random baseline {found.baseline.mean:.3f} ± {found.baseline.std:.3f})"
    )
    recovery = found.patching.normalized()
    layer, head = divmod(int(recovery.flatten().argmax()), recovery.shape[1])
    typer.echo(f"patching one head restores most: L{layer}H{head} "
               f"({recovery.max():.2f} of the clean logit difference)")  # fmt: skip
    typer.echo(f"\nreport written to {path.resolve()}")
