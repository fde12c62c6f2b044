"""Patching sweeps from the shell: spec, prompt pairs, work units, chunks, shards, the loop."""

from mitk.cli.sweep.chunks import ChunkStore, IncompleteSweepError
from mitk.cli.sweep.pairs import PairsError, PromptPair, Vocabulary, read_pairs
from mitk.cli.sweep.results import finish, mean_results
from mitk.cli.sweep.runner import RunStats, Sweep, prepare, run_units
from mitk.cli.sweep.shard import Shard, current_shard, parse_shard
from mitk.cli.sweep.spec import SweepSpec, field_help, read_spec_file

__all__ = [
    "ChunkStore",
    "IncompleteSweepError",
    "PairsError",
    "PromptPair",
    "RunStats",
    "Shard",
    "Sweep",
    "SweepSpec",
    "Vocabulary",
    "current_shard",
    "field_help",
    "finish",
    "mean_results",
    "parse_shard",
    "prepare",
    "read_pairs",
    "read_spec_file",
    "run_units",
]
