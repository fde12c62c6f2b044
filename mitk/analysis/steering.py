"""Steering vectors: a difference of mean activations, added to hooks while a block runs.

Contrastive activation addition: ``steering_vector`` averages a hook's
activation over prompts that show a behaviour and over prompts that do not, and
returns the difference; ``steer`` adds a vector (times ``scale``) to that hook
in every forward inside its block, ``generate`` included, and removes exactly
its own hooks on exit, even when the block raises. SAE features steer through
``mitk.sae.splice.spliced(..., edit_latents=latent_steering(...))``, which
composes with ``steer`` (both are ordinary hooks).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor

from mitk.analysis.readout import PositionChoice, read_activations
from mitk.errors import ShapeMismatchError
from mitk.hooks import HookPoint, name
from mitk.shapes import Bool, Float, Int

__all__ = ["Steering", "latent_steering", "steer", "steering_vector"]

NOT_PER_POSITION = ("hook_pattern", "hook_attn_scores")  # [batch, head, query, key]
SteerPositions = Literal["all", "last"] | Bool[Tensor, "batch pos"]
HookChoice = str | int | Sequence[str | int]


def steering_vector(
    model: Any,
    positive: Int[Tensor, "n_positive positive_pos"] | str | list[str],
    negative: Int[Tensor, "n_negative negative_pos"] | str | list[str],
    hook: str,
    *,
    positions: PositionChoice | tuple[Tensor, Tensor] = "last",
    positive_mask: Int[Tensor, "n_positive positive_pos"] | None = None,
    negative_mask: Int[Tensor, "n_negative negative_pos"] | None = None,
    batch_size: int = 32,
) -> Float[Tensor, "..."]:
    """Mean activation at ``hook`` over the positive prompts minus the mean over the negative ones.

    - ``positive`` / ``negative``: token ids ``[batch, pos]`` (``*_mask``: their
      attention masks, 1 at real tokens) or text; the two sets may differ in
      size and length.
    - ``positions``: ``"last"`` (each prompt's last real token, the default),
      ``"all"`` (every real token, each weighted alike) or a pair of boolean
      ``[batch, pos]`` masks, one per set. Padding is never read.

    Returns a tensor of the activation's trailing shape (``[d_model]`` for a
    residual hook), on the model's device, ready for ``steer``.
    """
    pos_choice, neg_choice = positions if isinstance(positions, tuple) else (positions, positions)
    means = []
    for prompts, mask, choice in (
        (positive, positive_mask, pos_choice),
        (negative, negative_mask, neg_choice),
    ):
        rows = read_activations(
            model,
            prompts,
            hook,
            positions=choice,
            attention_mask=mask,
            batch_size=batch_size,
        )[hook]
        if rows.shape[0] == 0:
            raise ValueError("the positions chosen select no token of the prompts")
        means.append(rows.float().mean(0))
    return means[0] - means[1]


@dataclass
class Steering:
    """Handle ``steer`` yields: the hooks it steers and how often each fired inside the block."""

    hooks: list[str]
    calls: dict[str, int] = field(default_factory=dict)
    """Forwards that reached each hook (a cached generation step counts, steered or not)."""


def _hook_names(model: Any, hooks: HookChoice) -> list[str]:
    """Hook names from names or layer indices (a layer ``L`` is ``blocks.L.hook_resid_pre``)."""
    items = [hooks] if isinstance(hooks, (str, int)) else list(hooks)
    if not items:
        raise ValueError("steer needs at least one hook or layer")
    return [name("resid_pre", item) if isinstance(item, int) else item for item in items]


def _rows_to_steer(
    act: Tensor, positions: SteerPositions, point: HookPoint
) -> Bool[Tensor, "batch pos"] | None:
    """Cells of ``[batch, pos]`` to steer in this forward; None means every one."""
    if isinstance(positions, str):
        if positions == "all":
            return None
        where = torch.zeros(act.shape[:2], dtype=torch.bool, device=act.device)
        where[:, -1] = True
        return where
    if tuple(act.shape[:2]) == tuple(positions.shape):
        return positions.to(act.device, torch.bool)
    if act.shape[0] == positions.shape[0] and act.shape[1] == 1:  # a cached generation step
        return torch.zeros(act.shape[:2], dtype=torch.bool, device=act.device)
    raise ShapeMismatchError(
        f"steering mask of shape {tuple(positions.shape)} does not fit {point.name!r}, "
        f"whose activation is {tuple(act.shape)}"
    )


@contextmanager
def steer(
    model: Any,
    vectors: Float[Tensor, "..."] | Mapping[str, Float[Tensor, "..."]],
    hooks: HookChoice | None = None,
    *,
    positions: SteerPositions = "all",
    scale: float = 1.0,
    norm_match: bool = False,
) -> Iterator[Steering]:
    """Within the block, add ``scale * vector`` to each hook's activation in every forward.

    - ``vectors``: one vector for every hook in ``hooks`` (hook names, or layer
      indices meaning ``blocks.L.hook_resid_pre``), or a mapping hook name ->
      vector with ``hooks`` left None. A vector has the activation's trailing
      shape (``[d_model]`` for residual hooks, ``[head, d_head]`` for ``hook_z``).
    - ``positions``: ``"all"`` (default), ``"last"`` (the last position of each
      forward: a left-padded prompt's last token, then each token ``generate``
      adds) or a ``[batch, pos]`` mask over the prompt. A mask steers the forward
      it fits; the one-position forwards of cached generation are left unsteered
      (use ``"all"``/``"last"`` to steer generated tokens too); any other shape
      raises ``ShapeMismatchError``.
    - ``norm_match=True`` rescales each steered position back to the norm it had
      (over all trailing axes): the vector turns the activation, never grows it.

    Yields a ``Steering`` handle. Unknown hook names raise before anything is
    attached; exactly the hooks this call attached are removed on exit.
    """
    if isinstance(vectors, Mapping):
        if hooks is not None:
            raise ValueError("give vectors as a mapping hook -> vector, or one vector and hooks")
        plan = dict(vectors)
    else:
        if hooks is None:
            raise ValueError("steer needs hooks= (names or layers) for a single vector")
        plan = dict.fromkeys(_hook_names(model, hooks), vectors)
    for hook_name, vector in plan.items():
        if hook_name.endswith(NOT_PER_POSITION):
            raise ValueError(
                f"{hook_name!r} is not [batch, pos, ...]: steer a residual, z or MLP hook"
            )
        if not isinstance(vector, Tensor) or not vector.is_floating_point():
            raise TypeError(f"the steering vector for {hook_name!r} must be a float tensor")
    handle = Steering(hooks=list(plan), calls=dict.fromkeys(plan, 0))

    def adder(vector: Tensor) -> Callable[[Tensor, HookPoint], Tensor]:
        def add(act: Tensor, point: HookPoint) -> Tensor:
            handle.calls[point.name] += 1
            if tuple(act.shape[2:]) != tuple(vector.shape):
                raise ShapeMismatchError(
                    f"steering vector of shape {tuple(vector.shape)} does not fit "
                    f"{point.name!r}: its activation is {tuple(act.shape)} [batch, pos, ...]"
                )
            steered = act + scale * vector.to(act.device, act.dtype)
            if norm_match:
                trailing = tuple(range(2, act.ndim))
                ratio = act.norm(dim=trailing, keepdim=True) / steered.norm(
                    dim=trailing, keepdim=True
                ).clamp_min(torch.finfo(act.dtype).tiny)
                steered = steered * ratio
            where = _rows_to_steer(act, positions, point)
            if where is None:
                return steered
            return torch.where(where.reshape(*where.shape, *[1] * (act.ndim - 2)), steered, act)

        return add

    with model.hooks(fwd_hooks=[(hook_name, adder(v)) for hook_name, v in plan.items()]):
        yield handle


def latent_steering(
    add: Mapping[int, float] | None = None, clamp: Mapping[int, float] | None = None
) -> Callable[[Tensor], Tensor]:
    """An ``edit_latents`` for ``mitk.sae.splice.spliced``: add to some latents, clamp others.

    ``add[j]`` is added to latent ``j`` and ``clamp[j]`` replaces it, at every
    position. Spliced with ``keep_error=True``, adding ``a`` to latent ``j``
    moves the hook's activation by exactly ``a * W_dec[j]`` (the decoder is
    linear), so it is ``steer`` with that vector.
    """
    adds, clamps = dict(add or {}), dict(clamp or {})
    if set(adds) & set(clamps):
        raise ValueError(f"latents {sorted(set(adds) & set(clamps))} are both added to and clamped")

    def edit(latents: Tensor) -> Tensor:
        for latent, amount in adds.items():
            latents[..., latent] += amount
        for latent, value in clamps.items():
            latents[..., latent] = value
        return latents

    return edit
