"""``mitk patch``: an activation-patching sweep over many prompt pairs, resumable and sharded."""

from __future__ import annotations

from dataclasses import asdict
import json
from pathlib import Path
from typing import Annotated, Any

import pandas as pd
import typer

from mitk.cli.common import JsonOption, QuietOption, emit
from mitk.cli.outputs import check_output_dir, check_output_file, hold_output_lock
from mitk.errors import ConfigError
from mitk.sweeps import (
    DashboardWriter,
    Shard,
    SweepSpec,
    current_shard,
    field_help,
    mean_results,
    merge_sweep,
    run_sweep,
)
from mitk.sweeps.pairs import check_pairs
from mitk.sweeps.spec import device_problem, load_spec_file

HELP = field_help()

# Paragraphs are single lines: the help formatter wraps them to the terminal.
EPILOG = "\n\n".join(
    [
        "Output: OUT/results.parquet (one row per pair, site, granularity, layer, position and "
        "head) and OUT/results.json (spec, model, versions, timings). A killed sweep rerun with "
        "the same spec resumes from its finished chunks; a different spec on the same OUT is "
        "refused.",
        "Several processes: `torchrun --nproc-per-node 4 -m mitk patch --spec s.yaml --out OUT` "
        "(multi-node too) splits the work units across ranks and rank 0 merges. Slurm array: "
        "`mitk patch --spec s.yaml --out OUT --shard $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT` "
        "in each task (OUT on a shared filesystem), then `mitk patch --merge OUT`.",
        "Models larger than one GPU: `--device-map auto` spreads whole blocks over the visible "
        "GPUs with Hugging Face accelerate, so hooks still see whole activations.",
        "Before any work the spec, the pairs (all but their token ids against the vocabulary) "
        "and the output targets are checked, and OUT is locked: a second run on the same OUT "
        "(and shard) exits 2 naming the process that holds it (`mitk --lock-wait SECONDS patch "
        "...` waits instead). A lock left by a killed run is taken over with a warning.",
        "Exit codes: 0 done, 2 bad spec, pairs, output or usage (nothing was run), 1 failure.",
    ]
)


def _opt(field: str, *names: str) -> Any:
    return typer.Option(*names, help=HELP[field], show_default=False)


def patch(
    ctx: typer.Context,
    out: Annotated[Path | None, typer.Option(help="Output folder (chunks, results).")] = None,
    spec_file: Annotated[
        Path | None, typer.Option("--spec", help="YAML or JSON spec file; flags override it.")
    ] = None,
    model: Annotated[str | None, _opt("model", "--model", "-m")] = None,
    pairs_file: Annotated[Path | None, _opt("pairs_file", "--pairs")] = None,
    pair: Annotated[
        list[str] | None,
        typer.Option(
            help="One inline pair as JSON (repeatable), e.g. "
            '\'{"clean": [0, 5], "corrupted": [0, 6], "answer": 7}\'.'
        ),
    ] = None,
    site: Annotated[list[str] | None, _opt("sites", "--site")] = None,
    per: Annotated[list[str] | None, _opt("per", "--per")] = None,
    metric: Annotated[str | None, _opt("metric", "--metric")] = None,
    direction: Annotated[str | None, _opt("direction", "--direction")] = None,
    layers: Annotated[str | None, typer.Option(help="Comma-separated layers (default all).")] = (
        None
    ),
    align: Annotated[str | None, _opt("align", "--align")] = None,
    batch_size: Annotated[int | None, _opt("batch_size", "--batch-size")] = None,
    memory_budget_mb: Annotated[int | None, _opt("memory_budget_mb", "--memory-budget-mb")] = None,
    dtype: Annotated[str | None, _opt("dtype", "--dtype")] = None,
    device: Annotated[str | None, _opt("device", "--device")] = None,
    device_map: Annotated[str | None, _opt("device_map", "--device-map")] = None,
    shard: Annotated[
        str | None, typer.Option(help="Run only shard i of N (i/N), e.g. one Slurm array task.")
    ] = None,
    merge: Annotated[
        Path | None, typer.Option(help="Merge the chunks in this folder (no patching) and exit.")
    ] = None,
    dashboard: Annotated[
        Path | None, typer.Option(help="Also write an HTML page of the heatmaps here.")
    ] = None,
    as_json: JsonOption = False,
    quiet: QuietOption = False,
) -> None:
    """Sweep activation patching over prompt pairs, sites and granularities into parquet."""
    check_output_file(dashboard, "--dashboard")
    if merge is not None:
        check_output_dir(merge, "--merge")
        sidecar = merge_sweep(merge, None if dashboard is None else _dashboard_writer(dashboard))
        _report({"merged": True, **_summary(sidecar)}, as_json, quiet)
        return
    if out is None:
        raise ConfigError("--out is required (the folder for chunks and results)")
    flags = {
        "model": model,
        "pairs_file": None if pairs_file is None else str(pairs_file),
        "pairs": None if pair is None else [_inline_pair(text, i) for i, text in enumerate(pair)],
        "sites": _split(site),
        "per": _split(per),
        "metric": metric,
        "direction": direction,
        "layers": None if layers is None else _layers(layers),
        "align": align,
        "batch_size": batch_size,
        "memory_budget_mb": memory_budget_mb,
        "dtype": dtype,
        "device": device,
        "device_map": device_map,
    }
    spec, pairs_dir = _spec(spec_file, {k: v for k, v in flags.items() if v is not None})
    check_output_dir(out, "--out")
    where = current_shard(shard)
    hold_output_lock(ctx, out, "--out", f"shard-{where.label()}")
    result = _run(spec, pairs_dir, out, where, dashboard, quiet)
    if where.is_main or not where.launched:  # under torchrun rank 0 speaks for all
        _report(result, as_json, quiet)


def _run(
    spec: SweepSpec, pairs_dir: Path, out: Path, where: Shard, dashboard: Path | None, quiet: bool
) -> dict[str, Any]:
    """Run this shard's units through ``mitk.sweeps.run_sweep``; the summary printed."""
    run = run_sweep(
        None,
        spec,
        out,
        shard=where,
        pairs_dir=pairs_dir,
        progress=not quiet,
        dashboard=None if dashboard is None else _dashboard_writer(dashboard),
    )
    result = {
        "fingerprint": run.fingerprint,
        "resumed": run.resumed,
        **asdict(run.stats),
        "units": run.n_units,
    }
    if run.sidecar is not None:
        result.update(_summary(run.sidecar))
    elif not where.launched:
        result["note"] = f"shard done; run `mitk patch --merge {out}` once every shard has"
    return result


def _dashboard_writer(path: Path) -> DashboardWriter:
    """An HTML page with each (site, granularity)'s prompt-averaged patching heatmaps."""

    def write(frame: pd.DataFrame, manifest: dict[str, Any]) -> Path:
        from mitk.viz.dashboard import dashboard  # plotly loads only when a page is asked for

        spec = manifest["spec"]
        header = {
            "model": spec["model"],
            "prompt pairs": str(manifest["n_pairs"]),
            "metric": f"{spec['metric']} ({spec['direction']})",
            "rows": str(len(frame)),
        }
        return dashboard(
            path, title=f"mitk patch: {spec['model']}", header=header, items=mean_results(frame)
        )

    return write


def _spec(spec_file: Path | None, flags: dict[str, Any]) -> tuple[SweepSpec, Path]:
    """The spec from the file overlaid with the flags; the folder relative pairs paths use.

    The pairs are checked too (all but their token ids against the vocabulary), so a
    malformed spec or pairs file is refused before any model loads.
    """
    values: dict[str, Any] = {}
    places: dict[str, str] = {}
    pairs_dir = Path()
    if spec_file is not None:
        loaded = load_spec_file(spec_file)
        values, places = loaded.values, loaded.places()
        pairs_dir = spec_file.parent  # a spec's relative pairs_file sits beside it
    if "pairs_file" in flags or "pairs" in flags:
        values.pop("pairs_file", None)
        values.pop("pairs", None)
        pairs_dir = Path()  # a path on the command line is relative to where it was typed
    values.update(flags)
    places.update({name: "command line" for name in flags})
    spec = SweepSpec.from_dict(values, str(spec_file or "command line"), places)
    problem = None if spec.device_map is not None else device_problem(spec.device)
    if problem is not None:
        raise ConfigError(f"{places.get('device', spec_file or 'command line')}: device: {problem}")
    if spec.pairs_file is not None:
        check_pairs(pairs_dir / spec.pairs_file, spec.metric)
    else:
        origin = places.get("pairs", "command line")
        check_pairs(list(spec.pairs), spec.metric, where=f"{origin}: ")
    return spec, pairs_dir


def _inline_pair(text: str, index: int) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise ConfigError(f"--pair #{index + 1}: not valid JSON ({err.msg})") from err
    except (ValueError, RecursionError) as err:  # too many digits, too deeply nested
        raise ConfigError(f"--pair #{index + 1}: not a usable JSON value ({err})") from err


def _split(values: list[str] | None) -> list[str] | None:
    """Repeated flags and comma-separated lists both work: --site z --site resid_pre,attn_out."""
    if values is None:
        return None
    return [v.strip() for value in values for v in value.split(",") if v.strip()]


def _layers(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError as err:
        raise ConfigError(f"--layers takes comma-separated integers, got {text!r}") from err


def _summary(sidecar: dict[str, Any]) -> dict[str, Any]:
    return {key: sidecar[key] for key in ("results", "rows", "dashboard") if key in sidecar} | {
        "sidecar": str(Path(sidecar["results"]).with_name("results.json"))
    }


def _report(result: dict[str, Any], as_json: bool, quiet: bool) -> None:
    lines = []
    if "units_run" in result:
        lines.append(
            f"sweep {result['fingerprint']} shard {result['shard']}: "
            f"{result['units_run']} units run, {result['units_skipped']} already done "
            f"({result['units']} in all) in {result['seconds']:.1f}s"
        )
    if "results" in result:
        lines.append(
            f"results: {result['results']} ({result['rows']} rows), sidecar {result['sidecar']}"
        )
    if "dashboard" in result:
        lines.append(f"dashboard: {result['dashboard']}")
    if "note" in result:
        lines.append(result["note"])
    emit(result, as_json, quiet, lines)
