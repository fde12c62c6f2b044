"""Reading checkpoint files safely: safetensors only, single or sharded."""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import load_file, save_file
from torch import Tensor

from mitk.atomic import atomic_write
from mitk.errors import UnsupportedModelError

TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "tokenizer_config.json", "vocab.txt")


def read_safetensors_dir(directory: Path) -> dict[str, Tensor]:
    """Every tensor in ``directory``'s safetensors file(s), following a shard index if present.

    Pickle-based ``.bin`` checkpoints are refused: unpickling can run arbitrary code.
    """
    index = directory / "model.safetensors.index.json"
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        state: dict[str, Tensor] = {}
        for shard in shards:
            state.update(load_file(directory / shard))
        return state
    single = directory / "model.safetensors"
    if single.exists():
        return load_file(single)
    if any(directory.glob("*.bin")) or any(directory.glob("*.pt")):
        raise UnsupportedModelError(
            f"{directory} holds only pickle checkpoints (.bin/.pt); mitk loads safetensors only "
            "because unpickling can execute code. Convert with "
            "model.save_pretrained(dir, safe_serialization=True) in a trusted environment."
        )
    raise FileNotFoundError(f"no model.safetensors (or shard index) in {directory}")


def atomic_save_safetensors(tensors: dict[str, Tensor], path: Path) -> None:
    """Write safetensors atomically (``mitk.atomic``): readers never see half a file."""
    contiguous = {k: v.detach().contiguous() for k, v in tensors.items()}
    atomic_write(path, lambda temp: save_file(contiguous, temp))


def has_tokenizer(directory: Path) -> bool:
    """True when ``directory`` holds files a Hugging Face tokenizer loads from."""
    return any((directory / f).exists() for f in TOKENIZER_FILES)
