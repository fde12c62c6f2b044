"""What every hooked model shares: attach hooks, run with hooks or a cache, force a backend.

Subclasses (``HookedTransformer``, ``HookedEncoderDecoder``) supply ``hook_dict``,
``attention_backend`` and ``forward``; the decoder-only model narrows
``hooks_that_fire`` to the layers a ``start_at_layer``/``stop_at_layer`` pass runs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, cast, get_args

import torch
from torch import Tensor, nn

from mitk.cache import ActivationCache
from mitk.config import TORCH_DTYPES, AttentionBackend
from mitk.errors import HookError
from mitk.hooks import (
    BwdHookSpec,
    HookDirection,
    HookDirections,
    HookPoint,
    HookSpec,
    NamePredicate,
    NameSelector,
    attached_hooks,
    check_direction,
    collect_hook_points,
    resolve_names,
)


class HookedModule:
    """Mixin for models with a ``hook_dict`` of HookPoints and an ``attention_backend``."""

    hook_dict: dict[str, HookPoint]
    attention_backend: AttentionBackend
    # the one report a forward leaves behind: attention module name -> path its last pass took
    _path_record: dict[str, str]

    if TYPE_CHECKING:  # nn.Module's, which every subclass also inherits, and each model's init

        def __call__(self, *args: Any, **kwargs: Any) -> Any: ...

        def init_weights(self, seed: int = 0) -> None: ...

    def _index_hooks_and_init(
        self, backend: AttentionBackend, seed: int | None, dtype: str
    ) -> None:
        """The end of every hooked model's ``__init__``, once all its submodules exist.

        Names every HookPoint (``hook_dict``), sets the attention backend and an
        empty path report, initialises weights from ``seed`` (None: the caller
        loads weights next, so the init work is skipped) and casts to ``dtype``.
        """
        module = cast(nn.Module, self)
        self.hook_dict = collect_hook_points(module)
        self.attention_backend = backend
        self._path_record = {}
        if seed is not None:
            self.init_weights(seed)
        module.to(TORCH_DTYPES[dtype])

    @contextmanager
    def hooks(
        self, fwd_hooks: Sequence[HookSpec] = (), bwd_hooks: Sequence[BwdHookSpec] = ()
    ) -> Iterator[Any]:
        """Context manager: hooks attached inside the block, removed on exit even on error.

        Each hook is ``(name_or_predicate, fn)``; ``fn(activation, hook)`` may
        return a replacement of the same shape. Backward hooks receive the
        gradient w.r.t. the activation; they stay attached to the graph built
        inside the block, so ``loss.backward()`` after the block still fires them.
        ``with model.hooks(...) as m`` gives the model back, as in TransformerLens.
        """
        with attached_hooks(self.hook_dict, fwd_hooks, bwd_hooks):
            yield self

    def add_hook(
        self,
        name: str | Iterable[str] | NamePredicate,
        hook: Callable[..., Any],
        dir: HookDirection = "fwd",
        is_permanent: bool = False,
        level: int | None = None,
        prepend: bool = False,
    ) -> None:
        """Attach ``hook`` to the named HookPoints until removed, as TransformerLens's ``add_hook``.

        ``name`` is a hook name, a list of names or a predicate on names; every
        name is validated before anything is attached (an unknown one raises
        ``UnknownHookError``, a predicate matching nothing ``HookError``).
        ``dir="bwd"`` hooks get the gradient and may return a replacement, bare or
        as ``(grad,)``. Unlike ``hooks(...)``, nothing removes these on its own:
        ``reset_hooks()`` removes the temporary ones, ``is_permanent=True`` ones
        stay until ``reset_hooks(including_permanent=True)``. ``prepend=True``
        fires it before the hooks already there; ``level`` is a tag to filter on.
        """
        check_direction(dir)
        if not callable(hook):
            raise TypeError(f"hook for {name!r} is not callable: {hook!r}")
        if name is None:
            raise HookError("add_hook needs a hook name, a list of names or a predicate, not None")
        for hook_name in resolve_names(name, self.hook_dict):
            self.hook_dict[hook_name].add_hook(
                hook, dir=dir, is_permanent=is_permanent, level=level, prepend=prepend
            )

    def add_perma_hook(
        self,
        name: str | Iterable[str] | NamePredicate,
        hook: Callable[..., Any],
        dir: HookDirection = "fwd",
    ) -> None:
        """``add_hook(name, hook, dir, is_permanent=True)``: kept by ``reset_hooks()``."""
        self.add_hook(name, hook, dir=dir, is_permanent=True)

    def remove_all_hook_fns(
        self,
        direction: HookDirections = "both",
        including_permanent: bool = False,
        level: int | None = None,
    ) -> None:
        """Detach hooks from every HookPoint: ``HookPoint.remove_hooks`` on each, same arguments."""
        check_direction(direction, get_args(HookDirections))
        for point in self.hook_dict.values():
            point.remove_hooks(direction, including_permanent=including_permanent, level=level)

    def reset_hooks(
        self,
        clear_contexts: bool = True,
        direction: HookDirections = "both",
        including_permanent: bool = False,
        level: int | None = None,
    ) -> None:
        """Detach hooks, keeping permanent ones unless ``including_permanent=True``.

        TransformerLens's meaning and defaults: ``reset_hooks()`` removes every
        temporary hook (those added with ``add_hook`` and any a live ``hooks(...)``
        context attached) and keeps ``add_perma_hook`` ones;
        ``reset_hooks(including_permanent=True)`` detaches everything.
        ``clear_contexts`` is accepted for TransformerLens's signature; mitk's
        HookPoints keep no per-hook context, so there is nothing to clear.
        """
        self.remove_all_hook_fns(direction, including_permanent=including_permanent, level=level)

    @contextmanager
    def backend(self, name: AttentionBackend) -> Iterator[None]:
        """Temporarily force an attention backend (restored on exit)."""
        previous, self.attention_backend = self.attention_backend, name
        try:
            yield
        finally:
            self.attention_backend = previous

    def _report_paths(self, paths: dict[str, str], *, new_pass: bool = True) -> None:
        """Keep which attention path each module took (``attention_paths`` reads it).

        A report only: no forward ever reads it back. ``new_pass=False`` adds to
        the record of a pass that runs more than one stack (encoder, then decoder).
        """
        if new_pass:
            self._path_record.clear()
        self._path_record.update(paths)

    def hooks_that_fire(
        self,
        start_at_layer: int | None = None,
        stop_at_layer: int | None = None,
        return_type: str | None = "logits",
    ) -> list[str]:
        """Hook names a forward passes through (every hook, unless a subclass runs part)."""
        return list(self.hook_dict)

    def _check_fire(self, specs: Sequence[tuple[Any, Any]], kwargs: dict[str, Any]) -> None:
        """Refuse a named hook that a forward with these arguments would never reach.

        The layer bounds and ``return_type`` (``"hidden"`` or None never unembed)
        are read from ``kwargs``, the keywords passed on to ``forward``.
        """
        start, stop = kwargs.get("start_at_layer"), kwargs.get("stop_at_layer")
        return_type = kwargs.get("return_type", "logits")
        fire = set(self.hooks_that_fire(start, stop, return_type))
        for selector, _ in specs:
            if isinstance(selector, str) and selector in self.hook_dict and selector not in fire:
                raise HookError(
                    f"hook {selector!r} would never fire with start_at_layer={start}, "
                    f"stop_at_layer={stop}, return_type={return_type!r}"
                )

    def run_with_hooks(
        self,
        *args: Any,
        fwd_hooks: Sequence[HookSpec] = (),
        bwd_hooks: Sequence[BwdHookSpec] = (),
        **kwargs: Any,
    ) -> Any:
        """One forward with temporary hooks (see ``hooks``); returns what ``forward`` returns.

        Other arguments (``return_type``, ``prepend_bos``, ``padding_side``,
        ``start_at_layer``, ...) go to ``forward``; a named hook the forward would
        never reach with them raises ``HookError``.
        """
        self._check_fire([*fwd_hooks, *bwd_hooks], kwargs)
        with self.hooks(fwd_hooks, bwd_hooks):
            return self(*args, **kwargs)

    def run_with_cache(
        self,
        *args: Any,
        names_filter: NameSelector = None,
        device: str | torch.device | None = None,
        incl_bwd: bool = False,
        remove_batch_dim: bool = False,
        **kwargs: Any,
    ) -> tuple[Any, ActivationCache]:
        """Forward, storing activations; returns ``(forward's output, ActivationCache)``.

        ``names_filter`` is a hook name, a list of names, a predicate on names,
        or None for every hook the forward passes through except derived ones
        (``hook_result``: the cache builds those from ``hook_z`` when read).
        Activations are detached (and moved to ``device`` if given). ``incl_bwd=True`` also
        backpropagates the (scalar) output and stores each gradient
        (``cache.grad(name)``). Other arguments go to ``forward``.
        """
        if isinstance(names_filter, (str, list, tuple)):
            names = resolve_names(names_filter, self.hook_dict)
            self._check_fire([(n, None) for n in names], kwargs)
        else:
            fire = self.hooks_that_fire(
                kwargs.get("start_at_layer"),
                kwargs.get("stop_at_layer"),
                kwargs.get("return_type", "logits"),
            )
            if names_filter is None:  # derived points cost more than their source: by request
                fire = [n for n in fire if not self.hook_dict[n].derived]
            names = resolve_names(names_filter, {n: None for n in fire})
        out, acts, grads = self._record(lambda: self(*args, **kwargs), names, device, incl_bwd)
        cache = ActivationCache(acts, self, gradients=grads)  # type: ignore[arg-type]
        return out, cache.remove_batch_dim() if remove_batch_dim else cache

    def _record(
        self,
        run: Callable[[], Any],
        names: Sequence[str],
        device: str | torch.device | None,
        incl_bwd: bool,
    ) -> tuple[Any, dict[str, Tensor], dict[str, Tensor]]:
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
                if not isinstance(out, Tensor) or out.numel() != 1:
                    raise ValueError("incl_bwd=True needs a scalar output, e.g. return_type='loss'")
                out.backward()
        return out, acts, grads
