"""Splicing an SAE into a model: a hook's activation is replaced by the SAE's reconstruction.

Inside ``with spliced(sae, model):`` every forward sends the hook's activation
through the SAE. ``keep_error=True`` adds back the reconstruction error, so the
model computes exactly what it computed before while gradients and latent edits
go through the SAE: the standard set-up for attributing to latents and for
ablating or steering them without paying the reconstruction error.

A transcoder reads one hook (``cfg.hook_name``, e.g. the MLP's input) and
replaces another (``cfg.target_hook_name``, e.g. the MLP's output) with its
output; the error term is then ``target activation - transcoder output``.
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
    target_hook_name: str = ""
    """Transcoders: the hook whose activation is replaced (``hook_name`` is read)."""
    calls: int = 0
    """Forwards the splice has run in (hook firings)."""
    inputs: Float[Tensor, "..."] | None = None
    """The activation as the SAE read it, ``[*lead, d_in]`` in the SAE's dtype."""
    latents: Float[Tensor, "..."] | None = None
    """Latents that were decoded, ``[*lead, d_sae]`` (after ``edit_latents``)."""
    reconstruction: Float[Tensor, "..."] | None = None
    """Decoding of the unedited latents, ``[*lead, d_out]`` (a skip-transcoder's skip included)."""
    error: Float[Tensor, "..."] | None = None
    """``keep_error`` only: ``replaced - reconstruction``, a leaf that requires grad in grad mode
    (the replaced activation is the input for an SAE, the target for a transcoder)."""
    replaced: Float[Tensor, "..."] | None = None
    """The activation the splice replaced, ``[*lead, d_out]`` in the SAE's dtype: what the
    reconstruction is measured against (``inputs`` itself for an SAE)."""


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
    sae: SparseAutoencoder,
    model: HookedTransformer,
    hook_name: str | None,
    field: str = "hook_name",
) -> str:
    """``hook_name``, else the SAE's ``cfg.hook_name``, checked against the model's hooks.

    ``field="target_hook_name"`` resolves a transcoder's output hook the same way.
    Raises ``ConfigError`` when neither is set and ``UnknownHookError`` (with
    "did you mean" suggestions) when the model has no such hook.
    """
    name = hook_name if hook_name is not None else getattr(sae.cfg, field)
    if not name:
        raise ConfigError(f"the SAE's config has no {field}; pass {field}=")
    if name not in model.hook_dict:
        raise UnknownHookError(name, model.hook_dict)
    return name


@contextmanager
def spliced(
    sae: SparseAutoencoder,
    model: HookedTransformer,
    hook_name: str | None = None,
    *,
    target_hook_name: str | None = None,
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
    - A transcoder reads ``hook_name`` and replaces ``target_hook_name`` (default
      ``sae.cfg.target_hook_name``), which must fire after it in the same forward;
      with ``keep_error`` the error is the target's activation minus the output.

    The SAE runs on its own device and dtype; the result is cast back to the
    model's. The hook is attached first at that point, so hooks added inside the
    block see the spliced activation. It is removed on exit, even on error.
    """
    name = resolve_hook_name(sae, model, hook_name)
    target = name
    if sae.cfg.is_transcoder:
        target = resolve_hook_name(sae, model, target_hook_name, "target_hook_name")
    splice = Splice(hook_name=name, keep_error=keep_error,
                    target_hook_name=target if target != name else "")  # fmt: skip
    d_in, d_out, d_sae = sae.cfg.d_in, sae.cfg.d_out, sae.cfg.d_sae
    read: list[Tensor] = []  # a transcoder's input, from its hook to the target's

    def transcode(x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(latents, used latents, reconstruction, decoded used latents)``, skip included."""
        latents = sae.encode(x)
        skip = sae.skip(x)
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
        if skip is not None:
            reconstruction, decoded = reconstruction + skip, decoded + skip
        return latents, used, reconstruction, decoded

    def replace(activation: Tensor, x: Tensor) -> Tensor:
        rows = as_sae_input(activation, d_out, target)
        if rows.shape[:-1] != x.shape[:-1]:
            raise ShapeMismatchError(
                f"{target!r} has rows {tuple(rows.shape[:-1])}, but {name!r} had "
                f"{tuple(x.shape[:-1])}: the transcoder cannot pair them"
            )
        _, used, reconstruction, decoded = transcode(x)
        error = None
        if keep_error:
            replaced = rows.to(reconstruction.device, reconstruction.dtype)
            error = (replaced - reconstruction).detach()
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
            splice.replaced = rows.detach().to(reconstruction.device, reconstruction.dtype)
        return out.reshape(activation.shape)

    def sae_input(activation: Tensor) -> Tensor:
        return as_sae_input(activation, d_in, name).to(sae.W_enc.device, sae.W_enc.dtype)

    def read_input(activation: Tensor, point: HookPoint) -> Tensor:
        read[:] = [sae_input(activation)]
        return activation  # read, not replaced

    def replace_target(activation: Tensor, point: HookPoint) -> Tensor:
        if not read:
            raise ConfigError(
                f"the transcoder reads {name!r}, which did not fire before {target!r} "
                "in this forward"
            )
        return replace(activation, read.pop())

    if target == name:
        hooks = [(name, lambda activation, point: replace(activation, sae_input(activation)))]
    else:
        hooks = [(name, read_input), (target, replace_target)]
    with model.hooks(fwd_hooks=hooks):
        yield splice
