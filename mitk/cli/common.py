"""What every command shares: model loading, the output flags, and printing results."""

from __future__ import annotations

from collections.abc import Iterable
import json
from pathlib import Path
from typing import Annotated, Any

import torch
import typer

from mitk.config import torch_dtype
from mitk.errors import ConfigError
from mitk.model import HookedTransformer, embedded_models

ModelOption = Annotated[
    str, typer.Option("--model", "-m", help="Embedded model name or local model directory.")
]
DeviceOption = Annotated[str, typer.Option(help="Torch device to run on, e.g. cpu or cuda:0.")]
DtypeOption = Annotated[
    str, typer.Option(help="Weights and activations dtype: float32, float64, float16, bfloat16.")
]
JsonOption = Annotated[
    bool, typer.Option("--json", help="Print one machine-readable JSON object on stdout.")
]
QuietOption = Annotated[
    bool, typer.Option("--quiet", "-q", help="Print nothing but errors; no progress bars.")
]


def load_model(source: str, device: str = "cpu", dtype: str = "float32") -> HookedTransformer:
    """Load an embedded model by name or a local directory, on ``device`` in ``dtype``.

    Raises ``ConfigError`` naming the embedded models when ``source`` is neither.
    """
    if source not in embedded_models() and not Path(source).is_dir():
        names = ", ".join(sorted(embedded_models()))
        raise ConfigError(
            f"unknown model {source!r}: not an embedded model ({names}) nor a local directory"
        )
    model = HookedTransformer.from_pretrained(source)
    return model.to(device=torch.device(device), dtype=torch_dtype(dtype)).eval()


def emit(result: dict[str, Any], as_json: bool, quiet: bool, lines: Iterable[str]) -> None:
    """Print ``result`` as one JSON object, or the human-readable ``lines`` unless quiet."""
    if as_json:
        typer.echo(json.dumps(result, default=str))
    elif not quiet:
        for line in lines:
            typer.echo(line)
