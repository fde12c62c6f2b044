"""Typer application and the exit-code contract: 0 ok, 2 bad input or usage, 1 failure.

One table (``EXIT_CODES``) maps exception types to exit codes for every command;
no command catches errors to choose a code itself. Bad input is exit 2 with
``error: <what>, <where>``; anything else is a failure, exit 1, with a one-line
``error: <Type>: <message>`` first. ``mitk --debug`` (or ``MITK_DEBUG=1``) prints
the traceback too. Input files are parsed where they are read, and their parse
errors are raised there as ``MitkError`` subclasses naming the file, so a
``ValueError`` from deep inside torch stays a failure and is not mistaken for
bad input.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache
import json
import sys
import traceback
from typing import Annotated, Any

import typer

from mitk.cli import circuits, dashboard, demo, dla, graph, models, patch, sae
from mitk.cli.settings import SETTINGS
from mitk.errors import MitkError

EXIT_CODES: tuple[tuple[type[BaseException], int], ...] = (
    (MitkError, 2),  # every error mitk raises on purpose about its input
    (FileNotFoundError, 2),  # a path given on the command line or in a file
    (IsADirectoryError, 2),
    (NotADirectoryError, 2),
    (PermissionError, 2),
    (UnicodeDecodeError, 2),  # only ever about a file's bytes
    (json.JSONDecodeError, 2),
    (KeyboardInterrupt, 130),  # as a shell reports Ctrl-C
)
"""Exception type -> exit code, first match wins; anything else is a failure, exit 1."""

app = typer.Typer(
    name="mitk",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def options(
    debug: Annotated[
        bool,
        typer.Option(
            "--debug", help="On an error, also print the traceback (or set MITK_DEBUG=1)."
        ),
    ] = False,
    lock_wait: Annotated[
        float,
        typer.Option(
            "--lock-wait",
            min=0,
            max=7 * 24 * 3600,
            help="Seconds to wait for another run's lock on an output folder (default: exit 2).",
        ),
    ] = 0.0,
) -> None:
    """Mechanistic-interpretability toolkit: hooks, caches, analysis and sweeps.

    Exit codes: 0 done; 2 bad input or usage (a message names the file, line
    and field or the option; nothing was run); 1 a failure, with a one-line
    message (mitk --debug shows the traceback).
    """
    SETTINGS.debug = SETTINGS.debug or debug
    SETTINGS.lock_wait_seconds = lock_wait


app.command("demo")(demo.demo)
app.command("models")(models.models)
app.command("patch", epilog=patch.EPILOG)(patch.patch)
app.command("dla")(dla.dla)
app.command("circuits")(circuits.circuits)
app.add_typer(sae.app, name="sae")
app.command("dashboard")(dashboard.dashboard)
app.command("graph")(graph.graph)


@cache
def command() -> Any:
    """The parser typer builds from ``app``, built once (tests run many command lines)."""
    return typer.main.get_command(app)


def exit_code(error: BaseException) -> int:
    """The exit code ``EXIT_CODES`` gives ``error``: 2 for bad input, 1 for a failure."""
    return next((code for kind, code in EXIT_CODES if isinstance(error, kind)), 1)


def run(argv: Sequence[str] | None = None) -> int:
    """Run the command line ``argv`` (default ``sys.argv[1:]``); its exit code.

    Errors are reported on stderr as the module docstring says; nothing is raised.
    """
    SETTINGS.reset()
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        done = command()(args=args, prog_name="mitk", standalone_mode=False)
    except typer.Exit as stop:
        return stop.exit_code
    except typer.TyperException as usage:  # bad options or arguments: the parser's code (2)
        report_usage(usage)
        return usage.exit_code
    except typer.Abort:  # Ctrl-C while the parser had control
        typer.echo("aborted", err=True)
        return 130
    except (Exception, KeyboardInterrupt) as error:
        return report(error)
    return done if isinstance(done, int) else 0


def report_usage(usage: typer.TyperException) -> None:
    """A usage error as ``error: <what>`` and where to find help."""
    if type(usage).__name__ == "NoArgsIsHelpError":  # a bare group: typer printed its help
        return
    ctx = getattr(usage, "ctx", None)
    typer.echo(f"error: {usage.format_message()}", err=True)
    if ctx is not None:
        typer.echo(f"Try '{ctx.command_path} --help' for help.", err=True)


def report(error: BaseException) -> int:
    """Print ``error`` as the contract says (traceback first under --debug); its exit code."""
    code = exit_code(error)
    if SETTINGS.debug:
        traceback.print_exception(error)
    if code == 130:
        typer.echo("aborted", err=True)
    elif code == 2:
        typer.echo(f"error: {error}", err=True)
    else:
        message = str(error).strip()
        summary = f"{type(error).__name__}: {message}" if message else type(error).__name__
        typer.echo(f"error: {summary}", err=True)
        if not SETTINGS.debug:
            typer.echo("(run `mitk --debug ...` for the traceback)", err=True)
    return code


def main() -> None:
    """Console-script entry: exits with ``run``'s code."""
    sys.exit(run())
