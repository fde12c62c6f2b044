"""Cross-layer transcoders: layer L's latents read its MLP input and write every later MLP output.

A CLT (Ameisen et al. 2025, "Circuit Tracing") replaces all MLPs at once. Layer
``L``'s latents ``f_L = act(x_L W_enc[L] + b_enc[L])`` read ``x_L`` (the residual
stream before layer L's MLP, or ln2's output); the reconstruction of layer
``M``'s MLP output is ``b_dec[M] + sum_{L <= M} f_L W_dec[L][:, M - L]``. So a
latent has one encoder and ``n_layers - L`` decoder vectors: a computation the
model spreads over several MLPs can be one latent.

Layouts: ``W_enc [n_layers, d_model, d_sae]`` (mitk's per-layer ``d_in x d_sae``
stacked), ``W_dec[L] [d_sae, n_layers - L, d_model]`` (circuit-tracer's),
``b_enc [n_layers, d_sae]``, ``b_dec [n_layers, d_model]``, and for JumpReLU
``log_threshold [n_layers, d_sae]`` (thresholds are learnt in log space).
"""

from __future__ import annotations

from collections.abc import Sequence
import math
from pathlib import Path

import torch
from torch import Tensor, nn

from mitk.config import TORCH_DTYPES
from mitk.errors import ShapeMismatchError
from mitk.sae.codes import jumprelu, topk_codes
from mitk.sae.crosslayer_config import CLTConfig
from mitk.shapes import Float


class CrossLayerTranscoder(nn.Module):
    """One cross-layer transcoder over every layer of a model (see the module docstring)."""

    log_threshold: nn.Parameter  # JumpReLU only

    def __init__(self, cfg: CLTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        n, d, s = cfg.n_layers, cfg.d_model, cfg.d_sae
        dtype = TORCH_DTYPES[cfg.dtype]
        gen = torch.Generator().manual_seed(cfg.seed)

        def unit(*shape: int, dims: tuple[int, ...]) -> Tensor:
            rows = torch.randn(*shape, generator=gen, dtype=torch.float64)
            return rows / rows.norm(dim=dims, keepdim=True)

        # encoders read another space than decoders write, so each draws its own directions;
        # unit encoder columns give pre-activations of about unit spread on inputs of norm
        # ~sqrt(d_model) (a JumpReLU threshold starts at 1: some latents fire from the start)
        encoder = unit(n, s, d, dims=(-1,)).transpose(1, 2)
        self.W_enc = nn.Parameter(encoder.contiguous().to(dtype))
        self.b_enc = nn.Parameter(torch.zeros(n, s, dtype=dtype))
        # each latent's decoder, all the layers it writes together, has norm decoder_init_norm
        self.W_dec = nn.ParameterList(
            nn.Parameter((unit(s, n - layer, d, dims=(1, 2)) * cfg.decoder_init_norm).to(dtype))
            for layer in range(n)
        )
        self.b_dec = nn.Parameter(torch.zeros(n, d, dtype=dtype))
        if cfg.activation == "jumprelu":
            start = math.log(cfg.jumprelu_init_threshold)
            self.log_threshold = nn.Parameter(torch.full((n, s), start, dtype=dtype))

    # --- files ------------------------------------------------------------------------
    def save(self, directory: str | Path) -> Path:
        """Write the CLT (circuit-tracer's files + ``mitk_clt.json``); see ``save_clt``."""
        from mitk.sae.crosslayer_files import save_clt  # files build on this module

        return save_clt(self, directory)

    @classmethod
    def load(
        cls, directory: str | Path, device: str | torch.device | None = None
    ) -> CrossLayerTranscoder:
        """Load a folder written by ``save`` or by circuit-tracer (see ``load_clt``)."""
        from mitk.sae.crosslayer_files import load_clt

        return load_clt(directory, device=device)

    # --- the maps ---------------------------------------------------------------------
    @property
    def threshold(self) -> Float[Tensor, "n_layers d_sae"]:
        """JumpReLU: each latent's threshold, ``exp(log_threshold)``."""
        return self.log_threshold.exp()

    def pre_activations(
        self, layer: int, x: Float[Tensor, "*batch d_model"]
    ) -> Float[Tensor, "*batch d_sae"]:
        """``x W_enc[layer] + b_enc[layer]``: what layer ``layer``'s activation reads."""
        self._check_layer(layer)
        self._check_width(x, self.cfg.d_model, "inputs")
        return x.to(self.W_enc.dtype) @ self.W_enc[layer] + self.b_enc[layer]

    def activate(
        self, layer: int, pre: Float[Tensor, "*batch d_sae"]
    ) -> Float[Tensor, "*batch d_sae"]:
        """Layer ``layer``'s activation of its pre-activations (TopK: per row)."""
        activation = self.cfg.activation
        if activation == "relu":
            return pre.relu()
        if activation == "jumprelu":
            return jumprelu(pre, self.threshold[layer], self.cfg.jumprelu_bandwidth)
        flat = pre.reshape(-1, pre.shape[-1])
        return topk_codes(flat, self.cfg.k).to_dense().view(pre.shape)

    def encode_layer(
        self, layer: int, x: Float[Tensor, "*batch d_model"]
    ) -> Float[Tensor, "*batch d_sae"]:
        """Layer ``layer``'s latent activations of its input ``x``."""
        return self.activate(layer, self.pre_activations(layer, x))

    def encode(
        self, x: Float[Tensor, "n_layers *batch d_model"]
    ) -> Float[Tensor, "n_layers *batch d_sae"]:
        """Every layer's latents from every layer's input (stacked on the first axis)."""
        self._check_stacked(x, self.cfg.d_model, "inputs")
        return torch.stack([self.encode_layer(layer, x[layer]) for layer in range(len(x))])

    def decode(
        self, latents: Float[Tensor, "n_layers *batch d_sae"]
    ) -> Float[Tensor, "n_layers *batch d_model"]:
        """Every layer's reconstructed MLP output from every layer's latents."""
        self._check_stacked(latents, self.cfg.d_sae, "latents")
        return self.decode_layers([latents[layer] for layer in range(len(latents))])

    def decode_layer(
        self, layer: int, latents: Sequence[Tensor]
    ) -> Float[Tensor, "*batch d_model"]:
        """Layer ``layer``'s reconstruction: ``b_dec[layer]`` plus every earlier layer's writes.

        ``latents[L]`` is layer L's ``[*batch, d_sae]``; only ``latents[0..layer]``
        are read, so a forward pass can reconstruct a layer as soon as it is encoded.
        """
        out = self.b_dec[layer]
        for source in range(layer + 1):
            weight = self.W_dec[source][:, layer - source]
            out = out + latents[source].to(weight.dtype) @ weight
        return out

    def decode_layers(
        self, latents: Sequence[Tensor], upto: int | None = None
    ) -> Float[Tensor, "n_out *batch d_model"]:
        """The reconstructions of layers ``0 .. upto - 1`` (default all), stacked."""
        upto = self.cfg.n_layers if upto is None else upto
        return torch.stack([self.decode_layer(layer, latents) for layer in range(upto)])

    def forward(
        self, x: Float[Tensor, "n_layers *batch d_model"]
    ) -> tuple[Float[Tensor, "n_layers *batch d_model"], Float[Tensor, "n_layers *batch d_sae"]]:
        """``(reconstruction, latents)`` of every layer's MLP output from every layer's input."""
        latents = self.encode(x)
        return self.decode(latents), latents

    def decoder_norms(self) -> Float[Tensor, "n_layers d_sae"]:
        """Each latent's decoder norm over every layer it writes (root of the sum of squares)."""
        return torch.stack([w.pow(2).sum((1, 2)).sqrt() for w in self.W_dec])

    @torch.no_grad()
    def normalize_decoder_(self) -> None:
        """Rescale each latent's decoder (over every layer it writes) to unit norm, in place."""
        for dec in self.W_dec:
            dec.div_(dec.norm(dim=(1, 2), keepdim=True).clamp_min(1e-12))

    @torch.no_grad()
    def remove_parallel_decoder_grad_(self) -> None:
        """Drop each latent's decoder-gradient component along its (unit) decoder.

        With ``normalize_decoder_`` after each step, Adam then moves directions only.
        """
        for dec in self.W_dec:
            if dec.grad is None:
                continue
            unit = dec / dec.norm(dim=(1, 2), keepdim=True).clamp_min(1e-12)
            dec.grad -= (dec.grad * unit).sum((1, 2), keepdim=True) * unit

    @torch.no_grad()
    def fold_scales_(self, input_scales: Sequence[float], output_scales: Sequence[float]) -> None:
        """Make a CLT trained on ``x_L / input_scales[L]`` and ``y_M / output_scales[M]`` read raw.

        Pre-activations (and so thresholds) are unchanged; every decoder slot and
        bias writing layer ``M`` is multiplied by ``output_scales[M]``.
        """
        n = self.cfg.n_layers
        if len(input_scales) != n or len(output_scales) != n:
            raise ShapeMismatchError(
                f"need {n} input and output scales, "
                f"got {len(input_scales)} and {len(output_scales)}"
            )
        inputs = torch.tensor(input_scales, dtype=self.W_enc.dtype)
        outputs = torch.tensor(output_scales, dtype=self.W_enc.dtype)
        self.W_enc.div_(inputs[:, None, None])
        self.b_dec.mul_(outputs[:, None])
        for layer, dec in enumerate(self.W_dec):
            dec.mul_(outputs[layer:, None])

    def _check_layer(self, layer: int) -> None:
        if not 0 <= layer < self.cfg.n_layers:
            raise IndexError(f"layer {layer} is not in this CLT's 0..{self.cfg.n_layers - 1}")

    def _check_width(self, x: Tensor, width: int, what: str) -> None:
        if x.shape[-1] != width:
            raise ShapeMismatchError(f"{what} have width {x.shape[-1]}, this CLT needs {width}")

    def _check_stacked(self, x: Tensor, width: int, what: str) -> None:
        if x.ndim < 2 or x.shape[0] != self.cfg.n_layers:
            raise ShapeMismatchError(
                f"{what} of shape {tuple(x.shape)}: "
                f"need [n_layers={self.cfg.n_layers}, ..., {width}]"
            )
        self._check_width(x, width, what)
