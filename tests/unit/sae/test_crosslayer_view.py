"""A CLT layer as a per-layer transcoder encodes exactly as the CLT does."""

from __future__ import annotations

import pytest
import torch

from mitk.sae import CLTConfig, CrossLayerTranscoder
from mitk.sae.crosslayer_view import layer_transcoder


@pytest.mark.parametrize("activation", ["relu", "jumprelu", "topk"])
def test_each_layer_encodes_as_the_clt_and_decodes_its_own_slot(activation: str) -> None:
    cfg = CLTConfig(n_layers=3, d_model=8, d_sae=12, activation=activation, k=3,  # type: ignore[arg-type]
                    input_hook="ln2.hook_normalized", jumprelu_init_threshold=0.3)  # fmt: skip
    clt = CrossLayerTranscoder(cfg)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # every parameter random, so that no term hides as zero
        for param in clt.parameters():
            param.copy_(torch.randn(param.shape, generator=gen) * 0.5)
    x = torch.randn(5, 8, generator=gen) * 2
    for layer in range(3):
        sae = layer_transcoder(clt, layer)
        assert sae.cfg.hook_name == f"blocks.{layer}.ln2.hook_normalized"
        assert sae.cfg.target_hook_name == f"blocks.{layer}.hook_mlp_out"
        latents = sae.encode(x)
        torch.testing.assert_close(latents, clt.encode_layer(layer, x), atol=0, rtol=0)
        assert 0 < int((latents != 0).sum()) < latents.numel()
        expected = latents @ clt.W_dec[layer][:, 0] + clt.b_dec[layer]
        torch.testing.assert_close(sae.decode(latents), expected)
    with pytest.raises(IndexError, match="layer 3"):
        layer_transcoder(clt, 3)
