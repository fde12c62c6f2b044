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
from mitk.analysis.patching.engine import bytes_per_token, metric_fn
from mitk.analysis.patching.metrics import PositionMetric
from mitk.hooks import HookPoint, name
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


class _Deltas:
    """``out_s - ablated_s`` of the senders so far, in the order they write.

    Without gradients they are written as they arrive into one buffer laid out
    ``[variant, sender, batch * pos * d_model]``, so a group's removal sum is one batched
    matmul over a view (a growing concatenation copied all earlier senders again at every
    group of receivers, 15% of an ACDC run). With gradients the chunks are concatenated, as
    autograd cannot see through writes into a buffer that earlier receivers already read.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity, self.count = capacity, 0
        self.chunks: list[Tensor] = []
        self._stacked: Tensor | None = None
        self._buffer: Tensor | None = None

    def add(self, chunk: Float[Tensor, "sender variant batch pos d_model"]) -> None:
        n, variants = chunk.shape[:2]
        if not torch.is_grad_enabled():
            if self._buffer is None:
                self._bpm = chunk.shape[2:]
                self._buffer = chunk.new_empty((variants, self.capacity, chunk[0, 0].numel()))
            self._buffer[:, self.count : self.count + n] = chunk.flatten(2).transpose(0, 1)
        else:
            self.chunks.append(chunk)
            self._stacked = None
        self.count += n

    def contract(self, drop: Tensor, positional: bool) -> Float[Tensor, "variant b p n d_model"]:
        """``sum_s drop[v, (p,) s, n] * delta_s[v, b, p, m]`` over the senders so far."""
        if self._buffer is not None:
            deltas = self._buffer[:, : self.count]  # [V, S', B*P*M], each slab contiguous
            if not positional:
                out = torch.bmm(drop.transpose(1, 2).to(deltas.dtype), deltas)
                return out.view(out.shape[0], out.shape[1], *self._bpm).permute(0, 2, 3, 1, 4)
            shaped = deltas.view(*deltas.shape[:2], *self._bpm)
            return torch.einsum("vsbpm,vpsn->vbpnm", shaped, drop.to(deltas.dtype))
        if self._stacked is None:
            self._stacked = torch.cat(self.chunks)
        pattern = "svbpm,vpsn->vbpnm" if positional else "svbpm,vsn->vbpnm"
        return torch.einsum(pattern, self._stacked, drop.to(self._stacked.dtype))


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
        self.clean_outputs, logits, self.clean_resid = run_senders(
            model, self.graph, clean, self.mask
        )
        with torch.no_grad():
            picked = self._at_answer(logits)
            if isinstance(metric, PositionMetric):
                metric.prepare(picked)
            self.clean_log_probs = picked.float().log_softmax(-1)
            # probabilities below float32's normal range are 0 here: multiplying subnormal
            # numbers is about 100x slower on CPUs, and such terms add less than 1e-36 to a KL
            probs = self.clean_log_probs.exp()
            self.clean_probs = probs.masked_fill(probs < torch.finfo(probs.dtype).tiny, 0.0)
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
        hooks = _MaskHooks(self, keep, embed_alpha, probe, start).specs()
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
        log_probs = self.logits(keep).float().log_softmax(-1)
        clean = self.clean_log_probs
        kl = (self.clean_probs * (clean - log_probs)).sum(-1)
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


class _MaskHooks:
    """The forward hooks of one masked forward (state lives here, never on the model)."""

    def __init__(
        self,
        run: MaskedRun,
        keep: Tensor,
        alpha: Tensor | None,
        probe: dict[Group, Tensor] | None,
        start: int = 0,
    ) -> None:
        self.run, self.shape, self.start = run, run.graph.shape, start
        self.n = keep.shape[0]
        self.drop = 1.0 - keep.to(run.tokens.device, torch.float32)  # [V, (P,) S, R]
        self.positional = keep.dim() == 4
        # every edge kept without a gradient (EAP-IG on inputs): nothing is removed, so the
        # per-receiver sums over senders, a forward and a backward as large as the model's, go
        self.nothing_removed = not keep.requires_grad and not bool(self.drop.any())
        self.alpha, self.probe = alpha, probe
        self.keep_grad = keep.requires_grad
        self.stream: dict[int, Tensor] = {}
        self.offset: dict[int, Tensor] = {}
        self.qkv_inputs: dict[int, dict[str, Tensor]] = {}
        self.receivers = run.receiver_groups
        senders = run.graph.fine_senders
        self.sender_start = {(n.layer, n.kind): i for i, n in reversed(list(enumerate(senders)))}
        # below the first block run, every sender wrote what it wrote on the clean run
        self.n_clean = self.sender_start[(start, "head")] if start else 0
        self.deltas = _Deltas(len(senders) - self.n_clean)

    def specs(self) -> list[tuple[str, Callable[[Tensor, HookPoint], Tensor | None]]]:
        shape = self.shape
        specs: list[tuple[str, Callable[[Tensor, HookPoint], Tensor | None]]] = []
        last = shape.n_layers - 1
        for L in range(self.start, shape.n_layers):
            specs.append((name("resid_pre", L), self._resid_pre(L)))
            specs += [(name(c, L), self._qkv(L, c)) for c in ("q", "k", "v")]
            specs.append((name("z", L), self._z(L)))
            if shape.has_mlp:
                if not shape.parallel_attn_mlp:
                    specs.append((name("resid_mid", L), self._mlp_in(L)))
                specs.append((name("mlp_out", L), self._mlp_out(L)))
            if shape.has_mlp or last == L:
                specs.append((name("resid_post", L), self._resid_post(L)))
        return specs

    # --- the inputs of a group of receivers ---------------------------------------------
    def _receiver_input(self, group: Group, stream: Tensor) -> Tensor:
        """What ``group``'s receivers read, ``[V*B, pos, n, d_model]`` (or broadcastable to it):
        ``stream [V*B, pos, 1, d_model]`` less ``sum_s drop[s, r] * delta_s``, plus the probe."""
        return self._receiver_inputs([group], stream)[0]

    def _receiver_inputs(self, groups: list[Group], stream: Tensor) -> list[Tensor]:
        """``_receiver_input`` of groups that read the same stream, from one pass over the
        senders (a layer's q, k and v: the removal sums are bound by reading the deltas)."""
        probes = [None if self.probe is None else self.probe[g].to(stream.dtype) for g in groups]
        if self.nothing_removed:
            return [stream if p is None else stream + p for p in probes]
        columns = [self._columns(g) for g in groups]
        receivers = [r for group in columns for r in group]
        s0, removed = self.n_clean, torch.zeros((), device=stream.device)
        if self.deltas.count:
            drop = self.drop[..., s0 : s0 + self.deltas.count, receivers]
            removed = self.deltas.contract(drop, self.positional)
        if s0:  # senders below the first block run, the same in every variant
            pattern = "sbpm,vpsn->vbpnm" if self.positional else "sbpm,vsn->vbpnm"
            clean = self.run.clean_deltas[:s0]
            drop = self.drop[..., :s0, receivers].to(clean.dtype)
            removed = removed + torch.einsum(pattern, clean, drop)
        parts = removed.flatten(0, 1).to(stream.dtype).split([len(c) for c in columns], dim=2)
        inputs = [stream - part for part in parts]
        return [x if p is None else x + p for x, p in zip(inputs, probes, strict=True)]

    def _columns(self, group: Group) -> list[int]:
        """The receivers of ``group`` whose inputs differ: one when a mask treats all alike."""
        receivers = self.receivers[group]
        if self.probe is None and not self.keep_grad and len(receivers) > 1:
            columns = self.drop[..., receivers]
            if bool((columns == columns[..., :1]).all()):  # e.g. every head of a layer edge
                return receivers[:1]  # one input serves them all: [V*B, pos, 1, d_model]
        return receivers

    def _add_delta(self, out: Tensor, index: int) -> None:
        """Record senders ``index..`` given their outputs ``[n, V*B, pos, m]``."""
        if self.nothing_removed:
            return
        n = out.shape[0]
        ablated = self.run.ablated[index : index + n, None]  # [n, 1, B|1, P, M]
        per_variant = out.view(n, self.n, -1, *out.shape[2:])
        self.deltas.add(per_variant - ablated.to(out.dtype))

    # --- hooks -------------------------------------------------------------------------
    def _resid_pre(self, L: int) -> Callable[[Tensor, HookPoint], Tensor]:
        def hook(resid: Tensor, point: HookPoint) -> Tensor:
            if L == 0:
                if self.alpha is not None:  # interpolate the embeddings from ablated to clean
                    ablated = self.run.ablated[0].to(resid.dtype)
                    shaped = resid.view(self.n, -1, *resid.shape[1:])
                    alpha = self.alpha.to(resid)[:, None, None, None]
                    resid = (ablated + alpha * (shaped - ablated)).flatten(0, 1)
                self._add_delta(resid[None], 0)
            self.stream[L] = resid
            if self.shape.has_mlp and self.shape.parallel_attn_mlp:
                return self._mlp_input(L, resid)
            return resid

        return hook

    def _qkv(self, L: int, channel: str) -> Callable[[Tensor, HookPoint], Tensor]:
        def hook(act: Tensor, point: HookPoint) -> Tensor:
            if self.nothing_removed and self.probe is None:
                return act  # the model's own q/k/v are the answer
            block = self.run.model.blocks[L]
            if L not in self.qkv_inputs:  # all three at the first of them: one pass
                stream = self.stream[L][:, :, None, :]
                inputs = self._receiver_inputs([(L, c) for c in "qkv"], stream)
                self.qkv_inputs[L] = dict(zip("qkv", inputs, strict=True))
            x = self.qkv_inputs[L].pop(channel)
            W = {"q": block.attn.W_Q, "k": block.attn.W_K, "v": block.attn.W_V}[channel]
            b = {"q": block.attn.b_Q, "k": block.attn.b_K, "v": block.attn.b_V}[channel]
            if x.shape[2] == 1:  # one input for every head
                return (torch.einsum("bpm,hmd->bphd", block.ln1(x[:, :, 0]), W) + b).to(act.dtype)
            return (torch.einsum("bphm,hmd->bphd", block.ln1(x), W) + b).to(act.dtype)

        return hook

    def _z(self, L: int) -> Callable[[Tensor, HookPoint], None]:
        def hook(z: Tensor, point: HookPoint) -> None:
            writes = torch.einsum("bphd,hdm->hbpm", z, self.run.model.blocks[L].attn.W_O)
            self._add_delta(writes, self.sender_start[(L, "head")])

        return hook

    def _mlp_input(self, L: int, stream: Tensor) -> Tensor:
        x = self._receiver_input((L, "mlp"), stream[:, :, None])[:, :, 0]
        self.offset[L] = stream - x
        return x

    def _mlp_in(self, L: int) -> Callable[[Tensor, HookPoint], Tensor]:
        return lambda mid, point: self._mlp_input(L, mid)

    def _mlp_out(self, L: int) -> Callable[[Tensor, HookPoint], None]:
        def hook(out: Tensor, point: HookPoint) -> None:
            self._add_delta(out[None], self.sender_start[(L, "mlp")])

        return hook

    def _resid_post(self, L: int) -> Callable[[Tensor, HookPoint], Tensor]:
        def hook(resid: Tensor, point: HookPoint) -> Tensor:
            if L in self.offset:  # the MLP read a changed stream; the residual keeps the real one
                resid = resid + self.offset.pop(L)
            if self.shape.n_layers - 1 == L:
                resid = self._receiver_input((L + 1, "logits"), resid[:, :, None])[:, :, 0]
            return resid

        return hook
