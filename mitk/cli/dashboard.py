"""``mitk dashboard``: one self-contained HTML page from results other commands saved.

Recognised inputs (a folder stands for the parquet and CSV files directly inside it):

- patching tables (``mitk patch``, ``PatchResult.to_frame()``): columns ``site``, ``layer``,
  ``value``, ``normalized`` and optionally ``per``, ``pos``, ``head``, ``pair``;
- ``mitk dla --out`` tables (``component``, ``attribution``);
- ``mitk circuits --out`` tables (detectors, composition, OV copying, QK eigenvalues);
- ``mitk sae eval --out`` tables and SAE folders, with their training log
  (``<folder>.log.csv`` from ``mitk sae train --log-csv``, or ``log.csv`` inside);
- any other parquet or CSV file, shown as a table.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import pandas as pd
import plotly.graph_objects as go
import typer

from mitk.cli.common import JsonOption, QuietOption, emit
from mitk.cli.outputs import check_output_file
from mitk.errors import ConfigError
from mitk.sae import SparseAutoencoder
from mitk.sae.saelens_format import CONFIG_FILE, WEIGHTS_FILE
from mitk.sweeps import mean_results
from mitk.viz import Section, figures_for, training_curves
from mitk.viz import dashboard as write_dashboard

DEFAULT_OUT = Path("mitk-dashboard.html")
_DETECTOR_COLUMNS = ("previous_token", "duplicate_token", "induction")


def _heatmap(grid: pd.DataFrame, title: str, unit: bool, note_axis: str) -> go.Figure:
    """Rows = layers, columns = heads or positions; 0–1 colours for recoveries and scores."""
    scale: dict[str, Any] = {"zmin": 0, "zmax": 1, "colorscale": "Blues"} if unit \
        else {"zmid": 0, "colorscale": "RdBu"}  # fmt: skip
    prefix = "H" if note_axis == "head" else ""
    fig = go.Figure(go.Heatmap(
        z=grid.to_numpy().tolist(), x=[f"{prefix}{int(c)}" for c in grid.columns],
        y=[f"L{int(r)}" for r in grid.index], **scale,
    ))  # fmt: skip
    fig.update_layout(title=title, xaxis_title=note_axis, yaxis_title="layer",
                      yaxis_autorange="reversed")  # fmt: skip
    return fig


PER_PAIR_COLUMNS = frozenset({"pair", "clean", "corrupted", "direction", "per"})
"""A per-pair table (``mitk patch``'s ``results.parquet``) has these; a prompt-averaged one not."""


def patching_sections(frame: pd.DataFrame, name: str) -> list[Section]:
    """One heatmap (or bar chart) per site and granularity, averaged over prompt pairs.

    A per-pair table draws each cell's mean with its bootstrap interval and
    p-value on hover and crosses on non-significant cells, as ``mitk patch``'s
    own page does (recovery is then a ratio of means, as
    ``PatchResult.normalized``); a prompt-averaged table draws the means only.
    """
    if set(frame.columns) >= PER_PAIR_COLUMNS:
        return [
            Section(f"{section.title} ({name})", section.content, section.note)
            for result in mean_results(frame)
            for section in figures_for(result)
        ]
    sections = []
    keys = [k for k in ("site", "per") if k in frame.columns]
    for key, group in frame.groupby(keys, sort=False):
        label = " per ".join(str(k) for k in (key if isinstance(key, tuple) else (key,)))
        has = {a: a in group.columns and group[a].notna().any() for a in ("pos", "head")}
        title = f"Patching {label}: recovery ({name})"
        if has["head"]:  # per head (and head_pos, averaged over positions)
            grid = group.pivot_table(index="layer", columns="head", values="normalized")
            note = "Mean over positions and prompt pairs." if has["pos"] else ""
            sections.append(Section(title, _heatmap(grid, title, True, "head"), note))
        elif has["pos"]:
            grid = group.pivot_table(index="layer", columns="pos", values="normalized")
            sections.append(Section(title, _heatmap(grid, title, True, "pos")))
        else:
            means = group.groupby("layer")["normalized"].mean()
            bar = go.Figure(go.Bar(x=[f"L{int(i)}" for i in means.index], y=means.tolist()))
            bar.update_layout(title=title, yaxis_title="recovery (normalised)")
            sections.append(Section(title, bar))
    return sections


def dla_sections(frame: pd.DataFrame, name: str) -> list[Section]:
    """Bars of each component's mean direct attribution, in the model's order."""
    means = frame.groupby("component", sort=False)["attribution"].mean()
    colours = ["#c0392b" if v < 0 else "#2471a3" for v in means.tolist()]
    fig = go.Figure(go.Bar(x=list(means.index), y=means.tolist(), marker_color=colours))
    n_prompts = frame["prompt"].nunique() if "prompt" in frame.columns else 1
    title = f"Direct logit attribution ({name})"
    fig.update_layout(title=f"{title}, mean over {n_prompts} prompt(s)", xaxis_title="component",
                      yaxis_title="contribution to logit (difference)")  # fmt: skip
    note = "The bars sum to the model's logit (difference)."
    return [Section(title, fig, note)]


def detector_sections(frame: pd.DataFrame, name: str) -> list[Section]:
    """A layer × head heatmap per detector score."""
    sections = []
    for column in _DETECTOR_COLUMNS:
        title = f"{column.replace('_', '-').capitalize()} score per head ({name})"
        grid = frame.pivot_table(index="layer", columns="head", values=column)
        sections.append(Section(title, _heatmap(grid, title, True, "head")))
    return sections


def per_head_sections(column: str, description: str, note: str) -> Callable[..., list[Section]]:
    """A builder drawing one per-head score column as a layer × head heatmap."""

    def build(frame: pd.DataFrame, name: str) -> list[Section]:
        title = f"{description} ({name})"
        grid = frame.pivot_table(index="layer", columns="head", values=column)
        fig = _heatmap(grid, title, False, "head")
        fig.update_traces(zmin=-1, zmax=1)
        return [Section(title, fig, note)]

    return build


def composition_sections(frame: pd.DataFrame, name: str) -> list[Section]:
    """Writer × reader heatmap of z-scores above the random baseline, per kind."""
    sections = []
    for kind, group in frame.groupby("kind", sort=False):
        writer = "L" + group["writer_layer"].astype(str) + "H" + group["writer_head"].astype(str)
        reader = "L" + group["reader_layer"].astype(str) + "H" + group["reader_head"].astype(str)
        grid = pd.DataFrame({"writer": writer, "reader": reader, "z": group["z"]}).pivot_table(
            index="writer", columns="reader", values="z", sort=False
        )
        fig = go.Figure(go.Heatmap(z=grid.to_numpy().tolist(), x=list(grid.columns),
                                   y=list(grid.index), colorscale="RdBu_r", zmid=0))  # fmt: skip
        title = f"{kind}-composition, sd above random ({name})"
        fig.update_layout(title=title, xaxis_title="reader", yaxis_title="writer",
                          yaxis_autorange="reversed")  # fmt: skip
        baseline = f"Random baseline {group['baseline_mean'].iloc[0]:.3f} ± "
        sections.append(Section(title, fig, baseline + f"{group['baseline_std'].iloc[0]:.3f}."))
    return sections


def training_log_sections(frame: pd.DataFrame, name: str) -> list[Section]:
    """Training curves of each SAE in a ``--log-csv`` file (``TrainResult.history`` rows)."""
    history = frame.to_dict(orient="records")
    x = "tokens" if "tokens" in frame.columns else "step"
    hooks = dict.fromkeys(c.rsplit("/", 1)[0] for c in frame.columns if "/" in c)
    return [Section(f"SAE training: {hook} ({name})", training_curves(history, hook, x=x))
            for hook in hooks]  # fmt: skip


def table_sections(frame: pd.DataFrame, name: str) -> list[Section]:
    """Anything else: the table itself."""
    return [Section(name, frame)]


# (columns a table must have, builder), most specific first
KINDS: list[tuple[str, set[str], Callable[[pd.DataFrame, str], list[Section]]]] = [
    ("patching", {"site", "layer", "normalized"}, patching_sections),
    ("dla", {"component", "attribution"}, dla_sections),
    ("detectors", {"layer", "head", *_DETECTOR_COLUMNS}, detector_sections),
    ("composition", {"kind", "writer_layer", "reader_layer", "z"}, composition_sections),
    ("ov", {"layer", "head", "copying_score"}, per_head_sections(
        "copying_score", "OV copying score", "Re Σλ / Σ|λ| of the full OV circuit: +1 copies.")),
    ("qk", {"layer", "head", "same_token_score"}, per_head_sections(
        "same_token_score", "QK same-token score",
        "Re Σλ / Σ|λ| of the full QK circuit: +1 attends to its own token.")),
    ("training_log", {"step"}, training_log_sections),
    ("table", set(), table_sections),
]  # fmt: skip


def _read_table(path: Path) -> pd.DataFrame:
    try:
        return pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path)
    except Exception as err:  # pyarrow and pandas raise many types for a bad file
        raise ConfigError(f"cannot read {path} as a table: {err}") from None


def table_file_sections(path: Path) -> tuple[str, list[Section]]:
    """The kind of a saved table and its sections."""
    frame = _read_table(path)
    for kind, columns, build in KINDS:
        if columns <= set(frame.columns):
            return kind, build(frame, path.name)
    raise AssertionError("the last kind matches every table")


def sae_folder_sections(folder: Path) -> list[Section]:
    """An SAE's settings, and its training curves when the log sits beside or inside it."""
    sae = SparseAutoencoder.load(folder)
    cfg = sae.cfg.to_dict()
    shown = ("hook_name", "architecture", "d_in", "d_sae", "k", "total_tokens", "batch_size", "lr")
    table = pd.DataFrame({"setting": list(shown), "value": [str(cfg[k]) for k in shown]})
    sections = [Section(f"SAE {folder.name}", table)]
    for log in (folder.with_name(f"{folder.name}.log.csv"), folder / "log.csv"):
        if log.is_file():
            sections += training_log_sections(_read_table(log), log.name)
            break
    return sections


def _expand(paths: list[Path]) -> list[Path]:
    """Folders stand for their tables (or themselves, if SAE folders); missing paths fail."""
    found = []
    for path in paths:
        if not path.exists():
            raise FileNotFoundError(f"result {str(path)!r} does not exist")
        is_sae = (path / CONFIG_FILE).is_file() and (path / WEIGHTS_FILE).is_file()
        if path.is_dir() and not is_sae:
            tables = sorted(p for p in path.iterdir() if p.suffix in (".parquet", ".csv"))
            if not tables:
                raise ConfigError(f"{path} holds no .parquet or .csv results nor an SAE")
            found += tables
        else:
            found.append(path)
    return found


def dashboard(
    results: Annotated[list[Path], typer.Argument(help="Parquet/CSV files, result folders, SAEs.")],
    out: Annotated[Path, typer.Option(help="Where to write the HTML page.")] = DEFAULT_OUT,
    title: Annotated[str, typer.Option(help="Page title.")] = "mitk dashboard",
    as_json: JsonOption = False,
    quiet: QuietOption = False,
) -> None:
    """Build one self-contained HTML page (no network needed) from results.

    Reads tables written by mitk patch, mitk dla --out, mitk circuits --out
    and mitk sae eval --out; SAE folders (with training curves from
    <folder>.log.csv); any other parquet or CSV is shown as a table.
    """
    check_output_file(out, "--out")
    sections, inputs = [], []
    for path in _expand(results):
        if path.is_dir():
            kind, found = "sae", sae_folder_sections(path)
        elif path.suffix in (".parquet", ".csv"):
            kind, found = table_file_sections(path)
        else:
            raise ConfigError(f"{path}: expected a .parquet or .csv file, or a folder")
        inputs.append({"path": str(path), "kind": kind})
        sections += found
    header = {"results": ", ".join(str(p) for p in results), "written by": "mitk dashboard"}
    page = write_dashboard(out, title=title, header=header, items=sections)
    result = {"out": str(page), "inputs": inputs, "sections": [s.title for s in sections]}
    lines = [f"{len(sections)} sections from {len(inputs)} result(s) written to {page}"]
    emit(result, as_json, quiet, lines)
