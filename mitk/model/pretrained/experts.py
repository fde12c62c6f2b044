"""What the mixture-of-experts converters share: routing fields and expert weights.

Hugging Face keeps experts in two layouts. In memory (transformers 5) they are
fused: ``experts.gate_up_proj [n_experts, 2 d_expert, d_model]`` (gate rows
first) and ``experts.down_proj [n_experts, d_model, d_expert]``. On disk
(``save_pretrained`` and the hub) each expert is its own ``nn.Linear``:
``experts.{e}.gate_proj/up_proj/down_proj`` (Mixtral: ``w1``/``w3``/``w2``).
Both become mitk's ``W_gate``/``W_in [n_experts, d_model, d_expert]`` and
``W_out [n_experts, d_expert, d_model]``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from mitk.config import MoEConfig
from mitk.errors import UnsupportedModelError
from mitk.model.pretrained import mappings

Weights = mappings.Weights
LLAMA_EXPERT_NAMES = ("gate_proj", "up_proj", "down_proj")
"""Per-expert projection names (gate, linear, output) on disk for most families."""
MIXTRAL_EXPERT_NAMES = ("w1", "w3", "w2")
"""Mixtral's on-disk per-expert names for the same three projections."""


def sparse_layers(hf: dict[str, Any]) -> list[int] | None:
    """Qwen-MoE's MoE layers: every ``decoder_sparse_step``-th, less ``mlp_only_layers``.

    None when every layer is MoE (the ``MoEConfig.layers`` default).
    """
    n_layers, step = hf["num_hidden_layers"], hf.get("decoder_sparse_step") or 1
    dense = set(hf.get("mlp_only_layers") or ())
    layers = [i for i in range(n_layers) if (i + 1) % step == 0 and i not in dense]
    return None if len(layers) == n_layers else layers


def moe_config(hf: dict[str, Any], n_experts: int, d_expert: int, **fields: Any) -> MoEConfig:
    """The ``MoEConfig`` of a HF config whose top-k lives in ``num_experts_per_tok``."""
    top_k = hf.get("num_experts_per_tok")
    if not top_k:
        raise UnsupportedModelError(f"{hf.get('model_type')} config lacks num_experts_per_tok")
    return MoEConfig(n_experts=n_experts, top_k=top_k, d_expert=d_expert, **fields)


def router(sd: Weights, hf: str, mk: str, *, bias: bool = False) -> Weights:
    """The router ``nn.Linear`` ``hf`` (``[n_experts, d_model]``) as ``mk``'s ``W_router``."""
    return mappings.linear(sd, hf, f"{mk}.W_router", f"{mk}.b_router" if bias else None)


def experts(
    sd: Weights, hf: str, mk: str, n_experts: int, names: Iterable[str] = LLAMA_EXPERT_NAMES
) -> Weights:
    """Module ``hf``'s experts, fused or one per expert, as ``mk``'s ``W_gate``/``W_in``/``W_out``.

    ``names`` are the per-expert gate, linear and output projection names.
    """
    if f"{hf}.gate_up_proj" in sd:
        gate_up, down = sd[f"{hf}.gate_up_proj"], sd[f"{hf}.down_proj"]
        gate, linear = gate_up.chunk(2, dim=1)
        return {
            f"{mk}.W_gate": gate.transpose(1, 2),
            f"{mk}.W_in": linear.transpose(1, 2),
            f"{mk}.W_out": down.transpose(1, 2),
        }
    gate_name, linear_name, out_name = names

    def stacked(projection: str) -> torch.Tensor:
        return torch.stack([sd[f"{hf}.{e}.{projection}.weight"].T for e in range(n_experts)])

    projections = {"W_gate": gate_name, "W_in": linear_name, "W_out": out_name}
    return {f"{mk}.{mitk}": stacked(hf_name) for mitk, hf_name in projections.items()}


def shared_expert(sd: Weights, hf: str, mk: str, gate: str | None = None) -> Weights:
    """A shared SwiGLU expert ``hf`` as ``mk.shared`` (and its sigmoid gate ``gate``)."""
    out = mappings.mlp(
        sd, f"{hf}.up_proj", f"{hf}.down_proj", f"{mk}.shared", gate=f"{hf}.gate_proj", bias=False
    )
    if gate is not None:
        out |= mappings.linear(sd, gate, f"{mk}.W_shared_gate")
    return out
