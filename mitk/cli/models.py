"""``mitk models``: what can be loaded: embedded models, and local ones found on disk.

Found models are Hugging Face directories (``config.json`` with a ``model_type`` mitk
converts, and safetensors weights) or ``model.save`` directories, looked for under
``--search`` folders and in the Hugging Face hub cache. Nothing touches the network.
"""

from __future__ import annotations

from collections.abc import Iterator
import json
from pathlib import Path
from typing import Annotated, Any

import typer

from mitk.cli.common import JsonOption, QuietOption, emit
from mitk.config import TransformerConfig
from mitk.model import embedded_models, supported_architectures
from mitk.model.pretrained.hub import hf_hub_cache

_SEARCH_DEPTH = 2  # a --search folder, its children and grandchildren


def _model_type(directory: Path) -> str | None:
    """``model_type`` of a loadable checkpoint directory, ``"mitk"`` for mitk saves, else None."""
    if (directory / "mitk_config.json").is_file():
        return "mitk"
    config = directory / "config.json"
    if not config.is_file() or not any(directory.glob("*.safetensors")):
        return None  # mitk never unpickles .bin weights, so those are not loadable
    try:
        model_type = json.loads(config.read_text()).get("model_type")
    except (json.JSONDecodeError, AttributeError, OSError):
        return None
    return model_type if model_type in supported_architectures() else None


def _under(folder: Path, depth: int) -> Iterator[Path]:
    yield folder
    if depth > 0:
        for child in sorted(p for p in folder.iterdir() if p.is_dir()):
            yield from _under(child, depth - 1)


def found_models(search: list[Path]) -> list[dict[str, Any]]:
    """Loadable model directories under ``search`` folders and in the hub cache."""
    rows = []
    for folder in search:
        if not folder.is_dir():
            what = "is not a folder" if folder.exists() else "does not exist"
            raise FileNotFoundError(f"--search folder {str(folder)!r} {what}")
        for directory in _under(folder, _SEARCH_DEPTH):
            if (model_type := _model_type(directory)) is not None:
                rows.append({"name": directory.name, "path": str(directory),
                             "model_type": model_type, "source": "search"})  # fmt: skip
    hub = hf_hub_cache()
    for snapshot in sorted(hub.glob("models--*/snapshots/*")) if hub.is_dir() else []:
        if (model_type := _model_type(snapshot)) is not None:
            repo = snapshot.parent.parent.name.removeprefix("models--").replace("--", "/")
            rows.append({"name": repo, "path": str(snapshot), "model_type": model_type,
                         "source": "hf-cache"})  # fmt: skip
    return rows


def _embedded() -> list[dict[str, Any]]:
    rows = []
    for name, path in embedded_models().items():
        cfg = TransformerConfig.from_json((path / "mitk_config.json").read_text())
        rows.append({
            "name": name,
            "path": str(path),
            "layers": cfg.n_layers,
            "d_model": cfg.d_model,
            "heads": cfg.n_heads,
            "attention_only": not cfg.has_mlp,
        })  # fmt: skip
    return rows


def models(
    search: Annotated[
        list[Path] | None,
        typer.Option("--search", help="Also look for model directories here (repeatable)."),
    ] = None,
    as_json: JsonOption = False,
    quiet: QuietOption = False,
) -> None:
    """List the embedded models and local ones mitk can load.

    Local: --search folders and the Hugging Face cache (HF_HUB_CACHE, else
    HF_HOME/hub, else ~/.cache/huggingface/hub). Pass a listed path to
    --model of any command.
    """
    embedded, found = _embedded(), found_models(search or [])
    result = {"embedded": embedded, "found": found, "architectures": supported_architectures()}
    lines = ["embedded models:"]
    for row in embedded:
        kind = "attention-only" if row["attention_only"] else "with MLPs"
        lines.append(f"  {row['name']:<16} {row['layers']} layers, d_model {row['d_model']}, "
                     f"{row['heads']} heads, {kind}")  # fmt: skip
    lines.append("found models:" if found else "found models: none")
    lines += [f"  {row['name']:<24} {row['model_type']:<8} {row['path']}" for row in found]
    lines.append(f"Hugging Face architectures: {', '.join(supported_architectures())}")
    emit(result, as_json, quiet, lines)
