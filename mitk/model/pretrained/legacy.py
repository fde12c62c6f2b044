"""Parameter names older mitk saves used, mapped to today's (so old ``model.save`` folders load)."""

from __future__ import annotations

from torch import Tensor

# Before the packed attention weights were renamed so that they cannot be mistaken for the
# per-head TransformerLens views (``W_o`` vs ``W_O`` differed only in case).
_RENAMED_LEAVES = {"W_o": "W_o_packed", "b_o": "b_o_param", "W_q": "W_q_packed"}


def upgrade_native_state(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """``state`` with attention parameters under their current names; other keys unchanged."""
    upgraded = {}
    for key, value in state.items():
        head, _, leaf = key.rpartition(".")
        if head.endswith(".attn") and leaf in _RENAMED_LEAVES:
            key = f"{head}.{_RENAMED_LEAVES[leaf]}"
        upgraded[key] = value
    return upgraded
