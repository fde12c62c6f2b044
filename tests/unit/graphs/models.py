"""Tiny random models and per-layer transcoders with random weights, so that features fire."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from mitk import HookedTransformer, TransformerConfig
from mitk.sae import CLTConfig, CrossLayerTranscoder, SAEConfig, SparseAutoencoder

D_MODEL, D_SAE, N_LAYERS = 32, 48, 3


def model(kind: str = "gpt2", seed: int = 3) -> HookedTransformer:
    """A tiny random model of one of five kinds.

    ``gpt2`` (LayerNorm, learned positions), ``llama`` (RMSNorm, rotary, gated MLP),
    ``gqa`` (llama with 2 key-value heads), ``parallel`` (attention and MLP side by side),
    ``sandwich`` (Gemma-2's norms around each sublayer: graphs take the autograd path).
    """
    common = dict(d_model=D_MODEL, n_layers=N_LAYERS, n_heads=4, d_vocab=40, n_ctx=16)
    llama = dict(positional="rotary", normalization="rmsnorm", gated_mlp=True, act_fn="silu")
    variants: dict[str, dict[str, object]] = {
        "gpt2": {},
        "llama": llama,
        "gqa": {**llama, "n_key_value_heads": 2},
        "parallel": {"parallel_attn_mlp": True},
        "sandwich": {**llama, "sandwich_norms": True},
    }
    cfg = TransformerConfig(**common, **variants[kind])  # type: ignore[arg-type]
    built = HookedTransformer(cfg, seed=seed)
    with torch.no_grad():  # norm weights and biases away from 1 and 0, so that they matter
        gen = torch.Generator().manual_seed(seed + 1)
        for name, param in built.named_parameters():
            if name.endswith((".w", ".b")) or name.startswith("ln_final"):
                param.add_(torch.randn(param.shape, generator=gen) * 0.1)
            if name.endswith(("b_in", "b_out", "b_O", "b_o_param", "b_qkv")):
                param.add_(torch.randn(param.shape, generator=gen) * 0.05)
    return built


def transcoders(
    built: HookedTransformer,
    *,
    reads: str = "ln2.hook_normalized",
    architecture: str = "relu",
    skip: bool = False,
    seed: int = 0,
) -> list[SparseAutoencoder]:
    """A random transcoder per layer, reading ``blocks.L.<reads>``; a third of features fire."""
    gen = torch.Generator().manual_seed(seed)
    made = []
    for layer in range(built.cfg.n_layers):
        cfg = SAEConfig(
            d_in=built.cfg.d_model, d_sae=D_SAE, architecture=architecture,  # type: ignore[arg-type]
            hook_name=f"blocks.{layer}.{reads}", target_hook_name=f"blocks.{layer}.hook_mlp_out",
            skip_connection=skip, jumprelu_init_threshold=0.1,
        )  # fmt: skip
        sae = SparseAutoencoder(cfg)
        scale = 1.0 if reads == "ln2.hook_normalized" else 1.0 / _resid_scale(built, layer)
        with torch.no_grad():
            sae.W_enc.copy_(_randn(gen, D_MODEL, D_SAE) * scale / math.sqrt(D_MODEL) * 0.6)
            sae.b_enc.copy_(_randn(gen, D_SAE) * 0.1 - 0.25)
            sae.W_dec.copy_(_randn(gen, D_SAE, D_MODEL) * 0.05)
            sae.b_dec.copy_(_randn(gen, D_MODEL) * 0.01)
            if skip:
                sae.W_skip.copy_(_randn(gen, D_MODEL, D_MODEL) * 0.05)
        made.append(sae)
    return made


def cross_layer(
    built: HookedTransformer,
    *,
    reads: str = "ln2.hook_normalized",
    activation: str = "relu",
    seed: int = 0,
    cross: bool = True,
) -> CrossLayerTranscoder:
    """A random cross-layer transcoder, scaled as ``transcoders``; ``cross=False`` zeroes every
    decoder slot into a later layer (what remains is per-layer transcoders)."""
    n_layers = built.cfg.n_layers
    cfg = CLTConfig(
        n_layers=n_layers, d_model=D_MODEL, d_sae=D_SAE, activation=activation,  # type: ignore[arg-type]
        input_hook=reads, jumprelu_init_threshold=0.1,  # type: ignore[arg-type]
    )  # fmt: skip
    clt = CrossLayerTranscoder(cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in range(n_layers):
            scale = 1.0 if reads == "ln2.hook_normalized" else 1.0 / _resid_scale(built, layer)
            clt.W_enc[layer] = _randn(gen, D_MODEL, D_SAE) * scale / math.sqrt(D_MODEL) * 0.6
            clt.b_enc[layer] = _randn(gen, D_SAE) * 0.1 - 0.25
            clt.W_dec[layer].copy_(_randn(gen, D_SAE, n_layers - layer, D_MODEL) * 0.05)
            if not cross:
                clt.W_dec[layer][:, 1:] = 0
        clt.b_dec.copy_(_randn(gen, n_layers, D_MODEL) * 0.01)
    return clt


def prompt(length: int = 9, seed: int = 5) -> Tensor:
    return torch.randint(0, 40, (length,), generator=torch.Generator().manual_seed(seed))


def _randn(gen: torch.Generator, *shape: int) -> Tensor:
    return torch.randn(*shape, generator=gen)


def _resid_scale(built: HookedTransformer, layer: int) -> float:
    with torch.no_grad():
        _, cache = built.run_with_cache(prompt(), names_filter=f"blocks.{layer}.hook_resid_mid")
    return float(cache[f"blocks.{layer}.hook_resid_mid"].std())
