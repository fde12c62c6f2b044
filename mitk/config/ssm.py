"""SSMConfig: the shape of a selective state-space (Mamba) mixer, for ``TransformerConfig.ssm``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from mitk.config.json_config import JsonConfig, check_choices, check_positive_ints
from mitk.errors import ConfigError

SSMVariant = Literal["mamba", "mamba2"]


@dataclass(frozen=True)
class SSMConfig(JsonConfig):
    """A Mamba mixer's widths; the layers it applies to hold it in place of attention + MLP.

    Per token the mixer projects the normed stream to ``x`` and a gate (``d_inner``
    each), runs ``x`` through a causal depthwise convolution ``d_conv`` wide and the
    activation (``cfg.act_fn``), derives the selective parameters ``dt`` (through a
    rank-``dt_rank`` bottleneck and softplus), ``B`` and ``C`` (``d_state`` each) from
    it, runs the recurrence ``h_t = exp(dt_t A) h_{t-1} + dt_t B_t x_t`` with a learned
    ``A = -exp(A_log)`` (``[d_inner, d_state]``), reads ``y_t = C_t h_t + D x_t``, gates
    it with ``silu(gate)`` and projects back to ``d_model``.

    ``mamba2`` (Mamba-2): ``A`` is one scalar per head (``n_heads`` heads of
    ``d_inner / n_heads`` channels), ``dt`` one per head straight from the input
    projection (no ``dt_rank`` bottleneck), ``B`` and ``C`` come out of the convolution
    with ``x`` and are shared by the heads of each of ``n_groups`` groups, and the gated
    output is RMS-normed per group before the output projection.
    """

    d_inner: int
    """Width of the mixer's inner stream (Mamba's ``expand * d_model``)."""
    d_state: int
    """State entries per inner channel (``N`` in the paper)."""
    d_conv: int
    """Width of the causal depthwise convolution."""
    dt_rank: int
    """Rank of the bottleneck the time step ``dt`` is computed through."""
    conv_bias: bool = True
    """The convolution carries a bias."""
    proj_bias: bool = False
    """The input and output projections carry biases."""
    variant: SSMVariant = "mamba"
    """Which selective state-space layer (``mamba``: Mamba-1's per-channel ``A``;
    ``mamba2``: Mamba-2's per-head scalar ``A``)."""
    n_heads: int = 1
    """``mamba2``: heads, each with its own ``A``, ``dt`` and ``D``."""
    n_groups: int = 1
    """``mamba2``: groups of heads sharing ``B`` and ``C`` (and one norm group each)."""
    layers: list[int] | None = None
    """Layers whose block is a mixer; None: every layer."""
    mlp: bool = False
    """Each mixer layer keeps an MLP after its mixer, ``resid + mixer(ln1(resid))`` then
    ``+ mlp(ln2(...))`` (hybrids such as Bamba); False: the mixer is the layer's one write
    (Mamba)."""

    def __post_init__(self) -> None:
        check_positive_ints(
            self, ("d_inner", "d_state", "d_conv", "dt_rank", "n_heads", "n_groups")
        )
        check_choices(self, {"variant": SSMVariant})
        if self.d_inner % self.n_heads or self.n_heads % self.n_groups:
            raise ConfigError(
                f"ssm n_heads ({self.n_heads}) must divide d_inner ({self.d_inner}) and be a "
                f"multiple of n_groups ({self.n_groups})"
            )
        if not isinstance(self.mlp, bool):
            raise ConfigError(f"ssm mlp must be a bool, got {self.mlp!r}")
        if self.layers is not None and not all(isinstance(i, int) and i >= 0 for i in self.layers):
            raise ConfigError(f"ssm layers must be non-negative ints, got {self.layers!r}")

    def applies_to(self, layer: int) -> bool:
        """Whether ``layer``'s block is a state-space mixer."""
        return self.layers is None or layer in self.layers
