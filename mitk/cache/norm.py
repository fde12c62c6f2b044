"""Pushing a stack of stream components through a norm, as the forward did.

A norm is linear once its scale is fixed, and the forward fixed it: dividing
each (centred, for LayerNorm) component by the scale cached at that norm gives
what the component contributed to the norm's ``hook_normalized``. The
elementwise weight and bias are not applied (TransformerLens's
``apply_ln_to_stack``). For a logit lens the final norm is instead applied to
each component with its own statistics (``recompute_ln``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import Tensor

from mitk.cache.errors import CacheArgumentError, NotCachedError
from mitk.cache.selection import SliceLike, as_slice, resolve_layer
from mitk.errors import ShapeMismatchError, UnsupportedModelError
from mitk.hooks import name
from mitk.utils import Slice

if TYPE_CHECKING:
    from mitk.cache.activation_cache import ActivationCache


def scale_hook(cache: ActivationCache, layer: int, mlp_input: bool) -> str | None:
    """The ``hook_scale`` of the norm reading stream position ``layer``; None if there is none."""
    n_layers = cache.stream.n_layers
    if layer == n_layers:
        if mlp_input:
            raise CacheArgumentError(
                "mlp_input=True has no meaning at the unembed (layer=n_layers)"
            )
        hook = name("scale")
    else:
        hook = name("scale", layer, "ln2" if mlp_input else "ln1")
    return hook if hook in cache.model.hook_dict else None


def cached_scale(
    cache: ActivationCache, layer: int, mlp_input: bool, pos: Slice, batch: Slice | None
) -> Tensor | None:
    """That norm's cached scale ``[*lead, 1]``, sliced as the stack was; None: no norm there."""
    cache.stream.require_additive()
    hook = scale_hook(cache, layer, mlp_input)
    if hook is None:
        return None
    if hook not in cache:
        raise NotCachedError(
            f"apply_ln needs the norm's scale {hook!r}, which this cache does not hold; "
            "run_with_cache with it in names_filter (or no filter)"
        )
    scale = pos.apply(cache[hook], dim=-2)
    return batch.apply(scale, dim=0) if batch is not None and cache.has_batch_dim else scale


def apply_ln_to_stack(
    cache: ActivationCache,
    stack: Tensor,
    layer: int | None = None,
    mlp_input: bool = False,
    pos_slice: SliceLike = None,
    batch_slice: SliceLike = None,
    has_batch_dim: bool = True,
    recompute_ln: bool = False,
) -> Tensor:
    """``stack`` ``[component, *lead, d_model]`` as input to the norm at stream position ``layer``.

    ``pos_slice``/``batch_slice`` are the selections the stack was built with
    (applied to the cached scale; ``batch_slice`` is also applied to the stack
    when ``has_batch_dim``). A model without a norm there gets the stack back.
    ``recompute_ln`` at the unembed applies the final norm module itself to
    each component. Raises ``ShapeMismatchError`` when the stack's positions
    do not line up with the scale's, ``NotCachedError`` when the scale was
    not cached.
    """
    n_layers = cache.stream.n_layers
    end = resolve_layer(layer, n_layers)
    pos, batch = as_slice(pos_slice), as_slice(batch_slice, "batch_slice")
    hook = scale_hook(cache, end, mlp_input)
    if hook is None:
        return stack
    if has_batch_dim:
        stack = batch.apply(stack, dim=1)
    if recompute_ln and end == n_layers:
        return _through_final_norm(cache, stack)
    scale = cached_scale(cache, end, mlp_input, pos, batch)
    assert scale is not None  # a hook exists, so a scale does (or NotCachedError was raised)
    lead, scale_lead = tuple(stack.shape[1:-1]), tuple(scale.shape[:-1])
    while len(scale_lead) > len(lead) and scale_lead[0] == 1:  # a kept batch of one broadcasts
        scale_lead = scale_lead[1:]
    if lead != scale_lead:
        raise ShapeMismatchError(
            f"a stack with positions {tuple(stack.shape[1:-1])} (after its component dim) does "
            f"not line up with the cached scale {tuple(scale.shape[:-1])} at {hook}; pass the "
            "pos_slice (and batch_slice/has_batch_dim) the stack was built with"
        )
    if cache.stream.layernorm:
        stack = stack - stack.mean(-1, keepdim=True)
    return stack / scale


def _through_final_norm(cache: ActivationCache, stack: Tensor) -> Tensor:
    """Each component through ``ln_final`` with its own statistics (weight and bias included)."""
    norm = getattr(cache.model, "ln_final", None)
    if norm is None:
        raise UnsupportedModelError("recompute_ln needs the model's ln_final module")
    flat = stack.reshape(-1, 1, stack.shape[-1])  # the norm reads [batch, pos, d_model]
    return norm(flat).reshape(stack.shape)
