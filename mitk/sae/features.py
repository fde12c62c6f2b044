"""What each SAE latent does: firing statistics, top-activating examples, effects on logits.

``latent_statistics`` streams over a token set and keeps, per latent, running
sums and a running top-k of its activations (merged batch by batch), so memory
stays ``O(d_sae * top_k * window)`` however many tokens pass; the full
``[n_tokens, d_sae]`` activation matrix never exists.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch
from torch import Tensor
import torch.nn.functional as F

from mitk.errors import ConfigError, ShapeMismatchError
from mitk.hooks import HookPoint, layer_of
from mitk.model import HookedTransformer
from mitk.model.norms import LayerNorm, RMSNorm
from mitk.sae.autoencoder import SparseAutoencoder
from mitk.sae.splice import as_sae_input, resolve_hook_name
from mitk.shapes import Bool, Float, Int

_RESIDUAL_HOOKS = ("hook_embed", "hook_pos_embed", "hook_resid_pre", "hook_resid_mid",
                   "hook_resid_post", "hook_attn_out", "hook_mlp_out")  # fmt: skip


@dataclass(frozen=True)
class LatentExamples:
    """One latent's top-activating examples with the tokens and activations around each.

    Row ``e`` is the example at ``(sequences[e], positions[e])``; column ``j`` of the
    windows is position ``positions[e] + offsets[j]``. Outside the sequence the
    token is -1 (string ``""``) and the activation 0.
    """

    latent: int
    activations: Float[Tensor, " example"]
    sequences: Int[Tensor, " example"]
    positions: Int[Tensor, " example"]
    offsets: Int[Tensor, " window"]
    window_tokens: Int[Tensor, "example window"]
    window_activations: Float[Tensor, "example window"]
    str_tokens: list[list[str]] | None = None
    """Decoded ``window_tokens`` when the model has a tokenizer."""

    def to_frame(self) -> pd.DataFrame:
        """Long table: one row per (example, offset) with token and activation."""
        n_examples, n_window = self.window_tokens.shape
        strings = self.str_tokens or [[""] * n_window for _ in range(n_examples)]
        return pd.DataFrame({
            "latent": [self.latent] * (n_examples * n_window),
            "example": [e for e in range(n_examples) for _ in range(n_window)],
            "sequence": self.sequences.repeat_interleave(n_window).tolist(),
            "offset": self.offsets.repeat(n_examples).tolist(),
            "position": (self.positions[:, None] + self.offsets).reshape(-1).tolist(),
            "token": self.window_tokens.reshape(-1).tolist(),
            "str_token": [s for row in strings for s in row],
            "activation": self.window_activations.reshape(-1).tolist(),
        })  # fmt: skip


@dataclass(frozen=True)
class LatentStatistics:
    """Per-latent statistics of an SAE over ``n_tokens`` real tokens.

    ``frequency`` is the fraction of tokens a latent was non-zero on;
    ``mean_when_active`` averages its non-zero values (NaN if it never fired);
    ``max_activation`` is 0 for a latent that never fired. ``top_*`` are
    ``[d_sae, top_k]``, best first, over positive activations only; slots a
    latent did not fill hold sequence and position -1 and activation 0.
    ``top_windows`` holds each example's activations from ``context_before``
    tokens before to ``context_after`` after.
    """

    hook_name: str
    n_tokens: int
    frequency: Float[Tensor, " d_sae"]
    mean_when_active: Float[Tensor, " d_sae"]
    max_activation: Float[Tensor, " d_sae"]
    top_activations: Float[Tensor, "d_sae k"]
    top_sequences: Int[Tensor, "d_sae k"]
    top_positions: Int[Tensor, "d_sae k"]
    top_windows: Float[Tensor, "d_sae k window"]
    context_before: int
    context_after: int
    tokens: Int[Tensor, "n pos"]
    tokenizer: Any = None

    def examples(
        self, latent: int, before: int | None = None, after: int | None = None
    ) -> LatentExamples:
        """``latent``'s top examples with ``before``/``after`` tokens of context (default: all).

        The activations were kept at ``latent_statistics`` time, so a wider window
        than ``context_before``/``context_after`` raises ``ConfigError``.
        """
        d_sae = self.frequency.shape[0]
        if not 0 <= latent < d_sae:
            raise ConfigError(f"latent={latent} is outside [0, {d_sae})")
        before = self.context_before if before is None else before
        after = self.context_after if after is None else after
        if not (0 <= before <= self.context_before and 0 <= after <= self.context_after):
            raise ConfigError(
                f"asked for {before} tokens before and {after} after; the statistics kept "
                f"{self.context_before} and {self.context_after} (rerun latent_statistics "
                "with a wider context)"
            )
        filled = self.top_sequences[latent] >= 0
        sequences, positions = (
            self.top_sequences[latent][filled],
            self.top_positions[latent][filled],
        )
        columns = slice(self.context_before - before, self.context_before + after + 1)
        offsets = torch.arange(-before, after + 1)
        where = positions[:, None] + offsets
        inside = (where >= 0) & (where < self.tokens.shape[1])
        window_tokens = self.tokens[sequences[:, None], where.clamp(0, self.tokens.shape[1] - 1)]
        window_tokens = window_tokens.masked_fill(~inside, -1)
        return LatentExamples(
            latent=latent,
            activations=self.top_activations[latent][filled],
            sequences=sequences,
            positions=positions,
            offsets=offsets,
            window_tokens=window_tokens,
            window_activations=self.top_windows[latent][filled][:, columns],
            str_tokens=_decode(self.tokenizer, window_tokens),
        )

    def to_frame(self) -> pd.DataFrame:
        """Long table: one row per latent with its frequency, mean, max and example count."""
        return pd.DataFrame({
            "hook_name": self.hook_name,
            "latent": range(self.frequency.shape[0]),
            "frequency": self.frequency.tolist(),
            "mean_when_active": self.mean_when_active.tolist(),
            "max_activation": self.max_activation.tolist(),
            "n_examples": (self.top_sequences >= 0).sum(1).tolist(),
        })  # fmt: skip

    def top_frame(self) -> pd.DataFrame:
        """Long table: one row per filled (latent, rank) with sequence, position, activation."""
        latent, rank = torch.nonzero(self.top_sequences >= 0, as_tuple=True)
        return pd.DataFrame({
            "latent": latent.tolist(),
            "rank": rank.tolist(),
            "sequence": self.top_sequences[latent, rank].tolist(),
            "position": self.top_positions[latent, rank].tolist(),
            "activation": self.top_activations[latent, rank].tolist(),
        })  # fmt: skip


class _RunningTopK:
    """Each latent's ``k`` largest positive activations so far, with their context windows."""

    def __init__(self, d_sae: int, k: int, before: int, after: int, like: Tensor) -> None:
        self.k, self.before, self.after = k, before, after
        width = before + 1 + after
        self.values = torch.full((k, d_sae), -torch.inf, dtype=like.dtype, device=like.device)
        self.sequences = torch.full((k, d_sae), -1, dtype=torch.long, device=like.device)
        self.positions = torch.full_like(self.sequences, -1)
        self.windows = like.new_zeros(k, d_sae, width)

    def add(self, latents: Tensor, first_sequence: int) -> None:
        """Merge a batch ``[batch, pos, d_sae]`` whose row 0 is sequence ``first_sequence``."""
        n_pos, d_sae = latents.shape[1:]
        flat = latents.reshape(-1, d_sae)
        # only this batch's own top k can enter the running top k
        values, rows = flat.topk(min(self.k, flat.shape[0]), dim=0)
        values = values.masked_fill(values <= 0, -torch.inf)
        in_batch = torch.div(rows, n_pos, rounding_mode="floor")
        positions = rows - in_batch * n_pos
        padded = F.pad(latents, (0, 0, self.before, self.after))
        windows = padded.unfold(1, self.before + 1 + self.after, 1)  # [seq, pos, d_sae, window]
        latent_ids = torch.arange(d_sae, device=latents.device).expand_as(rows)
        merged_values = torch.cat([self.values, values])
        best = merged_values.topk(self.k, dim=0).indices
        self.values = merged_values.gather(0, best)
        self.sequences = torch.cat([self.sequences, in_batch + first_sequence]).gather(0, best)
        self.positions = torch.cat([self.positions, positions]).gather(0, best)
        candidates = windows[in_batch, positions, latent_ids]
        merged_windows = torch.cat([self.windows, candidates])
        self.windows = merged_windows.gather(0, best[..., None].expand(-1, -1, windows.shape[-1]))

    def result(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(values, sequences, positions, windows) as ``[d_sae, k, ...]``, empty slots blanked."""
        empty = torch.isinf(self.values)
        values = self.values.masked_fill(empty, 0.0)
        sequences = self.sequences.masked_fill(empty, -1)
        positions = self.positions.masked_fill(empty, -1)
        windows = self.windows.masked_fill(empty[..., None], 0.0)
        return values.T.cpu(), sequences.T.cpu(), positions.T.cpu(), windows.transpose(0, 1).cpu()


@torch.no_grad()
def latent_statistics(
    sae: SparseAutoencoder,
    model: HookedTransformer,
    tokens: Int[Tensor, "batch pos"],
    hook_name: str | None = None,
    *,
    top_k: int = 20,
    sequences_per_batch: int = 8,
    attention_mask: Int[Tensor, "batch pos"] | Bool[Tensor, "batch pos"] | None = None,
    context_before: int = 8,
    context_after: int = 4,
) -> LatentStatistics:
    """Firing frequency, mean and max activation and top-``top_k`` examples of every latent.

    Runs ``model`` (up to the hook's block only) on ``tokens``, ``sequences_per_batch``
    sequences at a time; positions where ``attention_mask`` is 0 are left out. The
    hook's activation must flatten to ``[batch, pos, d_in]`` (``as_sae_input``), since
    examples are (sequence, position) pairs. Results live on the CPU.
    """
    name = resolve_hook_name(sae, model, hook_name)
    for what, value in (("top_k", top_k), ("sequences_per_batch", sequences_per_batch)):
        if value <= 0:
            raise ConfigError(f"{what} must be positive, got {value}")
    if context_before < 0 or context_after < 0:
        raise ConfigError("context_before and context_after must be >= 0")
    d_sae, device = sae.cfg.d_sae, model.W_E.device
    dtype = torch.promote_types(sae.W_enc.dtype, torch.float32)  # keep top-k values precise
    fires = torch.zeros(d_sae, dtype=torch.long, device=sae.W_enc.device)
    sums = torch.zeros(d_sae, dtype=torch.float64, device=sae.W_enc.device)
    maxima = torch.zeros(d_sae, dtype=dtype, device=sae.W_enc.device)
    running = _RunningTopK(d_sae, top_k, context_before, context_after, maxima)
    n_tokens = 0
    for start in range(0, tokens.shape[0], sequences_per_batch):
        part = slice(start, start + sequences_per_batch)
        batch = tokens[part].to(device)
        mask = None if attention_mask is None else attention_mask[part].to(device)
        rows = as_sae_input(_hook_activation(model, name, batch, mask), sae.cfg.d_in, name)
        if rows.ndim != 3:
            raise ShapeMismatchError(
                f"latent_statistics needs {name!r} as [batch, pos, d_in]; with d_in="
                f"{sae.cfg.d_in} it flattens to {tuple(rows.shape)}"
            )
        latents = sae.encode(rows.to(sae.W_enc.device, sae.W_enc.dtype)).to(dtype)
        if mask is not None:
            real = mask.to(latents.device).bool()
            latents = latents * real[..., None]  # padding neither fires nor becomes an example
            n_tokens += int(real.sum())
        else:
            n_tokens += batch.numel()
        fires += (latents != 0).sum((0, 1))
        sums += latents.double().sum((0, 1))
        maxima = torch.maximum(maxima, latents.amax((0, 1)))
        running.add(latents, start)
    values, sequences, positions, windows = running.result()
    counts = fires.cpu().double()
    return LatentStatistics(
        hook_name=name,
        n_tokens=n_tokens,
        frequency=counts / max(n_tokens, 1),
        mean_when_active=sums.cpu() / counts,  # 0 / 0 = NaN for latents that never fired
        max_activation=maxima.cpu(),
        top_activations=values,
        top_sequences=sequences,
        top_positions=positions,
        top_windows=windows,
        context_before=context_before,
        context_after=context_after,
        tokens=tokens.cpu(),
        tokenizer=model.tokenizer,
    )


def _hook_activation(
    model: HookedTransformer, hook_name: str, tokens: Tensor, mask: Tensor | None
) -> Tensor:
    """The activation at ``hook_name``, running only as many blocks as it takes."""
    captured: list[Tensor] = []

    def keep(activation: Tensor, point: HookPoint) -> None:
        captured.append(activation)

    layer = layer_of(hook_name)
    stop = None if hook_name.startswith("ln_final.") else 0 if layer is None else layer + 1
    model.run_with_hooks(tokens, mask, fwd_hooks=[(hook_name, keep)], stop_at_layer=stop)
    return captured[-1]


def _decode(tokenizer: Any, ids: Tensor) -> list[list[str]] | None:
    if tokenizer is None:
        return None
    return [[tokenizer.decode([i]) if i >= 0 else "" for i in row] for row in ids.tolist()]


@dataclass(frozen=True)
class LogitEffects:
    """A latent's direct effect on the logits: its decoder row through the unembedding.

    ``effects [d_vocab]`` is the logit change per unit of latent activation
    (unembedding bias excluded); ``top_*``/``bottom_*`` are its ``k`` largest and
    smallest entries, most extreme first.
    """

    latent: int
    effects: Float[Tensor, " d_vocab"]
    top_tokens: Int[Tensor, " k"]
    top_values: Float[Tensor, " k"]
    bottom_tokens: Int[Tensor, " k"]
    bottom_values: Float[Tensor, " k"]
    top_str_tokens: list[str] | None = None
    bottom_str_tokens: list[str] | None = None

    def to_frame(self) -> pd.DataFrame:
        """Long table: one row per (side, rank) with token id, string and effect."""
        k = self.top_tokens.shape[0]
        top_str = self.top_str_tokens or [""] * k
        bottom_str = self.bottom_str_tokens or [""] * k
        return pd.DataFrame({
            "latent": self.latent,
            "side": ["top"] * k + ["bottom"] * k,
            "rank": [*range(k), *range(k)],
            "token": self.top_tokens.tolist() + self.bottom_tokens.tolist(),
            "str_token": [*top_str, *bottom_str],
            "effect": self.top_values.tolist() + self.bottom_values.tolist(),
        })  # fmt: skip


@torch.no_grad()
def logit_effects(
    sae: SparseAutoencoder,
    model: HookedTransformer,
    latent: int,
    k: int = 10,
    *,
    through_final_norm: bool = True,
) -> LogitEffects:
    """Tokens whose logits ``latent``'s decoder direction raises and lowers most.

    ``W_dec[latent] @ W_U``; with ``through_final_norm`` the direction first goes
    through the final norm's linear part (centred for LayerNorm, times its weight),
    ignoring the input-dependent scale. Only for SAEs on the residual stream:
    another hook raises ``ConfigError``, a width other than ``d_model``
    ``ShapeMismatchError``.
    """
    hook = sae.cfg.hook_name
    if hook and hook.rsplit(".", 1)[-1] not in _RESIDUAL_HOOKS:
        raise ConfigError(
            f"logit effects need an SAE on the residual stream ({', '.join(_RESIDUAL_HOOKS)}); "
            f"this one reads {hook!r}"
        )
    if sae.cfg.d_in != model.cfg.d_model:
        raise ShapeMismatchError(
            f"logit effects need d_in == d_model; the SAE has d_in={sae.cfg.d_in}, the model "
            f"d_model={model.cfg.d_model}"
        )
    if not 0 <= latent < sae.cfg.d_sae:
        raise ConfigError(f"latent={latent} is outside [0, {sae.cfg.d_sae})")
    W_U = model.W_U
    direction = sae.W_dec[latent].to(W_U.device, W_U.dtype)
    if through_final_norm:
        if model.cfg.normalization == "layernorm":
            direction = direction - direction.mean()
        if not isinstance(model.ln_final, (LayerNorm, RMSNorm)):
            raise ConfigError("through_final_norm=True, but this model has no final norm")
        direction = direction * model.ln_final.w
    effects = (direction @ W_U).float().cpu()
    k = min(k, effects.shape[0])
    top, bottom = effects.topk(k), effects.topk(k, largest=False)
    decoded = _decode(model.tokenizer, torch.stack([top.indices, bottom.indices]))
    return LogitEffects(
        latent=latent,
        effects=effects,
        top_tokens=top.indices,
        top_values=top.values,
        bottom_tokens=bottom.indices,
        bottom_values=bottom.values,
        top_str_tokens=None if decoded is None else decoded[0],
        bottom_str_tokens=None if decoded is None else decoded[1],
    )
