"""Atomic training checkpoints: module and optimizer tensors in safetensors, the rest in JSON.

Shared by every long run (the language-model loop, the SAE trainer): a checkpoint folder is
written beside the old one and renamed into place, so a crash leaves the last complete one.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
import shutil
import tempfile
from typing import Any

from safetensors.torch import load_file, save_file
import torch
from torch import Tensor, nn

LATEST = "latest"


def save_checkpoint(
    directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer, meta: dict[str, Any]
) -> Path:
    """Write ``directory/latest`` atomically: a complete folder replaces the old by renaming."""
    directory.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=directory, prefix=".ckpt-"))
    tensors, opt_meta = _flatten_optimizer(optimizer.state_dict())
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()},
              staging / "model.safetensors")  # fmt: skip
    save_file(tensors, staging / "optimizer.safetensors")
    (staging / "state.json").write_text(json.dumps({"meta": meta, "optimizer": opt_meta}))
    target = directory / LATEST
    old = directory / ".ckpt-old"
    if target.exists():
        if old.exists():
            shutil.rmtree(old)
        os.replace(target, old)
    os.replace(staging, target)
    shutil.rmtree(old, ignore_errors=True)
    return target


def load_checkpoint(
    directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer
) -> dict[str, Any] | None:
    """Restore the last complete checkpoint into ``model``/``optimizer``; its meta, or None."""
    target = directory / LATEST
    if not (target / "state.json").exists():
        old = directory / ".ckpt-old"  # a crash between the two renames leaves only this one
        if not (old / "state.json").exists():
            return None
        target = old
    state = json.loads((target / "state.json").read_text())
    model.load_state_dict(load_file(target / "model.safetensors"))
    tensors = load_file(target / "optimizer.safetensors")
    optimizer.load_state_dict(_unflatten_optimizer(tensors, state["optimizer"]))
    return dict(state["meta"])


def _flatten_optimizer(state: dict[str, Any]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    tensors: dict[str, Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, slots in state["state"].items():
        for key, value in slots.items():
            if isinstance(value, Tensor):
                tensors[f"{index}.{key}"] = value.detach().contiguous()
            else:
                scalars.setdefault(str(index), {})[key] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    for index, slots in meta["scalars"].items():
        state.setdefault(int(index), {}).update(slots)
    return {"state": state, "param_groups": meta["param_groups"]}
