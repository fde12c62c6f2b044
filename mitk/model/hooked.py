"""Hook management shared by every hooked model: attach, reset, cache, force a backend."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor

from mitk.config import AttentionBackend
from mitk.hooks import BwdHookSpec, HookPoint, HookSpec, attached_hooks


class HookedModule:
    """Mixin for models with a ``hook_dict`` of HookPoints and an ``attention_backend``."""

    hook_dict: dict[str, HookPoint]
    attention_backend: AttentionBackend

    def hooks(
        self, fwd_hooks: Sequence[HookSpec] = (), bwd_hooks: Sequence[BwdHookSpec] = ()
    ) -> Any:
        """Context manager: hooks attached inside the block, removed on exit even on error.

        Each hook is ``(name_or_predicate, fn)``; ``fn(activation, hook)`` may
        return a replacement of the same shape. Backward hooks receive the
        gradient w.r.t. the activation; they stay attached to the graph built
        inside the block, so ``loss.backward()`` after the block still fires them.
        """
        return attached_hooks(self.hook_dict, fwd_hooks, bwd_hooks)

    def reset_hooks(self) -> None:
        """Detach every hook from every HookPoint (a safety net; contexts already clean up)."""
        for point in self.hook_dict.values():
            point.clear()

    @contextmanager
    def backend(self, name: AttentionBackend) -> Iterator[None]:
        """Temporarily force an attention backend (restored on exit)."""
        previous, self.attention_backend = self.attention_backend, name
        try:
            yield
        finally:
            self.attention_backend = previous

    def _record(
        self,
        run: Callable[[], Tensor],
        names: Sequence[str],
        device: str | torch.device | None,
        incl_bwd: bool,
    ) -> tuple[Tensor, dict[str, Tensor], dict[str, Tensor]]:
        """``run()`` with each named activation (and, with ``incl_bwd``, gradient) kept, detached.

        ``incl_bwd`` backpropagates the output, which must then be a scalar.
        """
        acts: dict[str, Tensor] = {}
        grads: dict[str, Tensor] = {}

        def keep(store: dict[str, Tensor]) -> Any:
            def hook(act: Tensor, point: HookPoint) -> None:
                act = act.detach()
                store[point.name] = act if device is None else act.to(device)

            return hook

        bwd = [(n, keep(grads)) for n in names] if incl_bwd else []
        with self.hooks([(n, keep(acts)) for n in names], bwd):
            out = run()
            if incl_bwd:
                if out.numel() != 1:
                    raise ValueError("incl_bwd=True needs a scalar output, e.g. return_type='loss'")
                out.backward()
        return out, acts, grads
