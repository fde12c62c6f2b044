"""Direct logit attribution: how much each component's write moves a logit (difference).

The final norm is linear once its scale is fixed, and the forward fixed it, so
with the cached scale every write ``x_i`` contributes exactly
``x_i · centre(w ⊙ Δ) / scale`` to the logit difference along
``Δ = W_U[:, answer] - W_U[:, wrong]``. Adding the norm's bias term and the
unembedding bias makes the components sum to the model's actual logit
difference, which the result carries to check against.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, get_args

import pandas as pd
import torch
from torch import Tensor

from mitk.cache import ActivationCache
from mitk.cache.writes import expert_writes, head_writes, neuron_writes, output_bias
from mitk.errors import ShapeMismatchError, UnsupportedModelError
from mitk.hooks import name
from mitk.shapes import Float, Int

By = Literal["component", "head", "neuron", "expert"]


@dataclass(frozen=True)
class Attribution:
    """Direct contributions to a logit (difference), one row per component.

    ``values`` is ``[component, batch]``; ``labels`` names the components;
    ``actual`` is the model's logit (difference) per prompt, which
    ``values.sum(0)`` reproduces. Under an output soft-cap (Gemma-2's
    ``cap * tanh(logit / cap)``) both are the logits before the cap: the cap is
    not linear, so the attribution is of what it is applied to.
    """

    values: Float[Tensor, "component batch"]
    labels: list[str]
    actual: Float[Tensor, " batch"]

    def total(self) -> Float[Tensor, " batch"]:
        """Sum over components: equals ``actual`` up to float error."""
        return self.values.sum(0)

    def top(self, k: int = 10) -> list[tuple[str, float]]:
        """The ``k`` components with the largest mean attribution over the batch."""
        mean = self.values.mean(1)
        order = mean.abs().argsort(descending=True)[:k]
        return [(self.labels[i], float(mean[i])) for i in order]

    def to_frame(self) -> pd.DataFrame:
        """Long table: one row per (component, prompt)."""
        values = self.values.detach().float().cpu()
        n_comp, n_batch = values.shape
        return pd.DataFrame({
            "component": [label for label in self.labels for _ in range(n_batch)],
            "prompt": list(range(n_batch)) * n_comp,
            "attribution": values.reshape(-1).tolist(),
        })  # fmt: skip


def _positions(pos: int | Tensor, batch: int, seq: int) -> Int[Tensor, " batch"]:
    index = torch.as_tensor(pos).long().reshape(-1)
    if index.shape[0] == 1:
        index = index.expand(batch)
    if index.shape[0] != batch:
        raise ShapeMismatchError(f"pos has {index.shape[0]} entries for a batch of {batch}")
    if bool(((index < -seq) | (index >= seq)).any()):
        raise ShapeMismatchError(f"pos {index.tolist()} outside a sequence of length {seq}")
    return index % seq


def _per_prompt(tokens: Tensor | int | list[int], batch: int, what: str) -> Int[Tensor, " batch"]:
    out = torch.as_tensor(tokens).long().reshape(-1)
    if out.shape[0] == 1:
        out = out.expand(batch)
    if out.shape[0] != batch:
        raise ShapeMismatchError(
            f"{what} has {out.shape[0]} entries; expected one per prompt ({batch})"
        )
    return out


def _writes_at(
    cache: ActivationCache, by: By, rows: Tensor, cols: Tensor
) -> tuple[list[str], list[Tensor]]:
    """Every write into the final stream at one position per prompt, as ``[n, batch, d_model]``."""
    stream = cache.stream
    stream.require_additive()
    pick = lambda t: t[rows, cols]  # noqa: E731  [batch, pos, ...] -> [batch, ...]
    labels = [label for label, _ in stream.embedding_hooks]
    blocks = [pick(cache[hook])[None] for _, hook in stream.embedding_hooks]
    per_prompt = lambda bias: bias.expand(rows.shape[0], -1)[None]  # noqa: E731
    for layer in range(stream.n_layers):
        if layer in stream.mixer_layers:  # a mixer's write is whole, at any granularity
            for kind in stream.mixer_writes:
                if kind == "mlp_out" and by == "neuron" and stream.mixer_neurons:
                    neuron_labels, neuron_blocks = _neuron_writes_at(cache, layer, pick)
                    labels += neuron_labels
                    blocks += neuron_blocks
                    continue
                blocks.append(pick(cache[name(kind, layer)])[None])
                labels.append(f"{layer}_{kind}")
            continue
        if by == "head":
            z = pick(cache[name("z", layer)])  # [batch, head, d_head]
            blocks += [
                head_writes(stream, layer, z),
                per_prompt(output_bias(stream, layer, "attn")),
            ]
            labels += [f"L{layer}H{h}" for h in range(z.shape[1])] + [f"L{layer}_attn_bias"]
        else:
            blocks.append(pick(cache[name("attn_out", layer)])[None])
            labels.append(f"{layer}_attn_out")
        if not stream.has_mlp:
            continue
        if by == "expert" and layer in stream.moe_layers:
            expert_labels, expert_blocks = _expert_writes_at(cache, layer, pick)
            labels += expert_labels
            blocks += expert_blocks
        elif by == "neuron":
            neuron_labels, neuron_blocks = _neuron_writes_at(cache, layer, pick)
            labels += neuron_labels
            blocks += neuron_blocks
        else:
            blocks.append(pick(cache[name("mlp_out", layer)])[None])
            labels.append(f"{layer}_mlp_out")
    return labels, blocks


def _neuron_writes_at(
    cache: ActivationCache, layer: int, pick: Any
) -> tuple[list[str], list[Tensor]]:
    """Each neuron's write at ``layer``'s MLP, then the MLP's bias, at the picked positions."""
    post = pick(cache[name("post", layer)])  # [batch, d_mlp]
    bias = output_bias(cache.stream, layer, "mlp").expand(post.shape[0], -1)[None]
    labels = [f"L{layer}N{n}" for n in range(post.shape[1])] + [f"L{layer}_mlp_bias"]
    return labels, [neuron_writes(cache.stream, layer, post), bias]


def _expert_writes_at(
    cache: ActivationCache, layer: int, pick: Any
) -> tuple[list[str], list[Tensor]]:
    """MoE ``layer``'s routed experts' writes (and its shared expert's) at the picked positions."""
    stream = cache.stream
    kinds = (stream.mlp_reads, "expert_indices", "expert_weights")
    stored = name("expert_out", layer)
    if stored in cache.cache_dict:
        per_expert = pick(cache[stored])  # [batch, expert, d_model]
    else:  # recompute the experts at these positions only, as [batch, pos=1, ...] inputs
        inputs = [pick(cache[name(kind, layer)])[:, None] for kind in kinds]
        per_expert = expert_writes(stream, layer, *inputs)[:, 0]
    labels = [f"L{layer}E{e}" for e in range(per_expert.shape[1])]
    blocks = [per_expert.movedim(1, 0)]
    shared = name("shared_out", layer)
    if shared in cache.model.hook_dict:
        labels.append(f"L{layer}_shared")
        blocks.append(pick(cache[shared])[None])
    return labels, blocks


def logit_attribution(
    model: Any,
    cache: ActivationCache,
    answer_tokens: Int[Tensor, " batch"] | int | list[int],
    wrong_tokens: Int[Tensor, " batch"] | int | list[int] | None = None,
    pos: int | Int[Tensor, " batch"] = -1,
    by: By = "component",
) -> Attribution:
    """Attribute each prompt's answer logit (minus the wrong answer's, if given) to components.

    ``by="component"``: embeddings, each attention and MLP output (a recurrent
    layer's ``mixer_out``, whole at every granularity); ``"head"``:
    each head plus each layer's attention bias; ``"neuron"``: each MLP neuron
    plus each MLP's bias (also the MLP after each mixer of a hybrid such as Bamba;
    RWKV's gated channel mixing stays whole); ``"expert"`` (mixture-of-experts models): each routed
    expert of each MoE layer (zero where a token did not choose it) and its
    shared expert, other sublayers whole. Every variant ends with ``ln_final.b`` and ``b_U``,
    so the values sum to the actual logit (difference). ``pos`` is one
    position for all prompts or one per prompt (e.g. the last real token under
    right padding). The cache must hold what the chosen ``by`` reads plus
    ``ln_final.hook_scale`` (``run_with_cache`` with no filter caches all).
    """
    if by not in get_args(By):
        raise ValueError(f"by must be one of {get_args(By)}, got {by!r}")
    moe_layers = cache.stream.moe_layers
    if by == "expert" and not moe_layers:
        raise UnsupportedModelError("by='expert' needs a mixture-of-experts model; this is dense")
    if by == "neuron" and moe_layers:
        raise UnsupportedModelError(
            f"layers {list(moe_layers)} are mixtures of experts: their writes are per expert "
            "(by='expert'), not per neuron"
        )
    stream = cache.stream
    stream.require_additive()
    missing = {"head": "attention heads", "neuron": "per-neuron writes"}.get(by)
    if by == "neuron" and stream.mixer_neurons:
        missing = None  # the MLP after each mixer has neurons
    if missing and len(stream.mixer_layers) == stream.n_layers:
        raise UnsupportedModelError(
            f"by={by!r}: every layer of this model is a {stream.mixer_kind} mixer, with no "
            f"{missing}; use by='component'"
        )
    embed = cache["hook_embed"]
    batch, seq = embed.shape[0], embed.shape[1]
    rows, cols = torch.arange(batch), _positions(pos, batch, seq)
    answers = _per_prompt(answer_tokens, batch, "answer_tokens")
    wrong = None if wrong_tokens is None else _per_prompt(wrong_tokens, batch, "wrong_tokens")
    with torch.no_grad():  # attributions are read, never differentiated
        delta, bias_delta = model.W_U[:, answers].T, model.b_U[answers]  # [batch, d_model], [batch]
        if wrong is not None:
            delta, bias_delta = delta - model.W_U[:, wrong].T, bias_delta - model.b_U[wrong]
        norm = model.ln_final
        direction = delta * norm.w
        if model.cfg.normalization == "layernorm":
            direction = direction - direction.mean(-1, keepdim=True)
        direction = direction / cache[name("scale")][rows, cols]  # [batch, d_model] / [batch, 1]
        labels, blocks = _writes_at(cache, by, rows, cols)
        values = [torch.einsum("nbm,bm->nb", block, direction) for block in blocks]
        ln_bias = getattr(norm, "b", None)  # RMSNorm has none
        ln_term = (delta * ln_bias).sum(-1) if ln_bias is not None else torch.zeros_like(bias_delta)
        values += [ln_term[None], bias_delta[None]]
        actual = _actual_logit_diff(model, cache, rows, cols, answers, wrong)
    return Attribution(torch.cat(values), [*labels, "ln_final.b", "b_U"], actual)


def _actual_logit_diff(
    model: Any, cache: ActivationCache, rows: Tensor, cols: Tensor, answers: Tensor,
    wrong: Tensor | None,
) -> Float[Tensor, " batch"]:  # fmt: skip
    """The model's logit (difference) before any output soft-cap, from the final stream."""
    final = cache[name("resid_post", model.cfg.n_layers - 1)][rows, cols]  # [batch, d_model]
    hidden = model.ln_final(final[:, None])[:, 0]

    def logit(tokens: Tensor) -> Tensor:  # the unembedding without its (nonlinear) cap
        return (hidden * model.W_U[:, tokens].T).sum(-1) + model.b_U[tokens]

    return logit(answers) if wrong is None else logit(answers) - logit(wrong)
