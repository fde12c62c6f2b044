"""``mitk models``: what can be loaded by name, and which architectures convert."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from mitk.config import TransformerConfig
from mitk.model import embedded_models, supported_architectures


def models(
    as_json: Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")] = False,
) -> None:
    """List the embedded models and the Hugging Face architectures mitk converts."""
    rows = []
    for name, path in embedded_models().items():
        cfg = TransformerConfig.from_json((path / "mitk_config.json").read_text())
        rows.append({
            "name": name,
            "path": str(path),
            "layers": cfg.n_layers,
            "d_model": cfg.d_model,
            "heads": cfg.n_heads,
            "attention_only": not cfg.has_mlp,
        })  # fmt: skip
    if as_json:
        typer.echo(json.dumps({"embedded": rows, "architectures": supported_architectures()}))
        return
    typer.echo("embedded models:")
    for row in rows:
        kind = "attention-only" if row["attention_only"] else "with MLPs"
        typer.echo(f"  {row['name']:<16} {row['layers']} layers, d_model {row['d_model']}, "
                   f"{row['heads']} heads, {kind}")  # fmt: skip
    typer.echo(f"Hugging Face architectures: {', '.join(supported_architectures())}")
