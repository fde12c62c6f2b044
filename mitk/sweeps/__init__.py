"""Resumable, sharded patching sweeps: spec, prompt pairs, work units, chunks, shards, merge.

From a notebook::

    from mitk.sweeps import SweepSpec, run_sweep

    spec = SweepSpec(pairs=pairs, sites=("z:head", "resid_pre:pos"), metric="logit_diff")
    run = run_sweep(model, spec, "runs/ioi")  # rerun the same call to resume
    frame = run.results()

``mitk patch`` is the same engine behind flags and spec files.
"""

from mitk.sweeps.chunks import ChunkStore, IncompleteSweepError
from mitk.sweeps.pairs import PairsError, PromptPair, Vocabulary, read_pairs
from mitk.sweeps.placement import load_named_model
from mitk.sweeps.results import DashboardWriter, finish, mean_results
from mitk.sweeps.run import SweepRun, merge_sweep, read_results, run_sweep
from mitk.sweeps.runner import RunStats, Sweep, prepare, run_units
from mitk.sweeps.shard import Shard, current_shard, parse_shard
from mitk.sweeps.spec import SweepSpec, field_help, read_spec_file

__all__ = [
    "ChunkStore",
    "DashboardWriter",
    "IncompleteSweepError",
    "PairsError",
    "PromptPair",
    "RunStats",
    "Shard",
    "Sweep",
    "SweepRun",
    "SweepSpec",
    "Vocabulary",
    "current_shard",
    "field_help",
    "finish",
    "load_named_model",
    "mean_results",
    "merge_sweep",
    "parse_shard",
    "prepare",
    "read_pairs",
    "read_results",
    "read_spec_file",
    "run_sweep",
    "run_units",
]
