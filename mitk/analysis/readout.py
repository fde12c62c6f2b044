"""Activations at chosen positions of a batch of prompts: the rows steering vectors and probes use.

Prompts are token ids (with an optional attention mask) or text (tokenized
with padding, its mask built for you). Only real tokens are ever read: padding
is excluded whichever side it is on, and ``"last"`` means each row's last real
token, not the last column.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor

from mitk.errors import ShapeMismatchError
from mitk.hooks import layer_of, resolve_names
from mitk.shapes import Bool, Float, Int

PositionChoice = Literal["last", "all"]
Prompts = Int[Tensor, "batch pos"] | str | list[str]


def select_positions(
    valid: Bool[Tensor, "batch pos"],
    positions: PositionChoice | Bool[Tensor, "mask_batch mask_pos"],
) -> Bool[Tensor, "batch pos"]:
    """Which ``[batch, pos]`` cells to read: each row's last real token, all real ones, or a mask.

    ``valid`` is True at real tokens. A mask is intersected with ``valid``, so
    padding is never selected; it must have ``valid``'s shape.
    """
    if isinstance(positions, Tensor):
        if positions.shape != valid.shape:
            raise ShapeMismatchError(
                f"positions mask has shape {tuple(positions.shape)}; the prompts are "
                f"{tuple(valid.shape)} [batch, pos]"
            )
        return positions.to(valid.device, torch.bool) & valid
    if positions == "all":
        return valid.clone()
    if positions != "last":
        raise ValueError(
            f"positions must be 'last', 'all' or a [batch, pos] mask, not {positions!r}"
        )
    index = torch.arange(valid.shape[1], device=valid.device).expand_as(valid)
    last = torch.where(valid, index, -1).max(1).values  # -1: a row with no real token
    if bool((last < 0).any()):
        raise ValueError("a prompt has no real token (its attention mask is all zeros)")
    return index == last[:, None]


def read_activations(
    model: Any,
    prompts: Prompts,
    hooks: str | list[str],
    *,
    positions: PositionChoice | Bool[Tensor, "batch pos"] = "last",
    attention_mask: Int[Tensor, "batch pos"] | None = None,
    batch_size: int = 32,
) -> dict[str, Float[Tensor, "row ..."]]:
    """Each hook's activation at the selected positions, one row per selected ``(prompt, pos)``.

    Rows come prompt by prompt, positions in order within a prompt, so with
    ``positions="last"`` row ``i`` is prompt ``i``. Activations keep their trailing
    shape (``[row, d_model]`` for residual hooks, ``[row, head, d_head]`` for
    ``hook_z``; hooks without a ``[batch, pos]`` lead, such as attention
    patterns, raise ``ShapeMismatchError``), detached, on the model's device.
    The forwards stop after the last block a hook lives in; ``batch_size``
    prompts run per forward.
    """
    names = resolve_names(hooks, model.hook_dict)
    tokens, valid = model.tokens_and_mask(prompts, attention_mask)
    padded = valid is not None
    valid = torch.ones_like(tokens, dtype=torch.bool) if valid is None else valid
    chosen = select_positions(valid, positions)
    layers = [layer_of(n) for n in names]
    stop = None
    if all(layer is not None for layer in layers):
        stop = max(layer for layer in layers if layer is not None) + 1
    rows: dict[str, list[Tensor]] = {n: [] for n in names}
    with torch.no_grad():
        for start in range(0, tokens.shape[0], batch_size):
            part = slice(start, start + batch_size)
            _, cache = model.run_with_cache(
                tokens[part],
                attention_mask=valid[part].long() if padded else None,
                names_filter=names,
                stop_at_layer=stop,
                return_type=None,
            )
            for n in names:
                act = cache[n]
                if act.shape[:2] != chosen[part].shape:
                    raise ShapeMismatchError(
                        f"{n!r} has shape {tuple(act.shape)}, not [batch, pos, ...]: its rows "
                        "are not token positions"
                    )
                rows[n].append(act[chosen[part]])
    return {n: torch.cat(parts) for n, parts in rows.items()}
