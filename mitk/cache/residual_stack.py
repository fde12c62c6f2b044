"""ResidualStack: a set of labelled writes into the residual stream, one per component."""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd
from torch import Tensor

from mitk.errors import ShapeMismatchError
from mitk.shapes import Float


@dataclass(frozen=True)
class ResidualStack:
    """Per-component vectors in residual space.

    ``tensor`` is ``[component, batch, pos, d_model]`` (less the batch or pos
    dim when the cache or a ``pos_slice`` dropped it) and ``labels[i]`` names
    component ``i`` (``"embed"``, ``"0_attn_out"``, ``"L1H3"``, ...), spelled
    as TransformerLens spells them. Summing over the component axis gives back
    the residual stream the stack was decomposed from (for decompositions; an
    accumulated stack is a sequence of snapshots instead). The cache's
    methods return one with ``as_stack=True``.
    """

    tensor: Float[Tensor, "component *lead d_model"]
    labels: list[str]

    def __post_init__(self) -> None:
        if self.tensor.shape[0] != len(self.labels):
            raise ShapeMismatchError(
                f"{len(self.labels)} labels for {self.tensor.shape[0]} components in the stack"
            )

    def __len__(self) -> int:
        return len(self.labels)

    def total(self) -> Float[Tensor, "*lead d_model"]:
        """Sum over components."""
        return self.tensor.sum(0)

    def select(self, labels: list[str]) -> ResidualStack:
        """The sub-stack with these components, in the order given."""
        index = {label: i for i, label in enumerate(self.labels)}
        missing = [label for label in labels if label not in index]
        if missing:
            raise KeyError(f"no component(s) {missing} in this stack")
        return ResidualStack(self.tensor[[index[label] for label in labels]], list(labels))

    def to_frame(self) -> pd.DataFrame:
        """Long table: one row per (component, batch, pos) with the write's L2 norm.

        Needs both the batch and the pos dim (``ShapeMismatchError`` otherwise).
        """
        if self.tensor.ndim != 4:
            raise ShapeMismatchError(
                f"to_frame needs a [component, batch, pos, d_model] stack, got "
                f"{tuple(self.tensor.shape)}; build it without an int pos_slice on a batched cache"
            )
        return per_position_frame("component", self.labels, norm=self.tensor.norm(dim=-1))


def per_position_frame(axis: str, labels: list[str], **columns: Tensor) -> pd.DataFrame:
    """Long table, one row per (``axis`` label, batch, pos), one column per ``[n, batch, pos]``.

    Float columns are written as float32 values, integer ones (ranks) as ints.
    """
    first = next(iter(columns.values()))
    n, n_batch, n_pos = first.shape
    frame = pd.DataFrame({
        axis: [label for label in labels for _ in range(n_batch * n_pos)],
        "batch": [b for _ in range(n) for b in range(n_batch) for _ in range(n_pos)],
        "pos": [p for _ in range(n * n_batch) for p in range(n_pos)],
    })  # fmt: skip
    for column, values in columns.items():
        values = values.detach().cpu()
        values = values.float() if values.is_floating_point() else values  # ranks stay ints
        frame[column] = values.reshape(-1).tolist()
    return frame
