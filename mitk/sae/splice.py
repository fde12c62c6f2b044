"""Splicing an SAE into a model: a hook's activation is replaced by the SAE's reconstruction.

Inside ``with spliced(sae, model):`` every forward sends the hook's activation
through the SAE. ``keep_error=True`` adds back the reconstruction error, so the
model computes exactly what it computed before while gradients and latent edits
go through the SAE: the standard set-up for attributing to latents and for
ablating or steering them without paying the reconstruction error.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
import math

import torch
from torch import Tensor

from mitk.errors import ConfigError, ShapeMismatchError, UnknownHookError
from mitk.hooks import HookPoint
from mitk.model import HookedTransformer
from mitk.sae.autoencoder import SparseAutoencoder
from mitk.shapes import Float

LatentEdit = Callable[[Tensor], Tensor]
"""``fn(latents [*lead, d_sae]) -> latents`` of the same shape; may edit in place."""


@dataclass
class Splice:
    """Handle yielded by ``spliced``: the hook it replaces and, with ``record=True``, tensors.

    The tensors belong to the most recent forward and keep their autograd graph
    (under grad mode), so ``torch.autograd.grad(loss, [splice.latents, splice.error])``
    gives attributions to every latent and to the error term. ``lead`` are the
    activation's axes before the SAE's width: ``[batch, pos]`` for residual hooks
    and for ``hook_z`` flattened over heads, ``[batch, pos, head]`` for a
    per-head SAE on ``hook_z``.
    """

    hook_name: str
    keep_error: bool
    calls: int = 0
    """Forwards the splice has run in (hook firings)."""
    inputs: Float[Tensor, "..."] | None = None
    """The activation as the SAE read it, ``[*lead, d_in]`` in the SAE's dtype."""
    latents: Float[Tensor, "..."] | None = None
    """Latents that were decoded, ``[*lead, d_sae]`` (after ``edit_latents``)."""
    reconstruction: Float[Tensor, "..."] | None = None
    """Decoding of the unedited latents, ``[*lead, d_in]``."""
    error: Float[Tensor, "..."] | None = None
    """``keep_error`` only: ``inputs - reconstruction``, a leaf that requires grad in grad mode."""


def as_sae_input(
    activation: Float[Tensor, "..."], d_in: int, hook_name: str = ""
) -> Float[Tensor, "..."]:
    """View ``activation`` as ``[*lead, d_in]``, merging the fewest trailing axes that give d_in.

    ``attn.hook_z [batch, pos, head, d_head]`` becomes ``[batch, pos, head * d_head]``
    for an SAE with ``d_in = n_heads * d_head`` and stays as is for ``d_in = d_head``.
    Raises ``ShapeMismatchError`` naming both widths when no trailing axes fit.
    """
    shape = tuple(activation.shape)
    for n_axes in range(1, len(shape)):
        if math.prod(shape[-n_axes:]) == d_in:
            return activation.reshape(*shape[:-n_axes], d_in)
    where = f" at {hook_name!r}" if hook_name else ""
    raise ShapeMismatchError(
        f"the activation{where} has shape {shape} (width {shape[-1] if shape else 0}), and no "
        f"trailing axes of it multiply to the SAE's d_in={d_in}"
    )


def resolve_hook_name(
    sae: SparseAutoencoder, model: HookedTransformer, hook_name: str | None
) -> str:
    """``hook_name``, else the SAE's ``cfg.hook_name``, checked against the model's hooks.

    Raises ``ConfigError`` when neither is set and ``UnknownHookError`` (with
    "did you mean" suggestions) when the model has no such hook.
    """
    name = hook_name if hook_name is not None else sae.cfg.hook_name
    if not name:
        raise ConfigError("the SAE's config has no hook_name; pass hook_name=")
    if name not in model.hook_dict:
        raise UnknownHookError(name, model.hook_dict)
    return name


@contextmanager
def spliced(
    sae: SparseAutoencoder,
    model: HookedTransformer,
    hook_name: str | None = None,
    *,
    keep_error: bool = False,
    edit_latents: LatentEdit | None = None,
    record: bool = False,
) -> Iterator[Splice]:
    """Within the block, the model reads the SAE's reconstruction at ``hook_name``.

    - ``hook_name`` defaults to ``sae.cfg.hook_name``; unknown names raise
      ``UnknownHookError``. Hooks with extra axes are flattened (``as_sae_input``);
      a width mismatch raises ``ShapeMismatchError`` at the first forward.
    - ``keep_error=True`` adds back the error ``x - x_hat``: outputs equal the
      unspliced model's exactly, gradients reach the hook's input only through the
      SAE (the error is a detached leaf of its own), and ``edit_latents`` changes
      the activation by exactly ``decode(edited) - decode(latents)``.
    - ``edit_latents(latents)`` returns replacement latents ``[*lead, d_sae]``
      (it gets a copy, so editing in place is fine): ablate or steer latents.
    - ``record=True`` keeps the last forward's tensors on the yielded ``Splice``.

    The SAE runs on its own device and dtype; the result is cast back to the
    model's. The hook is attached first at that point, so hooks added inside the
    block see the spliced activation. It is removed on exit, even on error.
    """
    name = resolve_hook_name(sae, model, hook_name)
    splice = Splice(hook_name=name, keep_error=keep_error)
    d_in, d_sae = sae.cfg.d_in, sae.cfg.d_sae

    def replace(activation: Tensor, point: HookPoint) -> Tensor:
        rows = as_sae_input(activation, d_in, name)
        x = rows.to(sae.W_enc.device, sae.W_enc.dtype)
        latents = sae.encode(x)
        reconstruction = sae.decode(latents)
        decoded, used = reconstruction, latents
        if edit_latents is not None:
            used = edit_latents(latents.clone())
            if not isinstance(used, Tensor) or used.shape != latents.shape:
                got = tuple(used.shape) if isinstance(used, Tensor) else type(used).__name__
                raise ShapeMismatchError(
                    f"edit_latents returned {got}; expected latents of shape "
                    f"{tuple(latents.shape)} (d_sae={d_sae})"
                )
            decoded = sae.decode(used)
        error = None
        if keep_error:
            error = (x - reconstruction).detach()
            if torch.is_grad_enabled():
                error.requires_grad_()
            # Both differences below are exactly zero in value, so an unedited splice
            # returns the activation bit for bit; they exist to route gradients to
            # the decoded latents and to the error leaf.
            delta = (decoded - reconstruction.detach()) + (error - error.detach())
            out = rows.detach() + delta.to(rows.device, rows.dtype)
        else:
            out = decoded.to(rows.device, rows.dtype)
        splice.calls += 1
        if record:
            splice.inputs, splice.latents = x, used
            splice.reconstruction, splice.error = reconstruction, error
        return out.reshape(activation.shape)

    with model.hooks(fwd_hooks=[(name, replace)]):
        yield splice
