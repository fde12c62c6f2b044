"""Hooks: named points where activations are read or replaced, and how hooks are attached."""

from mitk.hooks.context import BwdHookSpec, HookSpec, attached_hooks
from mitk.hooks.hook_point import BackwardHookFn, ForwardHookFn, HookPoint
from mitk.hooks.names import HookKind, layer_of, name
from mitk.hooks.registry import NameSelector, collect_hook_points, resolve_names

__all__ = [
    "BackwardHookFn",
    "BwdHookSpec",
    "ForwardHookFn",
    "HookKind",
    "HookPoint",
    "HookSpec",
    "NameSelector",
    "attached_hooks",
    "collect_hook_points",
    "layer_of",
    "name",
    "resolve_names",
]
