"""One layer of a cross-layer transcoder seen as a per-layer transcoder (its own-layer slot)."""

from __future__ import annotations

import torch

from mitk.sae.autoencoder import SparseAutoencoder
from mitk.sae.config import SAEConfig
from mitk.sae.crosslayer import CrossLayerTranscoder


@torch.no_grad()
def layer_transcoder(clt: CrossLayerTranscoder, layer: int) -> SparseAutoencoder:
    """Layer ``layer``'s latents of ``clt`` as a ``SparseAutoencoder`` transcoder (a copy).

    Its ``encode`` equals ``clt.encode_layer(layer, x)`` exactly, so everything
    built on single SAEs (``latent_statistics``, dashboards) shows a CLT layer's
    latents; its decoder is only the slot into ``layer`` itself, so its
    reconstruction leaves out what earlier layers' latents write there.
    """
    cfg = clt.cfg
    if not 0 <= layer < cfg.n_layers:
        raise IndexError(f"layer {layer} is not in this CLT's 0..{cfg.n_layers - 1}")
    sae_cfg = SAEConfig(
        d_in=cfg.d_model, d_sae=cfg.d_sae, architecture=cfg.activation, k=cfg.k,
        hook_name=cfg.input_hook_name(layer), target_hook_name=cfg.output_hook_name(layer),
        apply_b_dec_to_input=False, dtype=cfg.dtype, jumprelu_bandwidth=cfg.jumprelu_bandwidth,
    )  # fmt: skip
    sae = SparseAutoencoder(sae_cfg).to(clt.W_enc.device)
    sae.W_enc.copy_(clt.W_enc[layer])
    sae.b_enc.copy_(clt.b_enc[layer])
    sae.W_dec.copy_(clt.W_dec[layer][:, 0])
    sae.b_dec.copy_(clt.b_dec[layer])
    if cfg.activation == "jumprelu":
        sae.log_threshold.copy_(clt.log_threshold[layer])
    return sae
