"""Which work units this process runs: torchrun's rank/world, or ``--shard i/N``.

Units are dealt round-robin (unit ``u`` goes to shard ``u % N``), so every
shard gets a similar mix of sites and the split depends only on the unit list,
never on timing. Resuming with a different number of shards is fine: a unit is
skipped wherever its chunk already exists.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
import os
from typing import TypeVar

from mitk.errors import ConfigError

T = TypeVar("T")


@dataclass(frozen=True)
class Shard:
    """Shard ``index`` of ``count``; ``launched`` is True under torchrun (ranks synchronise)."""

    index: int = 0
    count: int = 1
    launched: bool = False

    def __post_init__(self) -> None:
        if not 0 <= self.index < self.count:
            raise ConfigError(f"shard {self.index}/{self.count}: need 0 <= i < N")

    @property
    def is_main(self) -> bool:
        """True on the shard that merges the chunks when all shards run together."""
        return self.index == 0

    def take(self, units: Sequence[T]) -> list[T]:
        """This shard's units, in order."""
        return [u for i, u in enumerate(units) if i % self.count == self.index]

    def label(self) -> str:
        """``i-of-N``, for file names."""
        return f"{self.index}-of-{self.count}"


def parse_shard(text: str) -> Shard:
    """``"i/N"`` (e.g. a Slurm array's ``$SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT``)."""
    index, slash, count = text.partition("/")
    if not slash or not index.strip().isdigit() or not count.strip().isdigit():
        raise ConfigError(f"--shard takes i/N with integers, e.g. 0/4; got {text!r}")
    return Shard(int(index), int(count))


def current_shard(flag: str | None, env: Mapping[str, str] = os.environ) -> Shard:
    """The shard from ``--shard`` if given, else from torchrun's ``RANK``/``WORLD_SIZE``."""
    world = int(env.get("WORLD_SIZE", "1"))
    if flag is not None:
        if world > 1:
            raise ConfigError("--shard splits work by hand; under torchrun the ranks split it")
        return parse_shard(flag)
    if world > 1:
        return Shard(int(env["RANK"]), world, launched=True)
    return Shard()
