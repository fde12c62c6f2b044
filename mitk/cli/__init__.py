"""The ``mitk`` command line: one entry point, one subcommand per job."""

from mitk.cli.app import app, main

__all__ = ["app", "main"]
