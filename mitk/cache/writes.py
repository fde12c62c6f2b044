"""What each head and each neuron writes into the residual stream: the one place it is computed.

The model hands the cache a ``StreamWrites``: the facts a decomposition needs
(layer count, which writes precede block 0, whether writes add up at all) and
the output weights of each layer's heads and neurons, read live from the
parameters. The cache's decompositions and direct logit attribution both get
per-head and per-neuron writes from ``head_writes`` / ``neuron_writes`` here,
so the refusals below hold for both.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from mitk.errors import UnsupportedModelError
from mitk.shapes import Float, Int

# layer -> (W_O [head, d_head, d_model], b_O [d_model])
HeadOutput = Callable[[int], tuple[Tensor, Tensor]]
# layer -> (W_out [d_mlp, d_model], b_out [d_model])
NeuronOutput = Callable[[int], tuple[Tensor, Tensor]]
# (layer, stream the MLP reads, expert indices, expert weights) -> [*lead, n_experts, d_model]
ExpertOutput = Callable[[int, Tensor, Tensor, Tensor], Tensor]


@dataclass(frozen=True)
class StreamWrites:
    """A model's residual-stream writes as the cache sees them.

    - ``embedding_hooks``: ``(label, hook name)`` of each write before block 0.
    - ``not_additive``: why the stream is not a sum of writes (post-norm
      models renormalise it inside every block), or None.
    - ``not_per_unit``: why head/neuron writes do not sum to the sublayer
      outputs (sandwich norms rescale them), or None.
    - ``expert_output``: each expert's write at an MoE layer, recomputed from
      the stream the MLP read and the routing the forward chose.
    """

    n_layers: int
    n_heads: int
    has_mlp: bool
    layernorm: bool
    embedding_hooks: tuple[tuple[str, str], ...]
    head_output: HeadOutput
    neuron_output: NeuronOutput
    not_additive: str | None = None
    not_per_unit: str | None = None
    moe_layers: tuple[int, ...] = ()
    """Layers whose MLP is a mixture of experts (their writes are per expert, not per neuron)."""
    expert_output: ExpertOutput | None = None
    mlp_reads: str = "resid_mid"
    """The hook kind holding the stream an MLP reads (``resid_pre`` in parallel blocks)."""
    mixer_layers: tuple[int, ...] = ()
    """Layers with a recurrent mixer (``hook_mixer_out``) in place of attention: no heads."""
    mixer_writes: tuple[str, ...] = ("mixer_out",)
    """The hook kinds a mixer layer writes, in order: a Mamba layer's one mixer, or an RWKV
    layer's time mixing then channel mixing (``("mixer_out", "mlp_out")``)."""
    mixer_neurons: bool = False
    """A mixer layer's ``mlp_out`` is an ordinary MLP's, a sum of per-neuron writes
    ``post * W_out`` (the MLP after each mixer of a Bamba-style hybrid; RWKV's channel
    mixing gates its sum, so it is not)."""
    mixer_kind: str = "state-space"
    """What the mixer layers are, for refusals."""

    def require_heads(self, layer: int) -> None:
        """Raise ``UnsupportedModelError`` if ``layer`` has no attention heads (a mixer layer)."""
        if layer in self.mixer_layers:
            writes = " and ".join(f"blocks.{layer}.hook_{kind}" for kind in self.mixer_writes)
            raise UnsupportedModelError(
                f"layer {layer} is a {self.mixer_kind} layer: it has no attention heads; "
                f"its writes are {writes}"
            )

    @property
    def mlp_less_layers(self) -> tuple[int, ...]:
        """Mixer layers with one write and no stream between sublayers (Mamba's)."""
        return self.mixer_layers if len(self.mixer_writes) == 1 else ()

    def sublayer_writes(self, layer: int) -> tuple[str, ...]:
        """The hook kinds of ``layer``'s writes into the stream, in the order they are added."""
        if layer in self.mixer_layers:
            return self.mixer_writes
        return ("attn_out", "mlp_out") if self.has_mlp else ("attn_out",)

    def require_additive(self) -> None:
        """Raise ``UnsupportedModelError`` unless the stream is a sum of its writes."""
        if self.not_additive is not None:
            raise UnsupportedModelError(self.not_additive)

    def require_per_unit(self, what: str) -> None:
        """Raise unless per-head/neuron writes add up to what the sublayers wrote."""
        self.require_additive()
        if self.not_per_unit is not None:
            raise UnsupportedModelError(f"{what} writes do not exist here: {self.not_per_unit}")


def head_writes(
    stream: StreamWrites, layer: int, z: Float[Tensor, "*lead head d_head"]
) -> Float[Tensor, "head *lead d_model"]:
    """Each head's write, ``z[..., h, :] @ W_O[h]`` (no bias), head axis first."""
    stream.require_per_unit("per-head")
    stream.require_heads(layer)
    W_O, _ = stream.head_output(layer)
    return torch.einsum("...hd,hdm->h...m", z, W_O)


def neuron_writes(
    stream: StreamWrites,
    layer: int,
    post: Float[Tensor, "*lead d_mlp"],
    neurons: Sequence[int] | Tensor | None = None,
) -> Float[Tensor, "neuron *lead d_model"]:
    """Each neuron's write, ``post[..., n] * W_out[n]`` (no bias), neuron axis first.

    ``neurons`` picks a subset (None: all); memory is ``n * |lead| * d_model``.
    """
    stream.require_per_unit("per-neuron")
    W_out, _ = stream.neuron_output(layer)
    index = torch.arange(post.shape[-1]) if neurons is None else torch.as_tensor(neurons)
    return torch.einsum("...n,nm->n...m", post[..., index], W_out[index])


def output_bias(stream: StreamWrites, layer: int, sublayer: str) -> Float[Tensor, " d_model"]:
    """``b_O`` (``sublayer="attn"``) or ``b_out`` (``"mlp"``) of ``layer``; zeros if absent."""
    output = stream.head_output if sublayer == "attn" else stream.neuron_output
    return output(layer)[1]


def expert_writes(
    stream: StreamWrites,
    layer: int,
    stream_in: Float[Tensor, "*lead d_model"],
    indices: Int[Tensor, "*lead top_k"],
    weights: Float[Tensor, "*lead top_k"],
) -> Float[Tensor, "*lead expert d_model"]:
    """Each routed expert's weighted write at MoE ``layer`` (zero where not chosen).

    Summed over experts, plus the shared expert's ``hook_shared_out``, this is
    ``hook_mlp_out``. Recomputes the experts on the tokens routed to them.
    """
    stream.require_per_unit("per-expert")
    if layer not in stream.moe_layers or stream.expert_output is None:
        raise UnsupportedModelError(f"layer {layer}'s MLP is not a mixture of experts")
    return stream.expert_output(layer, stream_in, indices, weights)
