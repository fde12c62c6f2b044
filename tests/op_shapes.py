"""Every tensor shape a forward creates, to show that a path never builds some matrix."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class _Recorder(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        self.shapes += [tuple(t.shape) for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        return out


def created_shapes(run: Callable[[], object]) -> list[tuple[int, ...]]:
    """The shape of every tensor an operator returned while ``run()`` ran."""
    recorder = _Recorder()
    with recorder:
        run()
    return recorder.shapes


def has_square(shapes: list[tuple[int, ...]], n: int) -> bool:
    """Whether any shape ends in ``[n, n]`` (a dense position-by-position matrix)."""
    return any(len(shape) >= 2 and shape[-2:] == (n, n) for shape in shapes)
