"""Finding HookPoints in a module tree and resolving user-given names against them.

Every place that accepts hook names (``names_filter``, ``fwd_hooks``,
``bwd_hooks``, cache lookups) resolves them here, so an unknown name fails the
same way everywhere and a name is never accepted and then silently not fired.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

from torch import nn

from mitk.errors import HookError, UnknownHookError
from mitk.hooks.hook_point import HookPoint

NamePredicate = Callable[[str], bool]
NameSelector = str | Iterable[str] | NamePredicate | None


def collect_hook_points(root: nn.Module) -> dict[str, HookPoint]:
    """Every HookPoint under ``root`` by its dotted module path, naming each one."""
    points: dict[str, HookPoint] = {}
    for path, module in root.named_modules():
        if isinstance(module, HookPoint):
            module.name = path
            points[path] = module
    return points


def resolve_names(selector: NameSelector, valid: Mapping[str, object]) -> list[str]:
    """Expand a name, a list of names or a predicate into hook names, in model order.

    ``None`` selects every hook. Unknown names raise ``UnknownHookError`` with
    suggestions; a predicate that selects nothing raises ``HookError``.
    """
    if selector is None:
        return list(valid)
    if callable(selector):
        chosen = [n for n in valid if selector(n)]
        if not chosen:
            raise HookError(f"hook name predicate {selector!r} matched no hook on this model")
        return chosen
    wanted = [selector] if isinstance(selector, str) else list(selector)
    for item in wanted:
        if not isinstance(item, str):
            raise HookError(f"hook names must be strings, got {type(item).__name__}: {item!r}")
        if item not in valid:
            raise UnknownHookError(item, valid)
    order = {n: i for i, n in enumerate(valid)}
    return sorted(dict.fromkeys(wanted), key=order.__getitem__)
