"""The one loop over blocks: every pass through a stack of blocks runs here.

``run_blocks`` runs ``ctx.start..ctx.stop`` with the pass's ``ForwardContext``;
``holding`` attaches the context's held values (as hooks that fire before any
other, so user hooks see the held value) for the span of a pass.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

from torch import Tensor, nn

from mitk.hooks import ForwardHookFn, HookPoint, attached_hooks
from mitk.model.forward_context import ForwardContext
from mitk.shapes import Float


def run_blocks(
    blocks: nn.ModuleList | Sequence[nn.Module],
    resid: Float[Tensor, "batch pos d_model"],
    ctx: ForwardContext,
) -> Float[Tensor, "batch pos d_model"]:
    """Blocks ``ctx.start`` up to ``ctx.stop`` (None: the end), each ``block(resid, ctx)``."""
    for block in blocks[ctx.start : ctx.stop]:
        resid = block(resid, ctx)
    return resid


@contextmanager
def holding(points: Mapping[str, HookPoint], held: Mapping[str, Tensor]) -> Iterator[None]:
    """Replace each named activation by its held value while the block runs.

    Names are validated (unknown ones raise with suggestions) and shapes are
    checked when the hook fires, as for any replacing hook.
    """
    if not held:
        yield
        return
    specs = [(hook_name, _replace_with(value)) for hook_name, value in held.items()]
    with attached_hooks(points, specs, prepend=True):
        yield


def _replace_with(value: Tensor) -> ForwardHookFn:
    def hold(activation: Tensor, hook: HookPoint) -> Tensor:
        return value.to(activation.dtype)

    return hold
