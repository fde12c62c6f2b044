"""HookPoint: an identity module marking a place where an activation can be read or replaced."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from mitk.errors import HookError, ShapeMismatchError

# A forward hook gets (activation, hook) and returns None (read only) or a replacement.
ForwardHookFn = Callable[[Tensor, "HookPoint"], Tensor | None]
# A backward hook gets (gradient of the activation, hook) and may return a replacement gradient.
BackwardHookFn = Callable[[Tensor, "HookPoint"], Tensor | None]


class HookPoint(nn.Module):
    """Identity on its input unless hooks are attached.

    Forward hooks run in the order added; each sees the previous one's output.
    Backward hooks are attached to the activation tensor itself, so they fire
    when the graph built by this forward is backpropagated, even if the hook
    context has exited by then.
    """

    def __init__(self) -> None:
        super().__init__()
        self.name: str = ""
        self.fwd_fns: list[ForwardHookFn] = []
        self.bwd_fns: list[BackwardHookFn] = []

    @property
    def has_hooks(self) -> bool:
        """True when any forward or backward hook is attached."""
        return bool(self.fwd_fns or self.bwd_fns)

    def clear(self) -> None:
        """Detach every hook."""
        self.fwd_fns.clear()
        self.bwd_fns.clear()

    def forward(self, x: Tensor) -> Tensor:
        if not self.fwd_fns and not self.bwd_fns:
            return x
        for fn in self.fwd_fns:
            out = fn(x, self)
            if out is not None:
                x = self._checked_replacement(x, out, "forward")
        if self.bwd_fns:
            if not x.requires_grad:
                raise HookError(
                    f"backward hook on {self.name!r} cannot fire: the activation does not require "
                    "grad (is the forward inside torch.no_grad() or are all parameters frozen?)"
                )
            for fn in self.bwd_fns:
                x.register_hook(self._grad_hook(fn))
        return x

    def _grad_hook(self, fn: BackwardHookFn) -> Callable[[Tensor], Tensor | None]:
        def call(grad: Tensor) -> Tensor | None:
            out = fn(grad, self)
            return None if out is None else self._checked_replacement(grad, out, "backward")

        return call

    def _checked_replacement(self, old: Tensor, new: object, kind: str) -> Tensor:
        if not isinstance(new, torch.Tensor):
            raise HookError(
                f"{kind} hook on {self.name!r} returned {type(new).__name__}; "
                "return a Tensor to replace the activation or None to leave it"
            )
        if new.shape != old.shape:
            raise ShapeMismatchError(
                f"{kind} hook on {self.name!r} returned shape {tuple(new.shape)}, "
                f"expected {tuple(old.shape)}"
            )
        return new

    def extra_repr(self) -> str:
        return f"name={self.name!r}, fwd={len(self.fwd_fns)}, bwd={len(self.bwd_fns)}"
