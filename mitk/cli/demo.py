"""``mitk demo``: the README's main job, on an embedded model, ending in an HTML report."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import torch
import typer

from mitk.analysis.detectors import head_detector_scores
from mitk.analysis.dla import Attribution, logit_attribution
from mitk.model import HookedTransformer
from mitk.sequences import repeated_random_tokens
from mitk.viz import Section, dla_bar, head_scores_heatmap, write_report

DEFAULT_OUT = Path("mitk-demo/report.html")


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


def _report(
    out: Path, model_name: str, net: HookedTransformer, half: int, batch: int, seed: int,
    losses: tuple[float, float], attribution: Attribution, detectors: Any,
) -> Path:  # fmt: skip
    header = {
        "model": f"{model_name} ({net.cfg.n_layers} layers, d_model {net.cfg.d_model}, "
        f"{net.cfg.n_heads} heads)",
        "prompts": f"{batch} sequences: BOS + {half} random tokens, repeated once (seed {seed})",
        "loss": f"first half {losses[0]:.3f} nats, repeated half {losses[1]:.3f} nats",
    }
    sections = [
        Section(
            "Direct logit attribution of the correct next token",
            dla_bar(attribution),
            note="At the second-to-last position, each head's direct contribution to the logit "
            "of the token that follows; the bars sum to the model's logit.",
        ),
        Section("Previous-token heads", head_scores_heatmap(detectors, "previous_token")),
        Section("Induction heads", head_scores_heatmap(detectors, "induction")),
        Section("Head detector scores", detectors),
    ]
    return write_report(out, f"mitk demo: {model_name}", header, sections)


def demo(
    model: Annotated[str, typer.Option(help="Embedded model name or local directory.")] = (
        "toy-induction"
    ),
    half: Annotated[int, typer.Option(help="Length of the random segment that repeats.")] = 20,
    batch: Annotated[int, typer.Option(help="Number of random prompts.")] = 16,
    top: Annotated[int, typer.Option(help="Top predictions to show per position.")] = 3,
    seed: Annotated[int, typer.Option(help="Seed for the random tokens.")] = 0,
    out: Annotated[Path, typer.Option(help="Where to write the HTML report.")] = DEFAULT_OUT,
    as_json: Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")] = False,
) -> None:
    """Cache a forward on repeated random tokens, attribute, detect heads, write a report."""
    net = HookedTransformer.from_pretrained(model)
    tokens = repeated_random_tokens(
        batch, half, net.cfg.d_vocab, torch.Generator().manual_seed(seed)
    )
    with torch.no_grad():
        logits, cache = net.run_with_cache(tokens)
    log_probs = logits.log_softmax(-1)
    nll = -log_probs[:, :-1].gather(-1, tokens[:, 1:, None])[..., 0]
    losses = (nll[:, :half].mean().item(), nll[:, half + 1 :].mean().item())
    attribution = logit_attribution(net, cache, tokens[:, -1], pos=-2, by="head")
    detectors = head_detector_scores(net, half=half, seed=seed + 1)
    path = _report(out, model, net, half, batch, seed, losses, attribution, detectors)
    predictions = _predictions(tokens, log_probs, half, top)
    if as_json:
        result = {
            "model": model,
            "loss_first_half": losses[0],
            "loss_repeated_half": losses[1],
            "cached": {k: list(v.shape) for k, v in cache.items()},
            "predictions": predictions,
            "top_attributions": attribution.top(5),
            "heads": detectors.to_dict(orient="records"),
            "report": str(path),
        }
        typer.echo(json.dumps(result))
        return
    cfg = net.cfg
    typer.echo(f"model {model}: {cfg.n_layers} layers, d_model {cfg.d_model}, {cfg.n_heads} heads")
    typer.echo(f"input: {batch} x (BOS + {half} random tokens, then the same {half} again)\n")
    typer.echo(cache.summary())
    typer.echo(f"\nloss on first half {losses[0]:.3f} nats, on repeated half {losses[1]:.3f} nats")
    typer.echo("top predictions for prompt 0 (token id: probability):")
    for row in predictions:
        tops = ", ".join(f"{i}: {p:.2f}" for i, p in row["top"])
        typer.echo(f"  pos {row['pos']:>3} token {row['token']:>4} -> next {row['next']}  [{tops}]")
    typer.echo("\nlargest direct logit attributions (mean over prompts):")
    for label, value in attribution.top(5):
        typer.echo(f"  {label:<14} {value:+.3f}")
    best = detectors.loc[detectors["induction"].idxmax()]
    prev = detectors.loc[detectors["previous_token"].idxmax()]
    typer.echo(f"\nstrongest previous-token head {prev['label']} ({prev['previous_token']:.2f}), "
               f"strongest induction head {best['label']} ({best['induction']:.2f})")  # fmt: skip
    typer.echo(f"\nreport written to {path.resolve()}")
