"""Activation sources for SAE training: every batch is a pure function of (settings, step).

The trainer calls ``source.batch(step)`` and may resume at any step, so nothing here
depends on call history. This module holds the protocol, the seeding helpers and
``TensorActivations`` (rows of a tensor you already have); ``mitk.sae.store`` runs a
model over tokens and ``mitk.sae.chunks`` replays cached shards.
"""

from __future__ import annotations

from collections.abc import Mapping
import hashlib
import json
import math
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

from mitk.errors import ConfigError, ShapeMismatchError
from mitk.sae.tokens import content_digest
from mitk.shapes import Float, Int


@runtime_checkable
class ActivationSource(Protocol):
    """What the SAE trainer reads: one batch of rows per hook for each step."""

    hook_names: tuple[str, ...]
    batch_size: int
    d_in: dict[str, int]

    def batch(self, step: int) -> dict[str, Float[Tensor, "batch _d_in"]]: ...

    def scale(self, hook_name: str) -> float: ...

    def fingerprint(self) -> dict[str, Any]: ...


def derive_seed(*parts: object) -> int:
    """A 63-bit generator seed from ``parts``, identical in every process and on every platform."""
    text = "/".join(str(part) for part in parts)
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") >> 1


def seeded_permutation(n: int, *parts: object) -> Int[Tensor, " n"]:
    """``torch.randperm(n)`` (on CPU) from a generator seeded by ``derive_seed(*parts)``."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(derive_seed(*parts)))


def norm_scale(rows: Float[Tensor, "n d"]) -> float:
    """The factor that makes the mean L2 norm of ``rows`` equal ``sqrt(d)`` (computed in fp64)."""
    mean_norm = float(rows.double().norm(dim=-1).mean())
    if not math.isfinite(mean_norm) or mean_norm == 0.0:
        raise ConfigError(f"cannot normalise activations whose mean norm is {mean_norm}")
    return math.sqrt(rows.shape[-1]) / mean_norm


def jsonable(data: dict[str, Any]) -> dict[str, Any]:
    return dict(json.loads(json.dumps(data, sort_keys=True)))


class TensorActivations:
    """Train straight from activations you already have: rows of a ``[n, d_in]`` tensor.

    Pass one tensor (served under ``hook_name``) or a dict of tensors with the same
    ``n`` (rows are kept aligned across hooks). Epoch ``e = step // (n // batch_size)``
    walks a permutation seeded by ``(seed, e)``; the last ``n % batch_size`` rows of
    each permutation are dropped. With ``normalize`` (the default, which the
    sparsity coefficients' defaults assume) every tensor is scaled so its mean
    row norm is ``sqrt(d_in)``; the trainer folds the factor back into the SAE.
    Batches stay on the tensors' device and dtype.
    Raises ``ShapeMismatchError`` for a non-2-D or non-float tensor, mismatched ``n``
    or non-finite values, and ``ConfigError`` when ``n < batch_size``.
    """

    def __init__(
        self,
        activations: Tensor | Mapping[str, Tensor],
        batch_size: int,
        *,
        seed: int = 0,
        hook_name: str = "activations",
        normalize: bool = True,
    ) -> None:
        acts = {hook_name: activations} if isinstance(activations, Tensor) else dict(activations)
        if not acts:
            raise ConfigError("activations is an empty dict; pass at least one tensor")
        for name, tensor in acts.items():
            if tensor.ndim != 2 or not tensor.dtype.is_floating_point:
                raise ShapeMismatchError(
                    f"activations for {name!r} must be a float [n, d_in] tensor, "
                    f"got {tensor.dtype} of shape {tuple(tensor.shape)}"
                )
            bad = int((~torch.isfinite(tensor)).sum())
            if bad:
                raise ShapeMismatchError(f"activations for {name!r} hold {bad} non-finite values")
        sizes = {name: int(t.shape[0]) for name, t in acts.items()}
        if len(set(sizes.values())) != 1:
            raise ShapeMismatchError(f"activations must have the same number of rows: {sizes}")
        self.n_rows = next(iter(sizes.values()))
        if batch_size < 1 or self.n_rows < batch_size:
            raise ConfigError(f"batch_size={batch_size} needs 1 <= batch_size <= n={self.n_rows}")
        self.hook_names = tuple(acts)
        self.batch_size = batch_size
        self.d_in = {name: int(t.shape[1]) for name, t in acts.items()}
        self.seed = seed
        self.normalize = normalize
        self.steps_per_epoch = self.n_rows // batch_size
        self._acts = acts
        self._scales = {n: norm_scale(t) if normalize else 1.0 for n, t in acts.items()}
        self._perm: tuple[int, Tensor] | None = None

    def batch(self, step: int) -> dict[str, Float[Tensor, "batch _d_in"]]:
        """Rows ``[batch_size, d_in]`` per hook for ``step`` (scaled when normalising)."""
        if step < 0:
            raise ConfigError(f"step must be >= 0, got {step}")
        epoch, within = divmod(step, self.steps_per_epoch)
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, seeded_permutation(self.n_rows, self.seed, epoch))
        rows = self._perm[1][within * self.batch_size : (within + 1) * self.batch_size]
        out = {}
        for name, tensor in self._acts.items():
            picked = tensor[rows.to(tensor.device)]
            out[name] = picked * self._scales[name] if self.normalize else picked
        return out

    def scale(self, hook_name: str) -> float:
        """The factor batches of ``hook_name`` were multiplied by (1.0 unless normalising)."""
        return self._scales[hook_name]

    def fingerprint(self) -> dict[str, Any]:
        """Settings and a sampled digest of the activations."""
        return jsonable(
            {
                "kind": "tensor_activations",
                "hook_names": list(self.hook_names),
                "n_rows": self.n_rows,
                "d_in": dict(self.d_in),
                "dtype": {n: str(t.dtype).removeprefix("torch.") for n, t in self._acts.items()},
                "batch_size": self.batch_size,
                "seed": self.seed,
                "normalize": self.normalize,
                "digest": content_digest(self._acts),
            }
        )
