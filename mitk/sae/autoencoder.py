"""SparseAutoencoder: the module, its encode/decode, and the decoder-norm bookkeeping."""

from __future__ import annotations

from collections.abc import Mapping
import math
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from mitk.config import TORCH_DTYPES
from mitk.errors import ShapeMismatchError
from mitk.sae.codes import SparseCodes, batch_topk_codes, decode_sparse, jumprelu, topk_codes
from mitk.sae.config import SAEConfig
from mitk.shapes import Float, Int


class SAEOutput(NamedTuple):
    """What ``SparseAutoencoder.forward`` returns."""

    reconstruction: Float[Tensor, "*batch d_out"]
    latents: Float[Tensor, "*batch d_sae"]


class SparseAutoencoder(nn.Module):
    """A sparse autoencoder ``x -> f = act(x W_enc + b) -> x_hat = f W_dec + b_dec``.

    Parameters use SAELens's names and layout: ``W_enc [d_in, d_sae]``,
    ``W_dec [d_sae, d_out]`` (one row per latent), ``b_enc [d_sae]``, ``b_dec
    [d_out]``; JumpReLU adds ``threshold [d_sae]`` (learnt as ``log_threshold``),
    the BatchTopK family keeps one inference ``threshold`` (a buffer estimated
    during training). Gated SAEs replace ``b_enc`` by ``b_gate``, ``b_mag`` and
    ``r_mag [d_sae]``. A transcoder (``cfg.target_hook_name``) reconstructs
    another hook of width ``d_out``; a skip-transcoder adds ``x W_skip^T`` with
    ``W_skip [d_out, d_in]``. ``encode``, ``decode`` and ``forward`` accept any
    leading axes.
    """

    batch_threshold: Tensor  # BatchTopK family only
    log_threshold: nn.Parameter  # JumpReLU only
    b_gate: nn.Parameter  # gated only (with b_mag, r_mag)
    b_mag: nn.Parameter
    r_mag: nn.Parameter
    W_skip: nn.Parameter  # skip-transcoders only

    def __init__(self, cfg: SAEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        dtype = TORCH_DTYPES[cfg.dtype]
        gen = torch.Generator().manual_seed(cfg.seed)

        def directions(width: int) -> Tensor:  # d_sae random rows of norm decoder_init_norm
            rows = torch.randn(cfg.d_sae, width, generator=gen, dtype=torch.float64)
            return rows * (cfg.decoder_init_norm / rows.norm(dim=-1, keepdim=True))

        decoder = directions(cfg.d_out)
        # an SAE's encoder starts as the decoder's transpose; a transcoder's reads another
        # space, where the decoder's directions mean nothing, so it draws its own
        encoder = directions(cfg.d_in) if cfg.is_transcoder else decoder
        self.W_dec = nn.Parameter(decoder.to(dtype))
        self.W_enc = nn.Parameter(encoder.T.contiguous().to(dtype))
        zeros = torch.zeros(cfg.d_sae, dtype=dtype)
        if cfg.architecture == "gated":
            self.b_gate = nn.Parameter(zeros.clone())
            self.b_mag = nn.Parameter(zeros.clone())
            self.r_mag = nn.Parameter(zeros.clone())
        else:
            self.b_enc = nn.Parameter(zeros)
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_out, dtype=dtype))
        if cfg.skip_connection:
            self.W_skip = nn.Parameter(torch.zeros(cfg.d_out, cfg.d_in, dtype=dtype))
        if cfg.architecture == "jumprelu":
            start = math.log(cfg.jumprelu_init_threshold)
            self.log_threshold = nn.Parameter(torch.full((cfg.d_sae,), start, dtype=dtype))
        if cfg.batch_level_k:
            # NaN until training estimates it; encode refuses to guess
            self.register_buffer("batch_threshold", torch.tensor(float("nan"), dtype=dtype))

    # --- files ------------------------------------------------------------------------
    def save(self, directory: str | Path) -> Path:
        """Write ``sae_weights.safetensors`` + ``cfg.json``, a folder SAELens loads too."""
        from mitk.sae.files import save_sae  # files builds on this module

        return save_sae(self, directory)

    @classmethod
    def load(
        cls, directory: str | Path, device: str | torch.device | None = None
    ) -> SparseAutoencoder:
        """Load a folder written by ``save`` or by SAELens (safetensors only, never pickle)."""
        from mitk.sae.files import load_sae

        return load_sae(directory, device)

    @classmethod
    def from_pretrained(
        cls,
        release: str,
        sae_id: str,
        *,
        device: str | torch.device | None = None,
        registry: str | Path | Mapping[str, Any] | None = None,
        revision: str | None = None,
    ) -> SparseAutoencoder:
        """Load SAE ``sae_id`` of ``release`` from SAELens's registry, via the Hugging Face cache.

        ``registry``: a YAML file in SAELens's ``pretrained_saes.yaml`` format or its
        dict (default: the installed ``sae_lens``'s); offline, only the cache is read.
        See ``mitk.sae.pretrained.from_pretrained``.
        """
        from mitk.sae.pretrained import from_pretrained

        return from_pretrained(release, sae_id, device=device, registry=registry, revision=revision)

    def spliced(self, model: Any, hook_name: str | None = None, **options: Any) -> Any:
        """Context: the model runs with this SAE's reconstruction at the hook (see ``splice``)."""
        from mitk.sae.splice import spliced  # splice builds on this module

        return spliced(self, model, hook_name, **options)

    # --- the maps ---------------------------------------------------------------------
    def pre_activations(self, x: Float[Tensor, "batch d_in"]) -> Float[Tensor, "batch d_sae"]:
        """``(x - b_dec) W_enc + b_enc`` for 2-D ``x`` (gated: the gate's, with ``b_gate``).

        Written as ``x W_enc + (b_enc - b_dec W_enc)`` so that the gradient for
        ``b_dec`` is a matrix-vector product rather than a full ``[batch, d_in]``
        matmul; ``x`` itself never needs a gradient.
        """
        return torch.addmm(self.encoder_bias(), x, self.W_enc)

    def encoder_bias(self) -> Float[Tensor, " d_sae"]:
        """The bias of the encoder's affine map: ``b_enc - b_dec W_enc`` (or ``b_enc``).

        Gated SAEs use ``b_gate`` for ``b_enc``. A transcoder's ``b_dec`` lives in
        the output space, so it is never subtracted from the input (as in SAELens).
        """
        bias = self.b_gate if self.cfg.architecture == "gated" else self.b_enc
        if self.cfg.apply_b_dec_to_input and not self.cfg.is_transcoder:
            return bias - self.b_dec @ self.W_enc
        return bias

    def magnitudes(
        self, gate_pre: Float[Tensor, "*batch n"], latents: Int[Tensor, " n"] | None = None
    ) -> Float[Tensor, "*batch n"]:
        """Gated: the magnitude path's pre-activations from the gate's.

        ``pi_mag = (x - b_dec) (W_enc * exp(r_mag)) + b_mag``, which is
        ``(pi_gate - b_gate) * exp(r_mag) + b_mag``: no second matmul. With
        ``latents``, ``gate_pre`` holds gathered entries of those latents.
        """
        b_gate: Tensor = self.b_gate
        b_mag: Tensor = self.b_mag
        r_mag: Tensor = self.r_mag
        if latents is not None:
            b_gate, b_mag, r_mag = (v.index_select(0, latents) for v in (b_gate, b_mag, r_mag))
        return torch.addcmul(b_mag, gate_pre - b_gate, r_mag.exp())

    def encode(self, x: Float[Tensor, "*batch d_in"]) -> Float[Tensor, "*batch d_sae"]:
        """Latent activations ``f`` (dense), with the inference-time rule of each architecture.

        The BatchTopK family (Matryoshka included) encodes with its estimated
        threshold here, as Bussmann et al. prescribe (the batch-level rule only
        applies in training); it raises if the SAE was never trained.
        """
        flat = self._flat_input(x)
        pre = self.pre_activations(flat)
        arch = self.cfg.architecture
        if arch == "relu":
            latents = pre.relu()
        elif arch == "gated":
            latents = self.magnitudes(pre).relu() * (pre > 0)
        elif arch == "jumprelu":
            latents = jumprelu(pre, self.threshold, self.cfg.jumprelu_bandwidth)
        elif arch == "topk":
            latents = topk_codes(pre, self.cfg.k).to_dense()
        else:
            theta = self.batch_threshold
            if torch.isnan(theta):
                raise RuntimeError(
                    "this BatchTopK SAE has no inference threshold yet; train it first "
                    "(or set sae.batch_threshold)"
                )
            latents = pre * (pre > theta)
        return latents.view(*x.shape[:-1], self.cfg.d_sae)

    def decode(self, latents: Float[Tensor, "*batch d_sae"]) -> Float[Tensor, "*batch d_out"]:
        """Reconstruction ``f W_dec + b_dec`` (a skip-transcoder's skip term is not in it)."""
        if latents.shape[-1] != self.cfg.d_sae:
            raise ShapeMismatchError(
                f"latents have width {latents.shape[-1]}, this SAE has d_sae={self.cfg.d_sae}"
            )
        return latents @ self.W_dec + self.b_dec

    def skip(self, x: Float[Tensor, "*batch d_in"]) -> Float[Tensor, "*batch d_out"] | None:
        """Skip-transcoders: the linear skip ``x W_skip^T``; ``None`` for every other SAE."""
        if not self.cfg.skip_connection:
            return None
        return x.to(self.W_skip.dtype) @ self.W_skip.T

    def forward(self, x: Float[Tensor, "*batch d_in"]) -> SAEOutput:
        """Encode then decode (plus the skip term): ``SAEOutput(reconstruction, latents)``."""
        latents = self.encode(x)
        reconstruction = self.decode(latents)
        skip = self.skip(x)
        if skip is not None:
            reconstruction = reconstruction + skip
        return SAEOutput(reconstruction, latents)

    def training_codes(self, pre: Float[Tensor, "batch d_sae"]) -> SparseCodes:
        """TopK-family codes of a training batch (BatchTopK picks across the whole batch)."""
        if self.cfg.architecture == "topk":
            return topk_codes(pre, self.cfg.k)
        if self.cfg.batch_level_k:
            return batch_topk_codes(pre, self.cfg.k)
        raise ValueError(f"{self.cfg.architecture!r} SAEs have dense codes")

    def decode_codes(self, codes: SparseCodes) -> Float[Tensor, "batch d_out"]:
        """Decode sparse codes, touching only the active decoder rows."""
        return decode_sparse(codes, self.W_dec, self.b_dec)

    @property
    def threshold(self) -> Float[Tensor, " d_sae"]:
        """JumpReLU: each latent's threshold, ``exp(log_threshold)``."""
        return self.log_threshold.exp()

    # --- decoder geometry ---------------------------------------------------------------
    def decoder_norms(self) -> Float[Tensor, " d_sae"]:
        """L2 norm of each latent's decoder row."""
        return self.W_dec.norm(dim=-1)

    @torch.no_grad()
    def normalize_decoder_(self) -> None:
        """Rescale every decoder row to unit norm (in place)."""
        self.W_dec.div_(self.W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-12))

    @torch.no_grad()
    def remove_parallel_decoder_grad_(self) -> None:
        """Drop the gradient component along each (unit) decoder row, so Adam keeps the norm."""
        grad = self.W_dec.grad
        if grad is None:
            return
        unit = self.W_dec / self.W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        grad -= (grad * unit).sum(-1, keepdim=True) * unit

    @torch.no_grad()
    def fold_input_scale_(self, scale: float, output_scale: float | None = None) -> None:
        """Absorb input scalings: trained on ``x * scale``, afterwards read raw ``x``.

        ``W_enc *= scale``, ``W_dec /= output_scale`` and ``b_dec /= output_scale``
        leave every latent unchanged and return reconstructions in the raw units
        (``W_skip *= scale / output_scale`` does the same for the skip term).
        ``output_scale`` is the target's factor for a transcoder (default: ``scale``).
        """
        output_scale = scale if output_scale is None else output_scale
        for value in (scale, output_scale):
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"scales must be finite and positive, got {value}")
        self.W_enc.mul_(scale)
        self.W_dec.div_(output_scale)
        self.b_dec.div_(output_scale)
        if self.cfg.skip_connection:
            self.W_skip.mul_(scale / output_scale)

    def _flat_input(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.cfg.d_in:
            raise ShapeMismatchError(
                f"input has width {x.shape[-1]}, this SAE has d_in={self.cfg.d_in}"
                + (f" (hook {self.cfg.hook_name})" if self.cfg.hook_name else "")
            )
        return x.reshape(-1, self.cfg.d_in).to(self.W_enc.dtype)
