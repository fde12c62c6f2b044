"""MoEConfig: a mixture-of-experts MLP's routing and expert shapes (Mixtral, Qwen-MoE, OLMoE...)."""

from __future__ import annotations

from dataclasses import dataclass

from mitk.config.json_config import JsonConfig, check_positive_ints
from mitk.errors import ConfigError


@dataclass(frozen=True)
class MoEConfig(JsonConfig):
    """Routing and expert shapes of the MoE layers; ``TransformerConfig.moe`` holds one.

    Each token's router logits ``x W_router (+ b_router)`` go through a softmax;
    the ``top_k`` largest probabilities pick its experts (exact ties break as
    ``torch.topk`` breaks them, as in the reference code), optionally renormalised
    to sum to one, and scaled by ``routed_scale``. With ``n_groups`` > 1 (DeepSeek's
    group-limited greedy routing) experts come in ``n_groups`` equal groups and
    only the ``top_groups`` groups with the largest best probability compete.
    Each expert is a gated MLP ``d_expert`` wide. A shared expert (``d_shared`` >
    0) sees every token, optionally through a sigmoid gate on ``x
    W_shared_gate``. Layers outside ``layers`` keep the dense ``d_mlp`` MLP.
    Nothing is dropped for capacity: the supported families route every token
    to its ``top_k`` experts at inference.
    """

    n_experts: int
    """Routed experts per MoE layer."""
    top_k: int
    """Experts each token is sent to."""
    d_expert: int
    """Hidden width of one routed expert."""
    norm_top_k: bool = True
    """Renormalise the chosen experts' probabilities to sum to one (Mixtral: yes)."""
    routed_scale: float = 1.0
    """Multiplier on the routed experts' weights (DeepSeek's ``routed_scaling_factor``)."""
    router_bias: bool = False
    """The router carries a bias ``b_router`` (gpt-oss)."""
    expert_bias: bool = False
    """Experts' projections carry biases (gpt-oss)."""
    clamp_limit: float = 0.0
    """gpt-oss's clamped SwiGLU when > 0: gate clamped above and linear branch to
    ``[-limit, limit]``, then ``(linear + 1) * gate * sigmoid(clamp_alpha * gate)``; 0: the
    model's ``act_fn`` gated MLP."""
    clamp_alpha: float = 1.702
    """The sigmoid's slope in the clamped SwiGLU."""
    d_shared: int = 0
    """Hidden width of a shared expert every token goes through; 0: none."""
    shared_gate: bool = False
    """The shared expert's output is scaled by ``sigmoid(x w_shared_gate)`` (Qwen2-MoE)."""
    n_groups: int = 1
    """Expert groups for group-limited routing; 1: every expert competes."""
    top_groups: int = 1
    """Groups whose experts may be chosen (with ``n_groups`` > 1)."""
    layers: list[int] | None = None
    """Layers with an MoE MLP; None: every layer. The others have the dense ``d_mlp`` MLP."""

    def __post_init__(self) -> None:
        check_positive_ints(self, ("n_experts", "top_k", "d_expert"))
        if self.top_k > self.n_experts:
            raise ConfigError(f"top_k ({self.top_k}) exceeds n_experts ({self.n_experts})")
        for name in ("routed_scale", "clamp_alpha"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise ConfigError(f"moe {name} must be a positive number, got {value!r}")
        if self.clamp_limit < 0:
            raise ConfigError(f"moe clamp_limit must be >= 0 (0: no clamp), got {self.clamp_limit}")
        if not isinstance(self.d_shared, int) or self.d_shared < 0:
            raise ConfigError(f"moe d_shared must be an int >= 0 (0: none), got {self.d_shared!r}")
        check_positive_ints(self, ("n_groups", "top_groups"))
        if self.n_experts % self.n_groups or self.top_groups > self.n_groups:
            raise ConfigError(
                f"moe n_groups ({self.n_groups}) must divide n_experts ({self.n_experts}) and "
                f"be at least top_groups ({self.top_groups})"
            )
        if self.shared_gate and not self.d_shared:
            raise ConfigError("moe shared_gate needs a shared expert (d_shared > 0)")

    def applies_to(self, layer: int) -> bool:
        """Whether ``layer``'s MLP is a mixture of experts."""
        return self.layers is None or layer in self.layers
