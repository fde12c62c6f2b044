"""RWKVConfig: the shape of RWKV-4 time and channel mixing, for ``TransformerConfig.rwkv``."""

from __future__ import annotations

from dataclasses import dataclass

from mitk.config.json_config import JsonConfig, check_positive_ints
from mitk.errors import ConfigError


@dataclass(frozen=True)
class RWKVConfig(JsonConfig):
    """RWKV-4 blocks: every layer is ``x + time_mix(ln1(x))``, then ``+ channel_mix(ln2(x))``.

    Time mixing (the attention slot, ``blocks.L.mixer``) blends each position's input
    with the previous position's (the token shift), projects receptance ``r``, key
    ``k`` and value ``v`` (``d_attn`` wide), averages the values of all positions so
    far weighted by ``exp(k_i - (t - 1 - i) w)`` (a bonus ``exp(u + k_t)`` for the
    current one; ``w = exp(time_decay)``, ``u = time_first``) and gates that average
    with ``sigmoid(r)`` before the output projection. Channel mixing (the MLP slot,
    ``cfg.d_mlp`` wide) blends with the shift too, then ``sigmoid(r) * W_v relu(W_k x)^2``.
    """

    d_attn: int
    """Width of time mixing's receptance, key, value and recurrent state."""
    rescale_every: int = 0
    """Hugging Face's inference rescaling (``config.rescale_every``): its eval mode halves
    the stream after every ``rescale_every`` blocks and divides the output projections to
    match, which changes the result only through the LayerNorms' epsilon. mitk keeps the
    unhalved stream and gives the norms reading the stream after ``h`` halvings the
    epsilon ``4**h * eps``, so logits equal Hugging Face's eval mode; 0: no rescaling."""
    final_norm_eps: float = 1e-5
    """Epsilon of the final norm before any rescaling (Hugging Face's ``ln_out`` keeps
    torch's default whatever ``layer_norm_epsilon`` says)."""

    def __post_init__(self) -> None:
        check_positive_ints(self, ("d_attn",))
        if not isinstance(self.rescale_every, int) or self.rescale_every < 0:
            raise ConfigError(f"rwkv rescale_every must be an int >= 0, got {self.rescale_every!r}")
        if not self.final_norm_eps > 0:
            raise ConfigError(f"rwkv final_norm_eps must be positive, got {self.final_norm_eps!r}")

    def halvings_before(self, layer: int) -> int:
        """How often Hugging Face's eval mode has halved the stream entering ``layer``
        (``n_layers``: the final norm)."""
        return layer // self.rescale_every if self.rescale_every else 0

    def norm_eps(self, eps: float, layer: int) -> float:
        """The epsilon equivalent to ``eps`` for a norm reading the stream entering ``layer``."""
        return eps * 4.0 ** self.halvings_before(layer)
