"""Atomic training checkpoints: module and optimizer tensors in safetensors, the rest in JSON.

Shared by every long run (the language-model loop, the SAE trainer): the checkpoint folder is
written with ``mitk.atomic.atomic_folder``, so a crash leaves the last complete one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file
import torch
from torch import Tensor, nn

from mitk.atomic import atomic_folder, complete_folder

LATEST = "latest"


def save_checkpoint(
    directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer, meta: dict[str, Any]
) -> Path:
    """Write ``directory/latest`` atomically: a complete folder replaces the old one."""
    tensors, opt_meta = _flatten_optimizer(optimizer.state_dict())
    with atomic_folder(directory / LATEST) as staging:
        save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()},
                  staging / "model.safetensors")  # fmt: skip
        save_file(tensors, staging / "optimizer.safetensors")
        (staging / "state.json").write_text(json.dumps({"meta": meta, "optimizer": opt_meta}))
    return directory / LATEST


def load_checkpoint(
    directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer
) -> dict[str, Any] | None:
    """Restore the last complete checkpoint into ``model``/``optimizer``; its meta, or None."""
    target = complete_folder(directory / LATEST)  # a crash mid-swap leaves the old one aside
    if target is None:
        return None
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
