"""Options of the ``mitk`` command itself (before the subcommand), for the whole run."""

from __future__ import annotations

from dataclasses import dataclass
import os

DEBUG_VARIABLE = "MITK_DEBUG"


@dataclass
class Settings:
    """``mitk --debug`` and ``mitk --lock-wait``; ``reset`` before each run."""

    debug: bool = False
    """Print the traceback of an error, not only its one-line message."""
    lock_wait_seconds: float = 0.0
    """How long to wait for another run's lock on an output before exit 2."""

    def reset(self) -> None:
        """The defaults, with ``MITK_DEBUG=1`` (any value but empty or 0) turning debug on."""
        self.debug = os.environ.get(DEBUG_VARIABLE, "").strip() not in ("", "0")
        self.lock_wait_seconds = 0.0


SETTINGS = Settings()
