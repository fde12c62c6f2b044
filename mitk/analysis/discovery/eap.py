"""Edge attribution patching with integrated gradients (Hanna et al. 2024; Syed et al. 2023).

The score of edge ``s -> r`` estimates how much the metric falls when the
edge is ablated: ``(out_s - ablated_s) . dmetric/d input_r``, averaged over
prompts and summed over positions. Integrated gradients average the
gradient over ``ig_steps`` points between the ablated and the clean run,
at ``alpha = k / ig_steps`` for ``k = 1..ig_steps`` (so ``ig_steps=1`` is
plain EAP, the gradient on the clean run):

- ``on="inputs"``: the embeddings move from their ablated to their clean
  value; the gradient at every receiver input is averaged and multiplied by
  the sender's clean-minus-ablated output (EAP-IG-inputs).
- ``on="activations"``: every edge moves together from ablated to kept
  (the mask ``keep = alpha`` of the masked run); the score is the average
  of ``dmetric/dkeep[s, r]`` along that path, which by the completeness of
  integrated gradients sums to about ``m_full - m_empty`` over all edges.

All steps of a chunk run as one batched forward and backward. With
``positional=True`` the sum over positions is left out: each edge gets a
score at each position (the receiver's input there), the scores over
positions add up to the position-free ones, and the circuit keeps edges at
the positions where they matter (a positional circuit, as MIB scores them).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor

from mitk.analysis.discovery.circuit import Circuit
from mitk.analysis.discovery.graph import EdgeGraph, Granularity
from mitk.analysis.discovery.masked import Ablation, MaskedRun
from mitk.analysis.discovery.result import DiscoveryResult, with_nan
from mitk.shapes import Float

IgOn = Literal["inputs", "activations"]


def _steps(ig_steps: int) -> Tensor:
    if isinstance(ig_steps, bool) or not isinstance(ig_steps, int) or ig_steps < 1:
        raise ValueError(f"ig_steps must be an int >= 1, got {ig_steps!r}")
    return torch.arange(1, ig_steps + 1, dtype=torch.float32) / ig_steps


def _chunks(alphas: Tensor, per: int) -> list[Tensor]:
    return [alphas[lo : lo + per] for lo in range(0, alphas.numel(), per)]


def _activation_scores(
    run: MaskedRun, alphas: Tensor, per: int, positional: bool
) -> Float[Tensor, "*pos sender receiver"]:
    shape = (run.seq, *run.graph.present.shape) if positional else run.graph.present.shape
    total = torch.zeros(shape, device=run.tokens.device)
    for chunk in _chunks(alphas, per):
        alpha = chunk.to(total).view(-1, *[1] * total.dim())
        keep = alpha.expand(-1, *total.shape).clone().requires_grad_(True)
        with torch.enable_grad():
            run.metric(keep).sum().backward()
        assert keep.grad is not None
        total += keep.grad.sum(0)
    return total / (alphas.numel() * run.batch)


def _input_scores(
    run: MaskedRun, alphas: Tensor, per: int, positional: bool
) -> Float[Tensor, "*pos sender receiver"]:
    delta = run.clean_deltas.float()  # [S, B, P, M]; the gradients sum in float32
    n_receivers, d_model = run.graph.present.shape[1], run.model.cfg.d_model
    grads = torch.zeros(run.batch, run.seq, n_receivers, d_model, device=run.tokens.device)
    for chunk in _chunks(alphas, per):
        n = chunk.numel()
        probes = {
            group: torch.zeros(n * run.batch, run.seq, len(receivers), d_model,
                               device=grads.device, requires_grad=True)
            for group, receivers in run.receiver_groups.items()
        }  # fmt: skip
        with torch.enable_grad():
            keep = run.keep_all(1.0, n)
            run.metric(keep, embed_alpha=chunk.to(grads), probe=probes).sum().backward()
        for group, receivers in run.receiver_groups.items():
            grad = probes[group].grad
            assert grad is not None
            grads[:, :, receivers] += grad.view(n, run.batch, *grad.shape[1:]).sum(0)
    pattern = "sbpm,bprm->psr" if positional else "sbpm,bprm->sr"
    return torch.einsum(pattern, delta, grads) / (alphas.numel() * run.batch)


def eap_ig(
    model: Any,
    data: Any,
    metric: Any,
    *,
    ig_steps: int = 5,
    on: IgOn = "inputs",
    ablation: Ablation = "resample",
    granularity: Granularity = "heads",
    positional: bool = False,
    n_edges: int | None = None,
    edge_fraction: float = 0.05,
    memory_budget_gb: float = 2.0,
) -> DiscoveryResult:
    """Score every edge by EAP-IG and keep the top ``n_edges`` (or ``edge_fraction``) by |score|.

    ``data``: ``Prompts``, clean tokens, or ``(clean, corrupted)``; ``metric``:
    a ready-made metric or a callable from logits ``[batch, pos, d_vocab]``
    to ``[batch]``. A positive score means ablating the edge lowers the metric.
    Layer granularity sums the head-level scores of each layer edge.
    ``positional``: scores ``[pos, sender, receiver]`` and a positional
    circuit; ``edge_fraction`` is then of the edges at all positions.
    """
    if on not in ("inputs", "activations"):
        raise ValueError(f"on must be 'inputs' or 'activations', got {on!r}")
    alphas = _steps(ig_steps)
    graph = EdgeGraph.of(model, granularity)
    run = MaskedRun(model, graph, data, metric, ablation)
    per = max(1, run.variants_per_forward(memory_budget_gb) // 4)  # a backward holds more
    was_training = model.training
    params = [p.requires_grad for p in model.parameters()]
    try:
        model.requires_grad_(False)
        scorer = _input_scores if on == "inputs" else _activation_scores
        fine = scorer(run, alphas, per, positional)
    finally:
        for p, flag in zip(model.parameters(), params, strict=True):
            p.requires_grad_(flag)
        model.train(was_training)
    scores = with_nan(graph, graph.coarse_scores(fine))
    total = graph.n_edges * (run.seq if positional else 1)
    size = n_edges if n_edges is not None else round(edge_fraction * total)
    circuit = Circuit.top(graph, scores.nan_to_num(0.0), size)
    where = ", positional" if positional else ""
    return DiscoveryResult(circuit, scores, f"eap_ig[{on}, steps={ig_steps}{where}]")
