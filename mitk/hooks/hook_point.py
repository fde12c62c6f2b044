"""HookPoint: an identity module marking a place where an activation can be read or replaced."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal, get_args

import torch
from torch import Tensor, nn

from mitk.errors import HookError, HookReplacementError

# A forward hook gets (activation, hook) and returns None (read only) or a replacement.
ForwardHookFn = Callable[[Tensor, "HookPoint"], Tensor | None]
# A backward hook gets (gradient of the activation, hook) and may return a replacement
# gradient, bare or as a 1-tuple ``(grad,)`` as TransformerLens's backward hooks do.
BackwardHookFn = Callable[[Tensor, "HookPoint"], Tensor | tuple[Tensor] | None]
HookDirection = Literal["fwd", "bwd"]
HookDirections = Literal["fwd", "bwd", "both"]


def check_direction(dir: str, allowed: tuple[str, ...] = get_args(HookDirection)) -> None:
    """Refuse a hook direction that is not one of ``allowed`` (``"fwd"``, ``"bwd"``, ...)."""
    if dir not in allowed:
        raise HookError(f"hook direction must be one of {allowed}, got {dir!r}")


class HookHandle:
    """One hook attached to a HookPoint, as ``HookPoint.fwd_hooks`` / ``bwd_hooks`` list them.

    ``user_hook`` is the function, ``dir`` its direction, ``is_permanent`` whether
    ``reset_hooks()`` keeps it and ``context_level`` the optional tag given to
    ``add_hook(level=...)``. ``remove()`` detaches it (a no-op once detached).
    Hooks a ``hooks(...)`` context attached are listed too, never permanent.
    """

    def __init__(
        self,
        point: HookPoint,
        user_hook: Callable[..., Any],
        dir: HookDirection,
        is_permanent: bool = False,
        context_level: int | None = None,
        entry: object = None,
    ) -> None:
        self.user_hook = user_hook
        self.dir = dir
        self.is_permanent = is_permanent
        self.context_level = context_level
        self._point = point
        # what sits in the point's list: this handle, or the bare function a context added
        self._entry = self if entry is None else entry

    def __call__(self, x: Tensor, hook: HookPoint) -> Any:
        return self.user_hook(x, hook)

    @property
    def hook(self) -> HookHandle:
        """Itself: TransformerLens code calls ``handle.hook.remove()`` on its handles."""
        return self

    def remove(self) -> None:
        """Detach this hook from its HookPoint (nothing happens if it is already gone)."""
        fns = self._point._fns(self.dir)
        for i, fn in enumerate(fns):
            if fn is self._entry:
                del fns[i]
                return

    def __repr__(self) -> str:
        kind = "permanent" if self.is_permanent else "temporary"
        return f"HookHandle({self._point.name!r}, {self.dir}, {kind}, {self.user_hook!r})"


def _is_permanent(entry: object) -> bool:
    return isinstance(entry, HookHandle) and entry.is_permanent


def _level(entry: object) -> int | None:
    return entry.context_level if isinstance(entry, HookHandle) else None


class _HasHooks:
    """``point.has_hooks``: true when any hook is attached; call it to filter as TransformerLens.

    mitk has always read ``has_hooks`` as a property (``if point.has_hooks:``);
    TransformerLens calls it, ``has_hooks(dir="both", including_permanent=True,
    level=None)``. This object does both: its truth value is "any hook at all",
    and calling it applies the filters.
    """

    def __init__(self, point: HookPoint) -> None:
        self._point = point

    def __bool__(self) -> bool:
        return bool(self._point.fwd_fns or self._point.bwd_fns)

    def __call__(
        self,
        dir: HookDirections = "both",
        including_permanent: bool = True,
        level: int | None = None,
    ) -> bool:
        check_direction(dir, get_args(HookDirections))
        point = self._point
        lists: list[list[Any]] = (
            [point.fwd_fns, point.bwd_fns] if dir == "both" else [point._fns(dir)]
        )
        return any(
            (including_permanent or not _is_permanent(e)) and (level is None or _level(e) == level)
            for fns in lists
            for e in fns
        )

    def __eq__(self, other: object) -> bool:  # == True / == False compare the truth value
        return isinstance(other, bool) and bool(self) == other

    def __hash__(self) -> int:
        return hash(bool(self))

    def __repr__(self) -> str:
        return repr(bool(self))


class HookPoint(nn.Module):
    """Identity on its input unless hooks are attached.

    Forward hooks run in the order added; each sees the previous one's output.
    Backward hooks are attached to the activation tensor itself, so they fire
    when the graph built by this forward is backpropagated, even if the hook
    context has exited by then.

    ``fwd_fns`` / ``bwd_fns`` are the attached callables in firing order (what the
    ``hooks(...)`` context appends to); ``fwd_hooks`` / ``bwd_hooks`` list the same
    hooks as ``HookHandle`` objects, as TransformerLens's HookPoint does.

    ``derived=True`` marks a point whose activation the forward builds only
    when a hook is attached there (per-head results): ``run_with_cache()``
    without a ``names_filter`` leaves it out, and the cache derives it on demand.
    """

    def __init__(self, derived: bool = False) -> None:
        super().__init__()
        self.name: str = ""
        self.derived = derived
        self.fwd_fns: list[ForwardHookFn] = []
        self.bwd_fns: list[BackwardHookFn] = []

    @property
    def has_hooks(self) -> _HasHooks:
        """Truthy when any hook is attached; call it (TransformerLens's arguments) to filter."""
        return _HasHooks(self)

    def _fns(self, dir: HookDirection) -> list[Any]:
        """The live list of callables attached in direction ``dir`` (``fwd_fns`` or ``bwd_fns``)."""
        return self.fwd_fns if dir == "fwd" else self.bwd_fns

    def _handles(self, dir: HookDirection) -> list[HookHandle]:
        return [
            e if isinstance(e, HookHandle) else HookHandle(self, e, dir, entry=e)
            for e in self._fns(dir)
        ]

    @property
    def fwd_hooks(self) -> list[HookHandle]:
        """The forward hooks attached, in firing order, as handles (a fresh list each call)."""
        return self._handles("fwd")

    @property
    def bwd_hooks(self) -> list[HookHandle]:
        """The backward hooks attached, in the order added, as handles (a fresh list each call)."""
        return self._handles("bwd")

    def add_hook(
        self,
        hook: Callable[..., Any],
        dir: HookDirection = "fwd",
        is_permanent: bool = False,
        level: int | None = None,
        prepend: bool = False,
    ) -> None:
        """Attach ``hook(activation, hook_point)`` until removed, as TransformerLens's ``add_hook``.

        ``dir="bwd"`` hooks receive the gradient w.r.t. the activation and may
        return a replacement, bare or as ``(grad,)``. ``is_permanent=True`` hooks
        survive ``remove_hooks()`` and the model's ``reset_hooks()`` unless
        ``including_permanent=True``. ``prepend=True`` makes it fire first.
        ``level`` is a tag that ``has_hooks``/``remove_hooks`` can filter on.
        """
        check_direction(dir)
        if not callable(hook):
            raise TypeError(f"hook for {self.name!r} is not callable: {hook!r}")
        handle = HookHandle(self, hook, dir, is_permanent, level)
        fns = self._fns(dir)
        if prepend:
            fns.insert(0, handle)
        else:
            fns.append(handle)

    def add_perma_hook(self, hook: Callable[..., Any], dir: HookDirection = "fwd") -> None:
        """``add_hook(hook, dir, is_permanent=True)``."""
        self.add_hook(hook, dir=dir, is_permanent=True)

    def remove_hooks(
        self,
        dir: HookDirections = "fwd",
        including_permanent: bool = False,
        level: int | None = None,
    ) -> None:
        """Detach hooks in direction ``dir`` (``"fwd"``, ``"bwd"``, ``"both"``), as TransformerLens.

        Permanent hooks stay unless ``including_permanent=True`` (which removes
        every hook, whatever its level); with ``level`` only hooks tagged with it go.
        Hooks a ``hooks(...)`` context attached are temporary and untagged.
        """
        check_direction(dir, get_args(HookDirections))

        def keep(entry: object) -> bool:
            if including_permanent:
                return False
            return _is_permanent(entry) or (level is not None and _level(entry) != level)

        # in place: a hooks(...) context holds these lists to remove its own hooks on exit
        if dir in ("fwd", "both"):
            self.fwd_fns[:] = [e for e in self.fwd_fns if keep(e)]
        if dir in ("bwd", "both"):
            self.bwd_fns[:] = [e for e in self.bwd_fns if keep(e)]

    def clear(self) -> None:
        """Detach every hook, permanent ones included."""
        self.fwd_fns.clear()
        self.bwd_fns.clear()

    def layer(self) -> int:
        """The block index in this hook's name (``blocks.3.attn.hook_z`` → 3).

        Raises ``HookError`` (a ``ValueError``) for names without one, such as
        ``hook_embed`` or ``ln_final.hook_scale``, as TransformerLens raises.
        """
        parts = self.name.split(".")
        if len(parts) > 1 and parts[1].isdigit():
            return int(parts[1])
        raise HookError(f"hook {self.name!r} has no layer index (expected '<stack>.<layer>.…')")

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
            for grad_fn in self.bwd_fns:
                x.register_hook(self._grad_hook(grad_fn))
        return x

    def _grad_hook(self, fn: BackwardHookFn) -> Callable[[Tensor], Tensor | None]:
        def call(grad: Tensor) -> Tensor | None:
            out: object = fn(grad, self)
            if isinstance(out, tuple):  # TransformerLens's backward hooks may return (grad,)
                if len(out) != 1 or not isinstance(out[0], torch.Tensor):
                    kinds = ", ".join(type(o).__name__ for o in out)
                    raise HookError(
                        f"backward hook on {self.name!r} returned a tuple of {len(out)} "
                        f"({kinds}); return a Tensor, a 1-tuple (grad,) or None"
                    )
                out = out[0]
            return None if out is None else self._checked_replacement(grad, out, "backward")

        return call

    def _checked_replacement(self, old: Tensor, new: object, kind: str) -> Tensor:
        """``new`` if it can stand in for ``old`` (same dtype, device and shape), else raise.

        Runs on every replaced activation, so it compares three attributes and
        nothing more; the message is built only on failure.
        """
        if (
            isinstance(new, torch.Tensor)
            and new.dtype == old.dtype
            and new.device == old.device
            and new.shape == old.shape
        ):
            return new
        raise HookReplacementError(self._replacement_message(old, new, kind))

    def _replacement_message(self, old: Tensor, new: object, kind: str) -> str:
        expected = _describe(old)
        if not isinstance(new, torch.Tensor):
            return (
                f"{kind} hook on {self.name!r} returned {type(new).__name__}; return a Tensor "
                f"({expected}) to replace the activation or None to leave it"
            )
        wrong = [
            f"{what} {got}, expected {want}"
            for what, got, want in (
                ("dtype", new.dtype, old.dtype),
                ("device", new.device, old.device),
                ("shape", tuple(new.shape), tuple(old.shape)),
            )
            if got != want
        ]
        return (
            f"{kind} hook on {self.name!r} returned {'; '.join(wrong)} "
            f"(expected {expected}; received {_describe(new)})"
        )

    def extra_repr(self) -> str:
        return f"name={self.name!r}, fwd={len(self.fwd_fns)}, bwd={len(self.bwd_fns)}"


def _describe(x: Tensor) -> str:
    return f"dtype {x.dtype}, device {x.device}, shape {tuple(x.shape)}"
