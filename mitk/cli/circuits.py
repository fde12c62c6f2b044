"""``mitk circuits``: weight-based circuit tables (QK, OV, composition) and head detectors.

Each analysis becomes one long table (one row per head or head pair) written as
``DIR/<name>.parquet``; ``mitk dashboard DIR`` draws them.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Annotated, Any

import pandas as pd
import torch
from tqdm.auto import tqdm
import typer

from mitk.analysis.circuits import full_qk_circuit, ov_copying_scores
from mitk.analysis.composition import KINDS, composition_baseline, composition_scores
from mitk.analysis.detectors import BEHAVIOURS, head_detector_scores
from mitk.atomic import atomic_write
from mitk.cli.common import DeviceOption, DtypeOption, JsonOption, ModelOption, QuietOption, emit
from mitk.cli.inputs import MAX_SEED
from mitk.cli.outputs import check_output_dir, hold_output_lock
from mitk.errors import ConfigError
from mitk.model import HookedTransformer
from mitk.sweeps import load_named_model

ANALYSES = ("qk", "ov", "composition", "detectors")
TABLE_FILES = {
    "qk": "qk_eigen.parquet",
    "ov": "ov_copying.parquet",
    "composition": "composition.parquet",
    "detectors": "detectors.parquet",
}


def _per_head(model: HookedTransformer, column: str, values: torch.Tensor) -> pd.DataFrame:
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    return pd.DataFrame({
        "layer": [layer for layer in range(n_layers) for _ in range(n_heads)],
        "head": list(range(n_heads)) * n_layers,
        "label": [f"L{layer}H{head}" for layer in range(n_layers) for head in range(n_heads)],
        column: values.detach().float().cpu().reshape(-1).tolist(),
    })  # fmt: skip


def qk_table(model: HookedTransformer, probe_half: int, seed: int) -> pd.DataFrame:
    """Per head, the eigenvalues of the full (token-embedding) QK circuit, summarised.

    ``same_token_score = Re Σλ / Σ|λ|``: near +1, a query attends to keys of its own
    token; the largest |λ| says how strongly. Positional and norm terms are left out.
    """
    eig = full_qk_circuit(model).eigenvalues  # [layer, head, d_head]
    frame = _per_head(model, "same_token_score", eig.sum(-1).real / eig.abs().sum(-1))
    frame["largest_eigenvalue"] = eig.abs().amax(-1).float().cpu().reshape(-1).tolist()
    return frame


def ov_table(model: HookedTransformer, probe_half: int, seed: int) -> pd.DataFrame:
    """Per head, the OV copying score (``Re Σλ / Σ|λ|`` of the full OV circuit)."""
    return _per_head(model, "copying_score", ov_copying_scores(model))


def composition_table(model: HookedTransformer, probe_half: int, seed: int) -> pd.DataFrame:
    """Q/K/V composition of every writer → later reader pair, against a random baseline.

    ``z = (score - baseline_mean) / baseline_std``: how far above chance a pair composes.
    """
    frames = []
    for kind in KINDS:
        scores = composition_scores(model, kind).float().cpu()
        baseline = composition_baseline(model, kind, seed=seed)
        index = torch.cartesian_prod(*(torch.arange(n) for n in scores.shape))
        later = index[:, 2] > index[:, 0]  # only later layers can read a write
        index = index[later]
        values = scores.reshape(-1)[later]
        frames.append(pd.DataFrame({
            "kind": kind,
            "writer_layer": index[:, 0].tolist(),
            "writer_head": index[:, 1].tolist(),
            "reader_layer": index[:, 2].tolist(),
            "reader_head": index[:, 3].tolist(),
            "score": values.tolist(),
            "baseline_mean": baseline.mean,
            "baseline_std": baseline.std,
            "z": ((values - baseline.mean) / baseline.std).tolist(),
        }))  # fmt: skip
    return pd.concat(frames, ignore_index=True)


def detectors_table(model: HookedTransformer, probe_half: int, seed: int) -> pd.DataFrame:
    """Previous-token, duplicate-token and induction scores per head on a repeated probe."""
    return head_detector_scores(model, half=probe_half, seed=seed)


TABLES: dict[str, Callable[[HookedTransformer, int, int], pd.DataFrame]] = {
    "qk": qk_table,
    "ov": ov_table,
    "composition": composition_table,
    "detectors": detectors_table,
}


def _parse_what(what: str) -> list[str]:
    chosen = [part.strip() for part in what.split(",") if part.strip()]
    unknown = [part for part in chosen if part not in ANALYSES]
    if unknown or not chosen:
        raise ConfigError(f"--what {what!r}: choose from {', '.join(ANALYSES)} (comma-separated)")
    return chosen


Finding = dict[str, Any]


def _detector_findings(table: pd.DataFrame, top: int) -> list[Finding]:
    best = {b: table.loc[table[b].idxmax()] for b in BEHAVIOURS}
    return [{"behaviour": b, "label": row["label"], "layer": int(row["layer"]),
             "score": float(row[b])} for b, row in best.items()]  # fmt: skip


def _composition_findings(table: pd.DataFrame, top: int) -> list[Finding]:
    return [{"kind": r.kind, "writer": f"L{r.writer_layer}H{r.writer_head}",
             "reader": f"L{r.reader_layer}H{r.reader_head}", "score": float(r.score),
             "z": float(r.z)} for r in table.nlargest(top, "z").itertuples()]  # fmt: skip


def _top_heads(column: str) -> Callable[[pd.DataFrame, int], list[Finding]]:
    def findings(table: pd.DataFrame, top: int) -> list[Finding]:
        rows = table.nlargest(top, column)
        return [{"label": r["label"], "score": float(r[column])} for _, r in rows.iterrows()]

    return findings


FINDINGS: dict[str, Callable[[pd.DataFrame, int], list[Finding]]] = {
    "detectors": _detector_findings,
    "composition": _composition_findings,
    "ov": _top_heads("copying_score"),
    "qk": _top_heads("same_token_score"),
}


def _describe(name: str, finding: Finding) -> str:
    """One printed line per finding."""
    if name == "detectors":
        behaviour = finding["behaviour"].replace("_", "-")
        return f"strongest {behaviour} head {finding['label']} ({finding['score']:.2f})"
    if name == "composition":
        return (f"{finding['kind']}-composition {finding['writer']} -> {finding['reader']}: "
                f"{finding['score']:.3f} ({finding['z']:+.1f} sd above random)")  # fmt: skip
    what = "OV copying score" if name == "ov" else "QK same-token score"
    return f"{what} {finding['label']}: {finding['score']:+.2f}"


def circuits(
    ctx: typer.Context,
    model: ModelOption,
    what: Annotated[str, typer.Option(help="Comma-separated: qk, ov, composition, detectors.")] = (
        ",".join(ANALYSES)
    ),
    out: Annotated[Path | None, typer.Option(help="Directory for the parquet tables.")] = None,
    top: Annotated[int, typer.Option(min=1, help="How many of the strongest entries to show.")] = 5,
    probe_half: Annotated[
        int | None, typer.Option(help="Detector probe: random tokens per half (default fits).")
    ] = None,
    seed: Annotated[
        int, typer.Option(min=0, max=MAX_SEED, help="Seed of the detector probe and the baseline.")
    ] = 0,
    device: DeviceOption = "cpu",
    dtype: DtypeOption = "float32",
    as_json: JsonOption = False,
    quiet: QuietOption = False,
) -> None:
    """Score heads by weights and attention: QK, OV, composition, detectors.

    qk: eigenvalue summary of each head's full token QK circuit.

    ov: OV copying score of each head.

    composition: Q/K/V composition of each head pair, with z = standard
    deviations above a random-matrix baseline.

    detectors: previous-token, duplicate-token and induction scores on a
    repeated random probe.

    --out DIR writes one DIR/<table>.parquet per analysis.
    """
    chosen = _parse_what(what)
    check_output_dir(out, "--out")
    if out is not None:
        hold_output_lock(ctx, out, "--out")
    net = load_named_model(model, device, dtype)
    longest = (net.cfg.n_ctx - 1) // 2
    half = probe_half if probe_half is not None else min(20, longest)
    if not 1 <= half <= longest:
        raise ConfigError(f"--probe-half must lie in [1, {longest}] (the model's context is "
                          f"{net.cfg.n_ctx} tokens), got {half}")  # fmt: skip
    tables = {}
    for name in tqdm(chosen, desc="circuits", disable=quiet or as_json):
        tables[name] = TABLES[name](net, half, seed)
    written = {}
    if out is not None:
        for name, table in tables.items():
            path = atomic_write(out / TABLE_FILES[name], partial(table.to_parquet, index=False))
            written[name] = str(path)
    result: dict[str, Any] = {"model": model, "findings": {}, "files": written}
    lines = [f"model {model}: {net.cfg.n_layers} layers x {net.cfg.n_heads} heads"]
    for name, table in tables.items():
        found = FINDINGS[name](table, top) if not table.empty else []
        result["findings"][name] = found
        lines += [_describe(name, finding) for finding in found]
    if "detectors" in tables:
        result["detectors"] = tables["detectors"].to_dict(orient="records")
    if written:
        lines.append(f"tables written to {out}")
    emit(result, as_json, quiet, lines)
