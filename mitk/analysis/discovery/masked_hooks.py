"""The forward hooks of one masked run: receiver inputs rebuilt, sender writes recorded.

``MaskedRun.logits`` runs the model under a fresh ``MaskHooks``; the state of
one forward (the stream each block read, the senders' deltas so far) lives
here, never on the model. See ``mitk.analysis.discovery.masked`` for the
equation the hooks implement.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from mitk.hooks import HookPoint, name
from mitk.shapes import Float

if TYPE_CHECKING:
    from mitk.analysis.discovery.masked import Group, MaskedRun


@dataclass(frozen=True)
class SenderLayout:
    """How a forward records sender writes: every head apart, or each layer's heads as one.

    Without gradients, a mask that treats every head of a layer alike (a layer-granularity
    mask: ACDC and faithfulness at layer granularity) needs only the sum of their writes, so
    the forward records one sender per layer's heads instead of one per head: 12x fewer
    deltas to write and contract on a GPT-2-sized layer. ``start[(layer, "head" | "mlp")]``
    is a block's first recorded sender; ``rows`` is each recorded sender's row of a
    head-level mask and ``expand`` each head-level sender's row that stands for it.
    """

    start: dict[tuple[int, str], int]
    rows: Tensor
    expand: Tensor
    ablated: Float[Tensor, "sender batch_or_1 pos d_model"]
    clean_deltas: Float[Tensor, "sender batch pos d_model"]
    per_head: bool

    @classmethod
    def of(cls, run: MaskedRun, per_head: bool) -> SenderLayout:
        """The layout of ``run``'s senders, per head or per layer."""
        kinds = [(node.layer, node.kind) for node in run.graph.fine_senders]
        keys: list[object] = list(range(len(kinds))) if per_head else list(kinds)
        order = list(dict.fromkeys(keys))  # recorded senders, in the order they write
        device = run.ablated.device
        index = torch.tensor([order.index(key) for key in keys], device=device)
        rows = torch.tensor([keys.index(key) for key in order], device=device)
        start: dict[tuple[int, str], int] = {}
        for i, kind in enumerate(kinds):
            start.setdefault(kind, int(index[i]))
        members = torch.zeros(len(order), len(keys), device=device)
        members[index, torch.arange(len(keys), device=device)] = 1.0

        def summed(outputs: Tensor) -> Tensor:
            if per_head:
                return outputs
            return torch.einsum("rs,s...->r...", members.to(outputs.dtype), outputs)

        return cls(
            start, rows, rows[index], summed(run.ablated), summed(run.clean_deltas), per_head
        )


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


class MaskHooks:
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
        drop = 1.0 - keep.to(run.tokens.device, torch.float32)  # [V, (P,) S, R]
        self.positional = keep.dim() == 4
        # no gradient needs each edge or each receiver apart: senders and receivers that a
        # mask treats alike may share one write and one input
        self.shared = not keep.requires_grad and probe is None
        # every edge kept without a gradient (EAP-IG on inputs): nothing is removed, so the
        # per-receiver sums over senders, a forward and a backward as large as the model's, go
        self.nothing_removed = not keep.requires_grad and not bool(drop.any())
        self.alpha, self.probe = alpha, probe
        self.stream: dict[int, Tensor] = {}
        self.offset: dict[int, Tensor] = {}
        self.attn_offset: dict[int, Tensor] = {}  # layers whose attention read its input whole
        self.qkv_inputs: dict[int, dict[str, Tensor]] = {}
        self.receivers = run.receiver_groups
        merged = run.sender_layout(per_head=False)
        heads_alike = self.shared and bool((drop == drop[..., merged.expand, :]).all())
        self.senders = merged if heads_alike else run.sender_layout(per_head=True)
        self.drop = drop[..., self.senders.rows, :] if heads_alike else drop
        # below the first block run, every sender wrote what it wrote on the clean run
        self.n_clean = self.senders.start[(start, "head")] if start else 0
        self.deltas = _Deltas(len(self.senders.rows) - self.n_clean)

    def specs(self) -> list[tuple[str, Callable[[Tensor, HookPoint], Tensor | None]]]:
        shape = self.shape
        specs: list[tuple[str, Callable[[Tensor, HookPoint], Tensor | None]]] = []
        last = shape.n_layers - 1
        for L in range(self.start, shape.n_layers):
            specs.append((name("resid_pre", L), self._resid_pre(L)))
            specs += [(name(c, L), self._qkv(L, c)) for c in ("q", "k", "v")]
            specs.append((name("z", L), self._z(L)))
            specs.append((name("attn_out", L), self._attn_out(L)))
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
            clean = self.senders.clean_deltas[:s0]
            drop = self.drop[..., :s0, receivers].to(clean.dtype)
            removed = removed + torch.einsum(pattern, clean, drop)
        parts = removed.flatten(0, 1).to(stream.dtype).split([len(c) for c in columns], dim=2)
        inputs = [stream - part for part in parts]
        return [x if p is None else x + p for x, p in zip(inputs, probes, strict=True)]

    def _columns(self, group: Group) -> list[int]:
        """The receivers of ``group`` whose inputs differ: one when a mask treats all alike."""
        receivers = self.receivers[group]
        if self.shared and len(receivers) > 1:
            columns = self.drop[..., receivers]
            if bool((columns == columns[..., :1]).all()):  # e.g. every head of a layer edge
                return receivers[:1]  # one input serves them all: [V*B, pos, 1, d_model]
        return receivers

    def _add_delta(self, out: Tensor, index: int) -> None:
        """Record senders ``index..`` given their outputs ``[n, V*B, pos, m]``."""
        if self.nothing_removed:
            return
        n = out.shape[0]
        ablated = self.senders.ablated[index : index + n, None]  # [n, 1, B|1, P, M]
        per_variant = out.view(n, self.n, -1, *out.shape[2:])
        self.deltas.add(per_variant - ablated.to(out.dtype))

    # --- hooks -------------------------------------------------------------------------
    def _resid_pre(self, L: int) -> Callable[[Tensor, HookPoint], Tensor]:
        def hook(resid: Tensor, point: HookPoint) -> Tensor:
            if L == 0:
                if self.alpha is not None:  # interpolate the embeddings from ablated to clean
                    ablated = self.senders.ablated[0].to(resid.dtype)
                    shaped = resid.view(self.n, -1, *resid.shape[1:])
                    alpha = self.alpha.to(resid)[:, None, None, None]
                    resid = (ablated + alpha * (shaped - ablated)).flatten(0, 1)
                self._add_delta(resid[None], 0)
            self.stream[L] = resid
            if self.shape.has_mlp and self.shape.parallel_attn_mlp:
                return self._mlp_input(L, resid)
            if self._one_attention_input(L):
                # the attention reads it whole (no q/k/v recomputed); the stream is restored
                # where the attention's output is added
                x = self._receiver_input((L, "q"), resid[:, :, None])[:, :, 0]
                self.attn_offset[L] = resid - x
                return x
            return resid

        return hook

    def _qkv(self, L: int, channel: str) -> Callable[[Tensor, HookPoint], Tensor]:
        def hook(act: Tensor, point: HookPoint) -> Tensor:
            if (self.nothing_removed and self.probe is None) or L in self.attn_offset:
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
            W_O = self.run.model.blocks[L].attn.W_O
            if self.senders.per_head:
                writes = torch.einsum("bphd,hdm->hbpm", z, W_O)
            else:  # one write for all the layer's heads: the output projection
                writes = torch.einsum("bphd,hdm->bpm", z, W_O)[None]
            self._add_delta(writes, self.senders.start[(L, "head")])

        return hook

    def _one_attention_input(self, L: int) -> bool:
        """Whether every q/k/v receiver of block ``L`` reads the same input under every mask
        (a layer mask without gradients), in a block whose attention alone reads resid_pre."""
        if not self.shared or self.nothing_removed or self.shape.parallel_attn_mlp:
            return False
        columns = self.drop[..., [r for c in "qkv" for r in self.receivers[(L, c)]]]
        return bool((columns == columns[..., :1]).all())

    def _attn_out(self, L: int) -> Callable[[Tensor, HookPoint], Tensor]:
        def hook(out: Tensor, point: HookPoint) -> Tensor:
            offset = self.attn_offset.get(L)
            return out if offset is None else out + offset

        return hook

    def _mlp_input(self, L: int, stream: Tensor) -> Tensor:
        x = self._receiver_input((L, "mlp"), stream[:, :, None])[:, :, 0]
        self.offset[L] = stream - x
        return x

    def _mlp_in(self, L: int) -> Callable[[Tensor, HookPoint], Tensor]:
        return lambda mid, point: self._mlp_input(L, mid)

    def _mlp_out(self, L: int) -> Callable[[Tensor, HookPoint], None]:
        def hook(out: Tensor, point: HookPoint) -> None:
            self._add_delta(out[None], self.senders.start[(L, "mlp")])

        return hook

    def _resid_post(self, L: int) -> Callable[[Tensor, HookPoint], Tensor]:
        def hook(resid: Tensor, point: HookPoint) -> Tensor:
            if L in self.offset:  # the MLP read a changed stream; the residual keeps the real one
                resid = resid + self.offset.pop(L)
            if self.shape.n_layers - 1 == L:
                resid = self._receiver_input((L + 1, "logits"), resid[:, :, None])[:, :, 0]
            return resid

        return hook
