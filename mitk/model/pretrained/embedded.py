"""Models shipped inside the package (``mitk/data/models/<name>``), loadable by name offline."""

from __future__ import annotations

from pathlib import Path

EMBEDDED_ROOT = Path(__file__).resolve().parents[2] / "data" / "models"


def embedded_models() -> dict[str, Path]:
    """Name -> directory of every model that ships with mitk."""
    if not EMBEDDED_ROOT.is_dir():
        return {}
    return {
        p.name: p
        for p in sorted(EMBEDDED_ROOT.iterdir())
        if (p / "mitk_config.json").exists() and (p / "model.safetensors").exists()
    }
