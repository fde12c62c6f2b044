"""``mitk demo``: the README's main job, on an embedded model."""

from __future__ import annotations

import json
from typing import Any

import torch
import typer

from mitk.model import HookedTransformer
from mitk.sequences import repeated_random_tokens


def _top(log_probs: torch.Tensor, k: int) -> list[tuple[int, float]]:
    probs, ids = log_probs.exp().topk(k)
    return [(int(i), float(p)) for p, i in zip(probs, ids, strict=True)]


def demo(
    model: str = typer.Option("toy-induction", help="Embedded model name or local directory."),
    half: int = typer.Option(20, help="Length of the random segment that is repeated."),
    top: int = typer.Option(3, help="Top predictions to show per position."),
    seed: int = typer.Option(0, help="Seed for the random tokens."),
    as_json: bool = typer.Option(False, "--json", help="Print machine-readable JSON."),
) -> None:
    """Load a model, cache one forward on a repeated random sequence, show what it predicts."""
    net = HookedTransformer.from_pretrained(model).eval()
    gen = torch.Generator().manual_seed(seed)
    tokens = repeated_random_tokens(1, half, net.cfg.d_vocab, gen, bos=0)
    with torch.no_grad():
        logits, cache = net.run_with_cache(tokens)
    log_probs = logits[0].log_softmax(-1)
    nll = -log_probs[:-1].gather(-1, tokens[0, 1:, None])[:, 0]
    first, repeat = nll[:half].mean().item(), nll[half + 1 :].mean().item()
    shown = [half - 2, half - 1, 2 * half - 2, 2 * half - 1]
    predictions: list[dict[str, Any]] = [
        {
            "pos": pos,
            "token": int(tokens[0, pos]),
            "next": int(tokens[0, pos + 1]) if pos + 1 < tokens.shape[1] else None,
            "top": _top(log_probs[pos], top),
        }
        for pos in shown
    ]
    if as_json:
        result = {"model": model, "loss_first_half": first, "loss_repeated_half": repeat,
                  "cached": {k: list(v.shape) for k, v in cache.items()},
                  "predictions": predictions}  # fmt: skip
        typer.echo(json.dumps(result))
        return
    cfg = net.cfg
    typer.echo(f"model {model}: {cfg.n_layers} layers, d_model {cfg.d_model}, {cfg.n_heads} heads")
    typer.echo(f"input: BOS + {half} random tokens, then the same {half} again\n")
    typer.echo(cache.summary())
    typer.echo(f"\nloss on first half {first:.3f} nats, on repeated half {repeat:.3f} nats")
    typer.echo("top predictions (token id: probability):")
    for row in predictions:
        tops = ", ".join(f"{i}: {p:.2f}" for i, p in row["top"])
        typer.echo(f"  pos {row['pos']:>3} token {row['token']:>4} -> next {row['next']}  [{tops}]")
