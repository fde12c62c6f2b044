"""Edge attribution patching (Syed et al. 2023): a gradient score per upstream → downstream edge.

Nodes write into or read from the residual stream. Upstream nodes: the
embeddings, every attention head and every MLP. Downstream nodes: each
attention layer's input (through ``ln1``), each MLP's input (through
``ln2``) and the logits (through ``ln_final``). The score of edge ``u → d``
is ``Δ_u · ∂metric/∂input_d``, summed over positions: how much the metric
would move if only ``d`` saw ``u``'s change from base to source. Heads are
read per attention layer, not per q/k/v channel.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch
from torch import Tensor

from mitk.analysis.patching.engine import metric_fn
from mitk.analysis.patching.metrics import PositionMetric
from mitk.analysis.patching.pair import Direction, check_patch_inputs, metric_at
from mitk.cache.writes import head_writes
from mitk.hooks import name
from mitk.shapes import Float, Int


@dataclass(frozen=True)
class EdgeScores:
    """``scores[u, d]`` for upstream ``upstream[u]`` and downstream ``downstream[d]``.

    Edges from a node to a reader that comes before it are absent (NaN).
    """

    scores: Float[Tensor, "upstream downstream"]
    upstream: list[str]
    downstream: list[str]

    def to_frame(self) -> pd.DataFrame:
        """Long table of the present edges, largest absolute score first."""
        rows = [
            {"upstream": u, "downstream": d, "score": float(self.scores[i, j])}
            for i, u in enumerate(self.upstream)
            for j, d in enumerate(self.downstream)
            if not torch.isnan(self.scores[i, j])
        ]
        frame = pd.DataFrame(rows)
        return frame.reindex(frame["score"].abs().sort_values(ascending=False).index)


@dataclass(frozen=True)
class _Reader:
    label: str
    normalized_hook: str  # the norm's output; its gradient is what this reader passes back
    input_hook: str  # the residual stream the norm reads
    order: float  # position in the forward: writers before it can reach it


def _readers(model: Any) -> list[_Reader]:
    cfg, readers = model.cfg, []
    for L in range(cfg.n_layers):
        readers.append(
            _Reader(f"L{L}_attn_in", name("normalized", L, "ln1"), name("resid_pre", L), float(L))
        )
        if cfg.has_mlp and not cfg.parallel_attn_mlp:
            readers.append(
                _Reader(f"L{L}_mlp_in", name("normalized", L, "ln2"), name("resid_mid", L), L + 0.5)
            )
    last = name("resid_post", cfg.n_layers - 1)
    readers.append(_Reader("logits", name("normalized"), last, float(cfg.n_layers)))
    return readers


def _norm_input_gradient(model: Any, resid: Tensor, grad_normalized: Tensor) -> Tensor:
    """Gradient w.r.t. a norm's input given the gradient at its normalised (pre-affine) output."""
    x = resid.detach().requires_grad_(True)
    with torch.enable_grad():
        centred = x - x.mean(-1, keepdim=True) if model.cfg.normalization == "layernorm" else x
        normalized = centred / (centred.pow(2).mean(-1, keepdim=True) + model.cfg.norm_eps).sqrt()
        (grad,) = torch.autograd.grad(normalized, x, grad_normalized)
    return grad


def _writer_deltas(
    model: Any, source: Any, base: Any
) -> tuple[list[str], Float[Tensor, "node batch pos d_model"], list[float]]:
    """Each upstream node's change (source - base) in residual space, with labels and order."""
    cfg, stream = model.cfg, model.stream_writes()
    labels, deltas, order = [], [], []
    for label, hook in stream.embedding_hooks:
        labels.append(label)
        deltas.append(source[hook] - base[hook])
        order.append(-1.0)
    for L in range(cfg.n_layers):
        dz = source[name("z", L)] - base[name("z", L)]  # [batch, pos, head, d_head]
        per_head = head_writes(stream, L, dz)  # [head, batch, pos, d_model]
        labels += [f"L{L}H{h}" for h in range(cfg.n_heads)]
        deltas += list(per_head)
        order += [float(L)] * cfg.n_heads
        if cfg.has_mlp:
            labels.append(f"L{L}_mlp")
            deltas.append(source[name("mlp_out", L)] - base[name("mlp_out", L)])
            order.append(L + 0.5)
    return labels, torch.stack(deltas), order


def edge_attribution_patch(
    model: Any,
    clean_tokens: Int[Tensor, "batch pos"],
    corrupted_tokens: Int[Tensor, "batch pos"],
    metric: Any,
    *,
    direction: Direction = "denoising",
    attention_mask: Int[Tensor, "batch pos"] | None = None,
) -> EdgeScores:
    """Score every edge of the residual-stream graph from one forward pair and one backward.

    Scores are summed over positions and averaged over prompts. A parallel
    attention+MLP block reads one normalised input per sublayer; only the
    attention's is scored there.
    """
    check_patch_inputs(clean_tokens, corrupted_tokens, attention_mask, direction)
    cfg = model.cfg
    batch, seq = clean_tokens.shape
    fn, answer_pos = metric_fn(metric, batch, seq)
    readers = _readers(model)
    stream = model.stream_writes()
    stream.require_additive()  # post-norm streams are not a sum of the writes scored here
    writes = [hook for _, hook in stream.embedding_hooks]
    writes += [name("z", L) for L in range(cfg.n_layers)]
    writes += [name("mlp_out", L) for L in range(cfg.n_layers)] if cfg.has_mlp else []
    base_tokens, source_tokens = (corrupted_tokens, clean_tokens) if direction == "denoising" \
        else (clean_tokens, corrupted_tokens)  # fmt: skip
    rows = torch.arange(batch)
    with torch.no_grad():
        source_logits, source = model.run_with_cache(
            source_tokens, attention_mask=attention_mask, names_filter=writes
        )
    if isinstance(metric, PositionMetric) and answer_pos is not None:
        metric.prepare(source_logits[rows, answer_pos])
    grads: dict[str, Tensor] = {}

    def keep_grad(grad: Tensor, hook: Any) -> None:
        grads[hook.name] = grad.detach()

    with torch.enable_grad():
        names = sorted(set(writes + [r.input_hook for r in readers]))
        acts: dict[str, Tensor] = {}
        logits = model.run_with_hooks(
            base_tokens,
            attention_mask=attention_mask,
            fwd_hooks=[(n, lambda a, h: acts.__setitem__(h.name, a.detach())) for n in names],
            bwd_hooks=[(r.normalized_hook, keep_grad) for r in readers],
        )
        value = metric_at(fn, logits, answer_pos)
        value.sum().backward()  # prompts are independent: each row gets its own gradient
    model.zero_grad(set_to_none=True)

    with torch.no_grad():
        labels, deltas, order = _writer_deltas(model, source, acts)
    scores = torch.full((len(labels), len(readers)), float("nan"))
    for j, reader in enumerate(readers):
        grad_in = _norm_input_gradient(
            model, acts[reader.input_hook], grads[reader.normalized_hook]
        )
        edge = torch.einsum("nbpm,bpm->nb", deltas, grad_in).mean(1).detach()
        present = torch.tensor([o < reader.order for o in order])
        scores[present, j] = edge[present]
    return EdgeScores(scores, labels, [r.label for r in readers])
