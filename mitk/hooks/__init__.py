"""Hooks: named points where activations are read or replaced, and how hooks are attached."""

from mitk.hooks.context import BwdHookSpec, HookSpec, attached_hooks
from mitk.hooks.hook_point import (
    BackwardHookFn,
    ForwardHookFn,
    HookDirection,
    HookDirections,
    HookHandle,
    HookPoint,
    check_direction,
)
from mitk.hooks.names import HookKind, layer_of, name
from mitk.hooks.registry import NamePredicate, NameSelector, collect_hook_points, resolve_names

__all__ = [
    "BackwardHookFn",
    "BwdHookSpec",
    "ForwardHookFn",
    "HookDirection",
    "HookDirections",
    "HookHandle",
    "HookKind",
    "HookPoint",
    "HookSpec",
    "NamePredicate",
    "NameSelector",
    "attached_hooks",
    "check_direction",
    "collect_hook_points",
    "layer_of",
    "name",
    "resolve_names",
]
