"""Linear probes on every layer at once, with the controls that keep them honest.

``train_probes`` fits one binary probe per layer (logistic or ridge) on cached
activations, and beside it two controls fitted and scored the same way on the
same rows:

- the **control task** (Hewitt & Liang, 2019): labels drawn at random, one per
  group (pass ``control_groups``, e.g. the token id at each probed position, so
  a probe that memorises token identity scores as well on the control), else
  one per row, with the real labels' class balance. ``selectivity`` is the
  probe's test accuracy minus the control's: high accuracy with low
  selectivity means the probe learned the task, not the representation.
- **shuffled inputs**: the probe refitted with the activations permuted against
  their labels (within the training and the test rows), which shows what an
  unrelated input scores: chance, up to noise.

All layers, probes and controls are solved together (``mitk.analysis.probe_fit``),
on the activations' device, so a GPU does the work when they live there.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import pandas as pd
import torch
from torch import Tensor

from mitk.analysis.probe_fit import fit_logistic, fit_ridge, roc_auc
from mitk.analysis.readout import PositionChoice, Prompts, read_activations
from mitk.errors import ShapeMismatchError
from mitk.shapes import Bool, Float, Int

__all__ = ["ProbeResult", "probe_activations", "train_probes"]

ProbeKind = Literal["logistic", "ridge"]
VARIANTS = ("probe", "control", "shuffled")


@dataclass(frozen=True)
class ProbeResult:
    """Per-layer probes and their controls' held-out scores.

    ``weights [layer, feature]`` and ``bias [layer]`` are the probes in the
    activations' own units over ``features [layer, feature]`` (the columns each
    probe reads: all of them, or the ``top_k`` chosen), so
    ``activations[l][:, features[l]] @ weights[l] + bias[l] > 0`` predicts label 1.
    Metrics are on the test rows; ``*_roc_auc`` is NaN where a test split holds
    one class only.
    """

    layers: list[str]
    kind: str
    weights: Float[Tensor, "layer feature"]
    bias: Float[Tensor, " layer"]
    features: Int[Tensor, "layer feature"]
    accuracy: Float[Tensor, " layer"]
    roc_auc: Float[Tensor, " layer"]
    control_accuracy: Float[Tensor, " layer"]
    control_roc_auc: Float[Tensor, " layer"]
    shuffled_accuracy: Float[Tensor, " layer"]
    shuffled_roc_auc: Float[Tensor, " layer"]
    train_accuracy: Float[Tensor, " layer"]
    test_rows: Int[Tensor, " test"]
    """Indices of the held-out rows (the others trained every probe)."""

    @property
    def n_test(self) -> int:
        """Rows held out."""
        return len(self.test_rows)

    @property
    def selectivity(self) -> Float[Tensor, " layer"]:
        """Test accuracy minus the control task's (Hewitt & Liang)."""
        return self.accuracy - self.control_accuracy

    def scores(self, activations: Float[Tensor, "layer row d"]) -> Float[Tensor, "layer row"]:
        """Each layer's probe score (logit or ridge output) on ``[layer, row, d]`` activations."""
        picked = torch.gather(
            activations.to(self.weights),
            2,
            self.features[:, None, :].expand(-1, activations.shape[1], -1).to(self.weights.device),
        )
        return (picked @ self.weights[..., None])[..., 0] + self.bias[:, None]

    def to_frame(self) -> pd.DataFrame:
        """One row per layer: accuracy and ROC-AUC of probe, control and shuffled, selectivity."""
        columns = {
            "accuracy": self.accuracy,
            "roc_auc": self.roc_auc,
            "control_accuracy": self.control_accuracy,
            "control_roc_auc": self.control_roc_auc,
            "shuffled_accuracy": self.shuffled_accuracy,
            "shuffled_roc_auc": self.shuffled_roc_auc,
            "selectivity": self.selectivity,
            "train_accuracy": self.train_accuracy,
        }
        frame = pd.DataFrame({"layer": self.layers})
        for column, values in columns.items():
            frame[column] = values.double().cpu().tolist()
        frame["kind"], frame["n_test"] = self.kind, self.n_test
        return frame


def _stacked(
    activations: Float[Tensor, "layer row d"] | Mapping[str, Float[Tensor, "row ..."]],
) -> tuple[Tensor, list[str]]:
    if isinstance(activations, Mapping):
        names = list(activations)
        rows = [a.reshape(a.shape[0], -1) for a in activations.values()]
        if len({r.shape for r in rows}) != 1:
            shapes = {n: tuple(r.shape) for n, r in zip(names, rows, strict=True)}
            raise ShapeMismatchError(f"every layer needs the same [row, d] shape; got {shapes}")
        return torch.stack(rows), names
    return activations, [str(i) for i in range(activations.shape[0])]


def _control_labels(
    labels: Tensor, groups: Tensor | None, generator: torch.Generator
) -> Bool[Tensor, " row"]:
    """Random labels with the real ones' balance: one per group (per row without groups)."""
    if groups is None:
        groups = torch.arange(labels.shape[0], device=labels.device)
    if groups.shape != labels.shape:
        raise ShapeMismatchError(
            f"control_groups {tuple(groups.shape)} must match labels {tuple(labels.shape)}"
        )
    ids, index = torch.unique(groups, return_inverse=True)
    rate = float(labels.float().mean())
    per_group = torch.rand(len(ids), generator=generator) < rate
    return per_group.to(labels.device)[index]


def train_probes(
    activations: Float[Tensor, "layer row d"]
    | Mapping[str, Float[Tensor, "row ..."]]
    | tuple[Any, Any, list[str]],
    labels: Bool[Tensor, " n_labels"] | Int[Tensor, " n_labels"],
    kind: str = "logistic",
    *,
    l2: float = 1e-3,
    test_fraction: float = 0.25,
    control_groups: Int[Tensor, " row"] | None = None,
    top_k: int | None = None,
    solver: str = "auto",
    max_iter: int | None = None,
    seed: int = 0,
) -> ProbeResult:
    """Fit a binary probe per layer, with a control task and shuffled inputs, scored held out.

    - ``activations``: ``[layer, row, d]``, or hook name -> ``[row, ...]`` (as
      ``probe_activations`` or a cache gives; trailing axes are flattened), or
      ``(model, prompts, hooks)``, read with ``probe_activations`` (each
      prompt's last real token: one row per prompt).
    - ``labels``: 0/1 or bool per row. ``kind`` (a ``ProbeKind``): ``"logistic"`` (Newton up to 512
      features, L-BFGS above, or ``solver=``) or ``"ridge"`` (closed form on ±1
      targets). ``l2`` penalises the weights on features centred and scaled to
      unit mean variance per layer (see ``mitk.analysis.probe_fit`` for the
      objectives). Fitting runs on the activations' device in their dtype, at
      least float32 (pass float64 for tight agreement with other solvers).
    - ``test_fraction`` of the rows (a seeded random split) is held out for
      every metric. ``control_groups``: see the module docstring.
    - ``top_k``: a sparse probe reading only the ``k`` features (e.g. SAE
      latents) whose class means differ most on the training rows, chosen per
      layer and, for the controls, on their own labels.
    """
    if isinstance(activations, tuple):
        model, prompts, hooks = activations
        activations = probe_activations(model, prompts, hooks)
    x, names = _stacked(activations)
    labels = labels.to(x.device)
    n_layers, n, d = x.shape
    if labels.shape != (n,):
        raise ShapeMismatchError(f"labels {tuple(labels.shape)} must be [row] with row={n}")
    if not bool(((labels == 0) | (labels == 1)).all()):
        raise ValueError("probes are binary: labels must be 0/1 or bool")
    y = labels.bool()
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(n, generator=generator).to(x.device)
    n_test = round(n * test_fraction)
    test, train = order[:n_test], order[n_test:]
    for part, what in ((train, "training"), (test, "test")):
        if len(part) == 0 or y[part].all() or not y[part].any():
            raise ValueError(f"the {what} rows need both classes; give more rows or another seed")
    control = _control_labels(y, control_groups, generator)
    shuffle = torch.cat(
        [
            part[torch.randperm(len(part), generator=generator).to(x.device)]
            for part in (train, test)
        ]
    )
    shuffled = torch.empty_like(y)
    shuffled[torch.cat([train, test])] = y[shuffle]  # row i gets the label of a random other row
    targets = torch.stack([y, control, shuffled])  # [variant, row]

    dtype = torch.promote_types(x.dtype, torch.float32)  # bf16/fp16 activations fit in fp32
    x_train, x_test = x[:, train].to(dtype), x[:, test].to(dtype)
    y_train, y_test = targets[:, train], targets[:, test]
    if top_k is None:
        features = torch.arange(d, device=x.device).expand(n_layers, len(VARIANTS), d)
        z_train, z_test, groups = x_train, x_test, n_layers
    else:
        if not 0 < top_k <= d:
            raise ValueError(f"top_k must lie in [1, {d}], got {top_k}")
        features = _top_features(x_train, y_train, top_k)  # [layer, variant, k]
        gather = features.reshape(n_layers, 1, -1)
        z_train = x_train.gather(2, gather.expand(-1, len(train), -1))
        z_test = x_test.gather(2, gather.expand(-1, len(test), -1))
        # one group per (layer, variant): each reads its own features
        z_train = z_train.reshape(n_layers, len(train), len(VARIANTS), top_k).transpose(1, 2)
        z_test = z_test.reshape(n_layers, len(test), len(VARIANTS), top_k).transpose(1, 2)
        z_train = z_train.reshape(-1, len(train), top_k)
        z_test = z_test.reshape(-1, len(test), top_k)
        groups = n_layers * len(VARIANTS)
    mean = z_train.mean(1, keepdim=True)
    scale = ((z_train - mean).square().mean((1, 2), keepdim=True)).sqrt().clamp_min(1e-12)
    z_train, z_test = (z_train - mean) / scale, (z_test - mean) / scale
    fit_y = y_train.expand(n_layers, -1, -1) if top_k is None else y_train.repeat(n_layers, 1)
    fit_y = fit_y.reshape(groups, -1, len(train))
    if kind == "ridge":
        w, b = fit_ridge(z_train, fit_y, l2)
    elif kind == "logistic":
        w, b = fit_logistic(z_train, fit_y, l2, solver, max_iter)
    else:
        raise ValueError(f"kind must be 'logistic' or 'ridge', not {kind!r}")
    w, b = w.reshape(n_layers, len(VARIANTS), -1), b.reshape(n_layers, len(VARIANTS))
    test_scores = _scores(z_test, w, b, n_layers)
    train_scores = _scores(z_train, w, b, n_layers)
    correct = (test_scores > 0) == y_test
    auc = roc_auc(test_scores, y_test.expand_as(test_scores))
    # back to the activations' units: w·(x - mean)/scale + b
    mean_l = mean.reshape(n_layers, -1, 1, mean.shape[-1])[:, :, 0]
    scale_l = scale.reshape(n_layers, -1)
    weights = w / scale_l[..., None]
    bias = b - (weights * mean_l.expand_as(weights)).sum(-1)
    acc = correct.to(dtype).mean(-1)
    return ProbeResult(
        layers=names,
        kind=kind,
        weights=weights[:, 0].float(),
        bias=bias[:, 0].float(),
        features=features[:, 0].contiguous(),
        accuracy=acc[:, 0].float(),
        roc_auc=auc[:, 0].float(),
        control_accuracy=acc[:, 1].float(),
        control_roc_auc=auc[:, 1].float(),
        shuffled_accuracy=acc[:, 2].float(),
        shuffled_roc_auc=auc[:, 2].float(),
        train_accuracy=((train_scores[:, 0] > 0) == y_train[0]).to(dtype).mean(-1).float(),
        test_rows=test,
    )


def _scores(z: Tensor, w: Tensor, b: Tensor, n_layers: int) -> Tensor:
    """``[layer, variant, row]`` scores from shared (``[layer, ...]``) or per-variant features."""
    if z.shape[0] == n_layers:
        return w @ z.transpose(1, 2) + b[..., None]
    per = z.reshape(n_layers, -1, *z.shape[1:])  # [layer, variant, row, k]
    return (per @ w[..., None])[..., 0] + b[..., None]


def _top_features(x: Tensor, y: Tensor, k: int) -> Int[Tensor, "layer variant k"]:
    """The ``k`` features with the largest class-mean difference, per layer and label set."""
    yf = y.to(x.dtype)  # [variant, row]
    pos = (yf @ x) / yf.sum(-1)[:, None]  # [layer, variant, d]
    neg = ((1 - yf) @ x) / (1 - yf).sum(-1)[:, None]
    return (pos - neg).abs().topk(k, dim=-1).indices


def probe_activations(
    model: Any,
    prompts: Prompts,
    hooks: list[str],
    *,
    positions: PositionChoice | Bool[Tensor, "batch pos"] = "last",
    attention_mask: Int[Tensor, "batch pos"] | None = None,
    batch_size: int = 32,
) -> dict[str, Float[Tensor, "row ..."]]:
    """The rows ``train_probes`` reads: each hook's activation at the chosen positions.

    ``positions="last"`` (the default) gives one row per prompt, its last real
    token; see ``mitk.analysis.readout.read_activations``.
    """
    return read_activations(
        model,
        prompts,
        hooks,
        positions=positions,
        attention_mask=attention_mask,
        batch_size=batch_size,
    )
