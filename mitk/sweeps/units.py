"""Work units: the sweep cut into (prompt-pair batch x site x granularity) pieces.

Unit boundaries depend only on the number of pairs, the batch size and the
(site, granularity) grid, so every process and every restart of the same spec
cuts the same units and numbers them the same way.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Unit:
    """One piece of work: pairs ``[start, stop)`` patched at ``site`` per ``per``."""

    index: int
    batch: int
    start: int
    stop: int
    site: str
    per: str

    @property
    def name(self) -> str:
        """File stem of this unit's chunk."""
        return f"unit-{self.index:06d}"


def plan_units(n_pairs: int, batch_size: int, grid: list[tuple[str, str]]) -> list[Unit]:
    """All units in order: each (site, per) of ``grid`` over consecutive batches of pairs."""
    starts = range(0, n_pairs, batch_size)
    units: list[Unit] = []
    for site, per in grid:
        for batch, start in enumerate(starts):
            stop = min(start + batch_size, n_pairs)
            units.append(Unit(len(units), batch, start, stop, site, per))
    return units
