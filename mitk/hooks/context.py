"""The ``hooks(...)`` context manager: attach hooks for a block, always detach on exit."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

from mitk.hooks.hook_point import BackwardHookFn, ForwardHookFn, HookPoint
from mitk.hooks.registry import NamePredicate, resolve_names

HookSpec = tuple[str | NamePredicate, ForwardHookFn]
BwdHookSpec = tuple[str | NamePredicate, BackwardHookFn]


@contextmanager
def attached_hooks(
    points: Mapping[str, HookPoint],
    fwd_hooks: Sequence[HookSpec] = (),
    bwd_hooks: Sequence[BwdHookSpec] = (),
    *,
    prepend: bool = False,
) -> Iterator[None]:
    """Attach ``(name_or_predicate, fn)`` hooks to ``points`` for the duration of the block.

    Every name is validated before anything is attached, so a typo never leaves
    half the hooks in place. Exactly the hooks this call added are removed on
    exit, whether the block returns or raises; hooks added by an enclosing
    context stay. ``prepend=True`` puts these hooks before those already
    attached, so they fire first.
    """
    plan: list[tuple[list[Any], Any]] = []
    for specs, attr in ((fwd_hooks, "fwd_fns"), (bwd_hooks, "bwd_fns")):
        for selector, fn in specs:
            if not callable(fn):
                raise TypeError(f"hook for {selector!r} is not callable: {fn!r}")
            for hook_name in resolve_names(selector, points):
                plan.append((getattr(points[hook_name], attr), fn))
    try:
        for fns, fn in plan:
            if prepend:
                fns.insert(0, fn)
            else:
                fns.append(fn)
        yield
    finally:
        for fns, fn in reversed(plan):
            # remove this exact registration (identity; the one this call added)
            order = range(len(fns)) if prepend else range(len(fns) - 1, -1, -1)
            for i in order:
                if fns[i] is fn:
                    del fns[i]
                    break
