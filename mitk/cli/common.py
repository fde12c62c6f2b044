"""What every command shares: the model and output flags, and printing results."""

from __future__ import annotations

from collections.abc import Iterable
import json
from typing import Annotated, Any

import typer

from mitk.sweeps.spec import device_problem

ModelOption = Annotated[
    str, typer.Option("--model", "-m", help="Embedded model name or local model directory.")
]


def device_value(text: str) -> str:
    """``--device``: a device this machine has, else a usage error (exit 2)."""
    problem = device_problem(text)
    if problem is not None:
        raise typer.BadParameter(problem)
    return text


DeviceOption = Annotated[
    str,
    typer.Option(callback=device_value, help="Torch device to run on, e.g. cpu or cuda:0."),
]
DtypeOption = Annotated[
    str, typer.Option(help="Weights and activations dtype: float32, float64, float16, bfloat16.")
]
JsonOption = Annotated[
    bool, typer.Option("--json", help="Print one machine-readable JSON object on stdout.")
]
QuietOption = Annotated[
    bool, typer.Option("--quiet", "-q", help="Print nothing but errors; no progress bars.")
]


def emit(result: dict[str, Any], as_json: bool, quiet: bool, lines: Iterable[str]) -> None:
    """Print ``result`` as one JSON object, or the human-readable ``lines`` unless quiet."""
    if as_json:
        typer.echo(json.dumps(result, default=str))
    elif not quiet:
        for line in lines:
            typer.echo(line)
