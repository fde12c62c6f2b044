"""Typer application and the exit-code contract: 0 ok, 2 bad input or usage, 1 failure."""

from __future__ import annotations

import sys

import typer

from mitk.cli import circuits, dashboard, demo, dla, models, patch, sae
from mitk.errors import MitkError

app = typer.Typer(
    name="mitk",
    help="Mechanistic-interpretability toolkit: hooks, caches, analysis and sweeps.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.command("demo")(demo.demo)
app.command("models")(models.models)
app.command("patch", epilog=patch.EPILOG)(patch.patch)
app.command("dla")(dla.dla)
app.command("circuits")(circuits.circuits)
app.add_typer(sae.app, name="sae")
app.command("dashboard")(dashboard.dashboard)


def main() -> None:
    """Console-script entry: bad input exits 2 with the message, never a traceback."""
    try:
        app(standalone_mode=False)
    except (MitkError, FileNotFoundError) as err:
        typer.echo(f"error: {err}", err=True)
        sys.exit(2)
    except typer.Exit as done:
        sys.exit(done.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        typer.echo("aborted", err=True)
        sys.exit(1)
    except Exception as err:  # click's usage errors carry their own exit code
        code = getattr(err, "exit_code", None)
        if code is not None:
            show = getattr(err, "show", None)
            if callable(show):
                show()
            sys.exit(code)
        raise
