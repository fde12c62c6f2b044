"""Path patching (Wang et al. 2022): the effect of senders on receivers through direct paths only.

Denoising (the default) runs the corrupted prompts ("base") and takes the
senders' activations from the clean prompts ("source"); ``direction="noising"``
swaps the roles. Two runs make one path patch:

1. The *sender run* runs the base input with every head's ``hook_z`` and every
   ``hook_mlp_out`` frozen to the base run's value, except the senders' z,
   which take their source values. Its residual stream differs from the base
   run's only by the senders' direct writes.
2. With head receivers ``(layer, head, "q" | "k" | "v")``, the base input runs
   again, free, with each receiver's input channel replaced by its value in
   the sender run; the metric of that run is the result. With ``"logits"`` the
   sender run's own logits are the result: the senders' direct path to the
   unembedding (the final norm is recomputed on the changed residual stream,
   as in the IOI code).

Every position is patched. Under grouped-query attention a ``"k"``/``"v"``
receiver ``(layer, h, ...)`` patches key-value head ``h // (n_heads //
n_key_value_heads)``, which every query head of its group reads.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch
from torch import Tensor

from mitk.analysis.patching.engine import bytes_per_token
from mitk.analysis.patching.pair import Direction, check_patch_inputs, run_pair
from mitk.hooks import HookPoint, name
from mitk.shapes import Bool, Float, Int

CHANNELS: tuple[str, ...] = ("q", "k", "v")
Head = tuple[int, int]
Receiver = tuple[int, int, str]
Senders = tuple[Head, ...]


@dataclass(frozen=True)
class PathPatchResult:
    """Metric with each head alone as the sender, with the unpatched baselines.

    ``per_prompt`` is ``[batch, layer, head]``; ``values`` averages over
    prompts. Heads that cannot be senders (``eligible`` False: not in a layer
    before every receiver) hold the base run's metric, so they read as "no
    effect". ``clean``/``corrupted`` are the metric on the unpatched runs.
    """

    per_prompt: Float[Tensor, "batch layer head"]
    clean: Float[Tensor, " batch"]
    corrupted: Float[Tensor, " batch"]
    eligible: Bool[Tensor, "layer head"]
    receivers: str
    direction: str

    @property
    def values(self) -> Float[Tensor, "layer head"]:
        """Mean over prompt pairs of the path-patched metric."""
        return self.per_prompt.mean(0)

    def normalized(self) -> Float[Tensor, "layer head"]:
        """``(patched - corrupted) / (clean - corrupted)`` on prompt means; 1 = clean."""
        clean, corrupted = self.clean.mean(), self.corrupted.mean()
        return (self.values - corrupted) / (clean - corrupted)

    def to_frame(self) -> pd.DataFrame:
        """Long table: one row per (layer, head) sender with the raw and normalised value."""
        values, normalized = self.values.cpu(), self.normalized().cpu()
        layers, heads = torch.meshgrid(
            torch.arange(values.shape[0]), torch.arange(values.shape[1]), indexing="ij"
        )
        frame = pd.DataFrame(
            {"layer": layers.reshape(-1).tolist(), "head": heads.reshape(-1).tolist()}
        )
        frame["value"] = values.reshape(-1).tolist()
        frame["normalized"] = normalized.reshape(-1).tolist()
        frame["eligible"] = self.eligible.cpu().reshape(-1).tolist()
        frame["receivers"], frame["direction"] = self.receivers, self.direction
        return frame


@dataclass(frozen=True)
class _Runs:
    """The base and source runs' activations, and how to score a run."""

    base_z: dict[int, Tensor]  # [batch, pos, head, d_head]
    source_z: dict[int, Tensor]
    base_mlp: dict[int, Tensor]  # [batch, pos, d_model]; empty for attention-only models
    base_resid: dict[int, Tensor]  # resid_pre, [batch, pos, d_model]
    mask: Tensor | None
    answer_pos: Tensor | None
    metric: Callable[[Tensor], Tensor]
    base_metric: Tensor
    clean_metric: Tensor
    corrupt_metric: Tensor


def _check_head(model: Any, layer: int, head: int, what: str) -> None:
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    if not (0 <= layer < n_layers and 0 <= head < n_heads):
        raise ValueError(
            f"{what} ({layer}, {head}) is outside the model's {n_layers} layers x {n_heads} heads"
        )


def _checked_receivers(model: Any, receivers: Sequence[Receiver] | str) -> list[Receiver] | None:
    """The receivers as ``(layer, head, channel)`` triples, or None for ``"logits"``."""
    if isinstance(receivers, str):
        if receivers != "logits":
            raise ValueError(
                f"receivers must be 'logits' or (layer, head, channel) triples, got {receivers!r}"
            )
        return None
    out: list[tuple[Any, ...]] = [tuple(r) for r in receivers]
    if not out:
        raise ValueError("receivers is empty; pass (layer, head, channel) triples or 'logits'")
    for receiver in out:
        if len(receiver) != 3 or receiver[2] not in CHANNELS:
            raise ValueError(
                f"receiver {receiver!r} must be (layer, head, channel) with channel in {CHANNELS}"
            )
        _check_head(model, receiver[0], receiver[1], "receiver")
    return [(int(r[0]), int(r[1]), str(r[2])) for r in out]


def _checked_senders(
    model: Any, senders: Sequence[Head], receivers: list[Receiver] | None
) -> Senders:
    out = tuple((int(layer), int(head)) for layer, head in senders)
    if not out:
        raise ValueError("senders is empty; pass at least one (layer, head)")
    for layer, head in out:
        _check_head(model, layer, head, "sender")
    if receivers is not None:
        first = min(r[0] for r in receivers)
        late = [s for s in out if s[0] >= first]
        if late:
            raise ValueError(
                f"senders {late} are not before the earliest receiver layer {first}: a sender "
                "reaches a head receiver only from an earlier layer"
            )
    return out


def _prepare(
    model: Any, clean: Tensor, corrupted: Tensor, mask: Tensor | None, metric: Any, denoising: bool
) -> _Runs:
    """Cache both runs and evaluate the metric's baselines on them."""
    n_layers = model.cfg.n_layers
    names = [name(kind, layer) for kind in ("z", "resid_pre") for layer in range(n_layers)]
    if model.cfg.has_mlp:
        names += [name("mlp_out", layer) for layer in range(n_layers)]
    pair = run_pair(model, clean, corrupted, metric, names, mask)
    base, source = pair.base_and_source("denoising" if denoising else "noising")
    layers = range(n_layers)
    return _Runs(
        base_z={layer: base[name("z", layer)] for layer in layers},
        source_z={layer: source[name("z", layer)] for layer in layers},
        base_mlp={layer: base[name("mlp_out", layer)] for layer in layers}
        if model.cfg.has_mlp
        else {},
        base_resid={layer: base[name("resid_pre", layer)] for layer in layers},
        mask=mask,
        answer_pos=pair.answer_pos,
        metric=pair.fn,
        base_metric=pair.corrupt_metric if denoising else pair.clean_metric,
        clean_metric=pair.clean_metric,
        corrupt_metric=pair.corrupt_metric,
    )


def _score(model: Any, runs: _Runs, hidden: Tensor, n_variants: int) -> Tensor:
    """The metric of each variant's final (normed) residual stream: ``[variant, batch]``."""
    batch = runs.base_metric.shape[0]
    per_variant = hidden.view(n_variants, batch, *hidden.shape[1:])
    if runs.answer_pos is None:
        logits = model.unembed(hidden).view(n_variants, batch, hidden.shape[1], -1)
    else:
        rows = torch.arange(batch, device=hidden.device)
        logits = model.unembed(per_variant[:, rows, runs.answer_pos])  # [variant, batch, d_vocab]
    return torch.stack([runs.metric(lg) for lg in logits])


def _forward(
    model: Any, runs: _Runs, start: int, stop: int | None, n_variants: int, hooks: list[Any]
) -> Tensor:
    """``n_variants`` copies of the base run from block ``start`` to ``stop`` (None: final norm)."""
    x = runs.base_resid[start].repeat(n_variants, 1, 1)
    mask = None if runs.mask is None else runs.mask.repeat(n_variants, 1)
    with model.hooks(fwd_hooks=hooks):
        if stop is None:
            return model(x, attention_mask=mask, return_type="hidden", start_at_layer=start)
        return model(x, attention_mask=mask, start_at_layer=start, stop_at_layer=stop)


def _receiver_heads(model: Any, receivers: list[Receiver]) -> dict[tuple[int, str], list[int]]:
    """Hooked head indices to patch, per (layer, channel); k/v index key-value heads."""
    group = model.cfg.n_heads // model.cfg.n_key_value_heads
    heads: dict[tuple[int, str], list[int]] = defaultdict(list)
    for layer, head, channel in receivers:
        index = head if channel == "q" else head // group
        if index not in heads[(layer, channel)]:
            heads[(layer, channel)].append(index)
    return heads


def _run_chunk(
    model: Any, runs: _Runs, chunk: Sequence[Senders], receivers: list[Receiver] | None
) -> Tensor:
    """The path-patched metric of each sender set in ``chunk``: ``[variant, batch]``."""
    n, batch = len(chunk), runs.base_metric.shape[0]
    start = min(layer for senders in chunk for layer, _ in senders)
    stop = None if receivers is None else max(r[0] for r in receivers) + 1
    end = model.cfg.n_layers if stop is None else stop

    def freeze_z(layer: int) -> Callable[[Tensor, HookPoint], Tensor]:
        def hook(z: Tensor, point: HookPoint) -> Tensor:
            frozen = runs.base_z[layer].repeat(n, 1, 1, 1)
            rows = frozen.view(n, batch, *frozen.shape[1:])
            for v, senders in enumerate(chunk):
                heads = [h for s_layer, h in senders if s_layer == layer]
                if heads:
                    rows[v][:, :, heads] = runs.source_z[layer][:, :, heads]
            return frozen

        return hook

    def freeze_mlp(layer: int) -> Callable[[Tensor, HookPoint], Tensor]:
        return lambda out, point: runs.base_mlp[layer].repeat(n, 1, 1)

    sender_hooks: list[Any] = [(name("z", layer), freeze_z(layer)) for layer in range(start, end)]
    if runs.base_mlp:
        sender_hooks += [(name("mlp_out", layer), freeze_mlp(layer)) for layer in range(start, end)]
    if receivers is None:  # the sender run's own logits
        return _score(model, runs, _forward(model, runs, start, None, n, sender_hooks), n)

    targets = _receiver_heads(model, receivers)
    captured: dict[tuple[int, str], Tensor] = {}

    def capture(key: tuple[int, str]) -> Callable[[Tensor, HookPoint], None]:
        def hook(act: Tensor, point: HookPoint) -> None:
            captured[key] = act[:, :, targets[key]].clone()

        return hook

    def patch(key: tuple[int, str]) -> Callable[[Tensor, HookPoint], Tensor]:
        def hook(act: Tensor, point: HookPoint) -> Tensor:
            act = act.clone()
            act[:, :, targets[key]] = captured[key]
            return act

        return hook

    capture_hooks = [
        (name(channel, layer), capture((layer, channel))) for layer, channel in targets
    ]
    _forward(model, runs, start, stop, n, sender_hooks + capture_hooks)
    first = min(layer for layer, _ in targets)
    patch_hooks = [(name(channel, layer), patch((layer, channel))) for layer, channel in targets]
    return _score(model, runs, _forward(model, runs, first, None, n, patch_hooks), n)


def _evaluate(
    model: Any,
    runs: _Runs,
    variants: Sequence[Senders],
    receivers: list[Receiver] | None,
    per_chunk: int,
) -> Tensor:
    """Metric of every sender set, ``[variant, batch]``, ``per_chunk`` variants per forward."""
    with torch.no_grad():
        out = [
            _run_chunk(model, runs, variants[lo : lo + per_chunk], receivers)
            for lo in range(0, len(variants), per_chunk)
        ]
    return torch.cat(out) if out else runs.base_metric.new_zeros(0, runs.base_metric.shape[0])


def path_patch(
    model: Any,
    clean_tokens: Int[Tensor, "batch pos"],
    corrupted_tokens: Int[Tensor, "batch pos"],
    metric: Any,
    senders: Sequence[Head],
    receivers: Sequence[Receiver] | str,
    *,
    direction: Direction = "denoising",
    attention_mask: Int[Tensor, "batch pos"] | None = None,
) -> Float[Tensor, " batch"]:
    """The metric, per prompt, when ``senders`` act on ``receivers`` only through direct paths.

    ``senders``: ``(layer, head)`` pairs, patched jointly. ``receivers``:
    ``(layer, head, "q" | "k" | "v")`` triples, every sender in a layer before
    all of them, or ``"logits"``. ``metric`` is a ready-made metric
    (``mitk.analysis.patching.metrics``) or a callable from logits
    ``[batch, pos, d_vocab]`` to ``[batch]``. Clean and corrupted prompts must
    line up position by position; a shared ``attention_mask`` handles padding.
    """
    check_patch_inputs(clean_tokens, corrupted_tokens, attention_mask, direction)
    targets = _checked_receivers(model, receivers)
    chosen = _checked_senders(model, senders, targets)
    runs = _prepare(
        model, clean_tokens, corrupted_tokens, attention_mask, metric, direction == "denoising"
    )
    return _evaluate(model, runs, [chosen], targets, 1)[0].detach()


def path_patch_heads(
    model: Any,
    clean_tokens: Int[Tensor, "batch pos"],
    corrupted_tokens: Int[Tensor, "batch pos"],
    metric: Any,
    receivers: Sequence[Receiver] | str,
    *,
    direction: Direction = "denoising",
    attention_mask: Int[Tensor, "batch pos"] | None = None,
    batch_variants: bool = True,
    memory_budget_gb: float = 2.0,
) -> PathPatchResult:
    """Path-patch every head alone as the sender into ``receivers``; see ``path_patch``.

    Eligible senders are the heads of layers before the earliest receiver
    layer (every head for ``"logits"``); the others get the base run's metric.
    The sender variants run stacked along the batch axis, as many per forward
    as fit ``memory_budget_gb`` (a rough fp32 estimate); ``batch_variants=False``
    runs one variant per forward (same numbers, for checking).
    """
    check_patch_inputs(clean_tokens, corrupted_tokens, attention_mask, direction)
    targets = _checked_receivers(model, receivers)
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    last = n_layers if targets is None else min(r[0] for r in targets)
    runs = _prepare(
        model, clean_tokens, corrupted_tokens, attention_mask, metric, direction == "denoising"
    )
    variants: list[Senders] = [((layer, head),) for layer in range(last) for head in range(n_heads)]
    batch, seq = clean_tokens.shape
    per_token = bytes_per_token(model, seq) + (
        4 * model.cfg.d_vocab if runs.answer_pos is None else 0
    )
    per_chunk = max(1, int(memory_budget_gb * 2**30 // (batch * seq * per_token)))
    out = _evaluate(model, runs, variants, targets, per_chunk if batch_variants else 1)
    per_prompt = runs.base_metric[:, None, None].repeat(1, n_layers, n_heads)
    per_prompt[:, :last] = out.T.reshape(batch, last, n_heads)
    eligible = torch.zeros(n_layers, n_heads, dtype=torch.bool)
    eligible[:last] = True
    label = "logits" if targets is None else ",".join(f"L{la}H{h}.{c}" for la, h, c in targets)
    return PathPatchResult(
        per_prompt=per_prompt.detach(),
        clean=runs.clean_metric,
        corrupted=runs.corrupt_metric,
        eligible=eligible,
        receivers=label,
        direction=direction,
    )
