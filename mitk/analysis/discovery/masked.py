"""The masked run: the model with each edge kept (1), ablated (0) or anything in between.

Every receiver's input is the residual stream it would read, less what the
ablated part of each edge into it would have changed::

    input_r = stream_r - sum_s (1 - keep[s, r]) * (out_s - ablated_s)

where ``out_s`` is sender ``s``'s output in this very run (it already sees the
upstream ablations) and ``ablated_s`` its ablated value. Queries, keys and
values are recomputed per head from each head's own input (through the
block's ``ln1`` and the head's ``W_Q``/``W_K``/``W_V`` at ``hook_q``/``hook_k``/
``hook_v``); an MLP's input replaces the stream it reads and the block's
output is corrected so the residual stream itself is untouched; the logits
read the last ``resid_post`` so changed. Everything after those hooks (q/k
norms, rotary, the attention itself, the unembedding) is the model's own code.

Many masks run at once, stacked along the batch (one forward per ablation
setting, never one per edge), and ``keep`` may carry gradients: edge
attribution, integrated gradients and learned masks are all derivatives or
optimisations of this one function.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Literal

import torch
from torch import Tensor

from mitk.analysis.discovery.graph import EdgeGraph
from mitk.analysis.discovery.masked_hooks import MaskHooks, SenderLayout
from mitk.analysis.patching.engine import bytes_per_token, metric_fn
from mitk.analysis.patching.kl import NextTokenReference
from mitk.analysis.patching.metrics import PositionMetric
from mitk.hooks import name
from mitk.shapes import Float, Int

Ablation = Literal["mean", "resample", "zero"]
Group = tuple[int, str]
"""A block's receivers of one kind: ``(layer, "q" | "k" | "v" | "mlp" | "logits")``."""
ABLATIONS: tuple[str, ...] = ("mean", "resample", "zero")


@dataclass(frozen=True)
class Prompts:
    """The prompts a circuit is scored on.

    ``corrupted`` (same shape as ``clean``) supplies resample ablations and
    mean ablations' reference; without it, ``"resample"`` takes each clean
    prompt's neighbour (the batch rolled by one) and ``"mean"`` averages the
    clean prompts. ``attention_mask`` is shared by both.
    """

    clean: Int[Tensor, "batch pos"]
    corrupted: Int[Tensor, "batch pos"] | None = None
    attention_mask: Int[Tensor, "batch pos"] | None = None

    def __post_init__(self) -> None:
        for what in ("corrupted", "attention_mask"):
            other = getattr(self, what)
            if other is not None and other.shape != self.clean.shape:
                raise ValueError(
                    f"{what} {tuple(other.shape)} must match clean {tuple(self.clean.shape)}"
                )


def as_prompts(data: Any) -> Prompts:
    """``Prompts``, a clean token tensor, or a ``(clean, corrupted)`` pair, as ``Prompts``."""
    if isinstance(data, Prompts):
        return data
    if isinstance(data, Tensor):
        return Prompts(data)
    if isinstance(data, tuple) and len(data) == 2:
        return Prompts(*data)
    raise TypeError("data must be Prompts, clean tokens, or a (clean, corrupted) pair of tensors")


def run_senders(
    model: Any, graph: EdgeGraph, tokens: Tensor, attention_mask: Tensor | None
) -> tuple[
    Float[Tensor, "sender batch pos d_model"],
    Float[Tensor, "batch pos d_vocab"],
    Float[Tensor, "layer batch pos d_model"],
]:
    """Every head-level sender's write into the residual stream on a plain run, its logits,
    and the residual stream entering each block."""
    shape = graph.shape
    resid_names = [name("resid_pre", L) for L in range(shape.n_layers)]
    names = resid_names + [name("z", L) for L in range(shape.n_layers)]
    names += [name("mlp_out", L) for L in range(shape.n_layers)] if shape.has_mlp else []
    with torch.no_grad():
        logits, cache = model.run_with_cache(
            tokens, attention_mask=attention_mask, names_filter=names
        )
        out = [cache[resid_names[0]][None]]
        for L in range(shape.n_layers):
            W_O = model.blocks[L].attn.W_O
            out.append(torch.einsum("bphd,hdm->hbpm", cache[name("z", L)], W_O))
            if shape.has_mlp:
                out.append(cache[name("mlp_out", L)][None])
        return torch.cat(out), logits, torch.stack([cache[n] for n in resid_names])


def sender_outputs(
    model: Any, graph: EdgeGraph, tokens: Tensor, attention_mask: Tensor | None
) -> Float[Tensor, "sender batch pos d_model"]:
    """Every head-level sender's write into the residual stream on a plain run of ``tokens``."""
    return run_senders(model, graph, tokens, attention_mask)[0]


def ablated_outputs(
    model: Any, graph: EdgeGraph, prompts: Prompts, ablation: Ablation
) -> Float[Tensor, "sender batch_or_1 pos d_model"]:
    """What each sender writes when ablated: zeros, the reference mean, or resampled prompts."""
    if ablation not in ABLATIONS:
        raise ValueError(f"ablation must be one of {ABLATIONS}, got {ablation!r}")
    mask = prompts.attention_mask
    if ablation == "resample":
        if prompts.corrupted is not None:
            return sender_outputs(model, graph, prompts.corrupted, mask)
        if prompts.clean.shape[0] < 2:
            raise ValueError(
                "resample ablation without corrupted prompts needs a batch of 2 or more"
            )
        rolled = prompts.clean.roll(1, 0)
        return sender_outputs(model, graph, rolled, None if mask is None else mask.roll(1, 0))
    reference = prompts.corrupted if prompts.corrupted is not None else prompts.clean
    outputs = sender_outputs(model, graph, reference, mask)
    return outputs.mean(1, keepdim=True) if ablation == "mean" else torch.zeros_like(outputs[:, :1])


class MaskedRun:
    """A model, prompts, metric and ablation, ready to score any number of edge masks.

    ``metric`` is a ready-made metric (``mitk.analysis.patching.metrics``) or
    a callable from logits ``[batch, pos, d_vocab]`` to ``[batch]``.
    ``full`` and ``empty`` are the metric per prompt with every edge kept and
    with every edge ablated; ``clean_outputs`` every sender's clean write.

    ``reuse_clean_prefix``: a run whose masks ablate nothing below layer L
    (ACDC at a receiver of layer L) starts at block L from the clean residual
    stream, with the clean sender outputs below it; the result is the same
    as running every block. False runs every block (the published algorithms'
    cost, for benchmarks).
    """

    def __init__(
        self,
        model: Any,
        graph: EdgeGraph,
        data: Any,
        metric: Any,
        ablation: Ablation = "mean",
        *,
        reuse_clean_prefix: bool = True,
    ) -> None:
        self.model, self.graph = model, graph.fine
        self.prompts = as_prompts(data)
        device = model.W_E.device
        clean = self.prompts.clean.to(device)
        self.tokens = clean
        self.mask = (
            None if self.prompts.attention_mask is None else self.prompts.attention_mask.to(device)
        )
        self.batch, self.seq = clean.shape
        self.fn, self.answer_pos = metric_fn(metric, self.batch, self.seq)
        self.ablation, self.reuse_clean_prefix = ablation, reuse_clean_prefix
        corrupted = self.prompts.corrupted
        source = Prompts(clean, None if corrupted is None else corrupted.to(device), self.mask)
        self.ablated = ablated_outputs(model, self.graph, source, ablation)
        self._layouts: dict[bool, SenderLayout] = {}
        self.clean_outputs, logits, self.clean_resid = run_senders(
            model, self.graph, clean, self.mask
        )
        with torch.no_grad():
            picked = self._at_answer(logits)
            if isinstance(metric, PositionMetric):
                metric.prepare(picked)
            self.clean_next = NextTokenReference(picked)
            self.full = self.fn(picked).detach()

    @cached_property
    def empty(self) -> Float[Tensor, " batch"]:
        """The metric per prompt with every edge ablated."""
        with torch.no_grad():
            return self.metric(self.keep_all(0.0))[0]

    @cached_property
    def clean_deltas(self) -> Float[Tensor, "sender batch pos d_model"]:
        """``out_s - ablated_s`` of every sender on the clean run."""
        return self.clean_outputs - self.ablated

    def sender_layout(self, per_head: bool) -> SenderLayout:
        """How hooks record sender writes: every head apart, or each layer's heads as one."""
        if per_head not in self._layouts:
            self._layouts[per_head] = SenderLayout.of(self, per_head)
        return self._layouts[per_head]

    @cached_property
    def receiver_groups(self) -> dict[Group, list[int]]:
        """The fine receivers' indices by group, in the order the forward reaches them."""
        groups: dict[Group, list[int]] = {}
        for r, node in enumerate(self.graph.fine_receivers):
            groups.setdefault((node.layer, node.kind), []).append(r)
        return groups

    @cached_property
    def _receiver_layers(self) -> Tensor:
        layers = [node.layer for node in self.graph.fine_receivers]
        return torch.tensor(layers, device=self.tokens.device)

    def first_changed_layer(self, keep: Tensor) -> int:
        """The lowest block whose input any mask in ``keep`` changes (0 when unsure).

        Edges the graph does not have are ignored (their senders come later).
        """
        if not self.reuse_clean_prefix or keep.requires_grad:
            return 0
        last = self.graph.shape.n_layers - 1  # the logits' receiver is read after it
        present = self.graph.present.to(keep.device)
        touched = ((keep < 1) & present).flatten(0, -2).any(0)  # per receiver
        if not bool(touched.any()):
            return last
        return min(int(self._receiver_layers[touched].min()), last)

    # --- masks -------------------------------------------------------------------------
    def keep_all(self, value: float, variants: int = 1) -> Float[Tensor, "variant sender receiver"]:
        """A mask keeping every edge with weight ``value`` (1: the clean run, 0: all ablated)."""
        return torch.full((variants, *self.graph.present.shape), value, device=self.tokens.device)

    # --- runs --------------------------------------------------------------------------
    def _at_answer(self, logits_or_hidden: Tensor) -> Tensor:
        if self.answer_pos is None:
            return logits_or_hidden
        rows = torch.arange(logits_or_hidden.shape[0], device=logits_or_hidden.device)
        pos = self.answer_pos.to(logits_or_hidden.device).repeat(
            logits_or_hidden.shape[0] // self.batch
        )
        return logits_or_hidden[rows, pos]

    def logits(
        self,
        keep: Float[Tensor, "variant *seq sender receiver"],
        embed_alpha: Float[Tensor, " variant"] | None = None,
        probe: dict[Group, Float[Tensor, "variant_batch seq group_receiver d_model"]] | None = None,
    ) -> Float[Tensor, "variant batch *answer d_vocab"]:
        """Logits of each mask's run (at the metric's answer positions when it has them).

        ``embed_alpha`` moves the embeddings from their ablated value (0) to
        the clean one (1) per variant; ``probe[group]`` is added to the inputs of
        that group's receivers (``receiver_groups``), so its gradient is theirs.
        One tensor per group: indexing one large probe per group would make
        autograd zero-fill a probe-sized gradient for every group.
        """
        n = keep.shape[0]
        changes_inputs = embed_alpha is not None or probe is not None
        start = 0 if changes_inputs else self.first_changed_layer(keep)
        hooks = MaskHooks(self, keep, embed_alpha, probe, start).specs()
        mask = None if self.mask is None else self.mask.repeat(n, 1)
        start_at = {} if start == 0 else {"start_at_layer": start}
        stream = self.tokens if start == 0 else self.clean_resid[start]
        with self.model.hooks(fwd_hooks=hooks):
            hidden = self.model(
                stream.repeat(n, *[1] * (stream.dim() - 1)),
                attention_mask=mask,
                return_type="hidden",
                **start_at,
            )
        picked = self._at_answer(hidden)  # [rows, d_model] at the answers, else [rows, pos, ...]
        # the unembedding takes [batch, pos, d_model]: answer rows get a length-1 position axis
        logits = (
            self.model.unembed(picked[:, None])[:, 0]
            if picked.dim() == 2
            else self.model.unembed(picked)
        )
        return logits.view(n, self.batch, *logits.shape[1:])

    def metric(
        self, keep: Float[Tensor, "variant *seq sender receiver"], **kw: Any
    ) -> Float[Tensor, "variant batch"]:
        """The metric per mask and prompt (``kw`` as for ``logits``)."""
        return torch.stack([self.fn(lg) for lg in self.logits(keep, **kw)])

    def kl(
        self, keep: Float[Tensor, "variant *seq sender receiver"]
    ) -> Float[Tensor, "variant batch"]:
        """KL(full model || masked run) per mask and prompt, at the answer positions or averaged."""
        kl = self.clean_next.kl(self.logits(keep))
        if self.answer_pos is not None:
            return kl
        if self.mask is None:
            return kl.mean(-1)
        valid = self.mask.to(kl)
        return (kl * valid).sum(-1) / valid.sum(-1).clamp(min=1)

    def variants_per_forward(self, memory_budget_gb: float) -> int:
        """How many masks one forward holds under ``memory_budget_gb`` (a rough fp32 estimate)."""
        cfg, senders = self.model.cfg, self.graph.present.shape[0]
        per_token = bytes_per_token(self.model, self.seq) + 4 * cfg.d_model * (
            senders + 3 * cfg.n_heads
        )
        per_variant = self.batch * self.seq * per_token
        return max(1, int(memory_budget_gb * 2**30 // per_variant))

    def chunked(
        self,
        score: Callable[[Tensor], Tensor],
        keep: Float[Tensor, "variant *seq sender receiver"],
        memory_budget_gb: float = 2.0,
    ) -> Float[Tensor, "variant batch"]:
        """``score(keep)`` (``metric`` or ``kl``) over chunks of masks, without gradients."""
        per = self.variants_per_forward(memory_budget_gb)
        with torch.no_grad():
            return torch.cat([score(keep[lo : lo + per]) for lo in range(0, keep.shape[0], per)])
