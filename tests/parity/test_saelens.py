"""mitk against SAELens on the same SAE folders, in both directions.

SAELens writes a folder (``save_model``, or ``save_inference_model`` for what its
trainer ships); mitk loads it and must encode, decode and reconstruct as
SAELens does. Then mitk writes each architecture and SAELens loads it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any
import warnings

import pytest
import torch

from mitk.errors import ConfigError
from mitk.sae.autoencoder import SparseAutoencoder
from mitk.sae.config import SAEConfig
from mitk.sae.files import load_sae, save_sae

with warnings.catch_warnings():
    # sae_lens imports transformer_lens.utils, which transformer-lens 3 deprecates on import
    warnings.filterwarnings(
        "ignore", message="The 'utils' module has been deprecated", category=DeprecationWarning
    )
    import sae_lens
    from sae_lens import (
        SAE,
        BatchTopKTrainingSAE,
        BatchTopKTrainingSAEConfig,
        GatedSAE,
        GatedSAEConfig,
        JumpReLUSAE,
        JumpReLUSAEConfig,
        JumpReLUSkipTranscoder,
        JumpReLUSkipTranscoderConfig,
        JumpReLUTranscoder,
        JumpReLUTranscoderConfig,
        MatryoshkaBatchTopKTrainingSAE,
        MatryoshkaBatchTopKTrainingSAEConfig,
        SkipTranscoder,
        SkipTranscoderConfig,
        StandardSAE,
        StandardSAEConfig,
        TopKSAE,
        TopKSAEConfig,
        TopKTrainingSAE,
        TopKTrainingSAEConfig,
        Transcoder,
        TranscoderConfig,
    )
    from sae_lens.saes.sae import SAEMetadata

D_IN, D_SAE, K, D_OUT = 8, 24, 4, 6
TOL = 1e-5
WIDTHS = [3, 12, D_SAE]


def randomize(sae: Any, seed: int = 0) -> Any:
    """Give every parameter of a SAELens SAE random values (thresholds positive)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sae.named_parameters():
            values = torch.randn(param.shape, generator=gen)
            param.copy_(values.abs() * 0.5 if name == "threshold" else values)
    return sae


def x_batch() -> torch.Tensor:
    return torch.randn(5, 3, D_IN, generator=torch.Generator().manual_seed(1)) * 2


def assert_same(mitk_sae: SparseAutoencoder, reference: Any) -> None:
    """Encode, decode and forward agree with a SAELens SAE's on random inputs."""
    x = x_batch()
    with torch.no_grad():
        latents = reference.encode(x)
        assert (latents != 0).any() and (latents == 0).any()  # the gate did something
        torch.testing.assert_close(mitk_sae.encode(x), latents, rtol=TOL, atol=TOL)
        torch.testing.assert_close(
            mitk_sae.decode(latents), reference.decode(latents), rtol=TOL, atol=TOL
        )
        torch.testing.assert_close(mitk_sae(x).reconstruction, reference(x), rtol=TOL, atol=TOL)


def test_saelens_is_the_version_the_tests_pin() -> None:
    assert sae_lens.__version__.startswith("6.")


# --- SAELens writes, mitk reads ---------------------------------------------------------------
@pytest.mark.parametrize("apply_b_dec_to_input", [True, False])
def test_standard(tmp_path: Path, apply_b_dec_to_input: bool) -> None:
    cfg = StandardSAEConfig(d_in=D_IN, d_sae=D_SAE, apply_b_dec_to_input=apply_b_dec_to_input)
    reference = randomize(StandardSAE(cfg))
    reference.save_model(tmp_path)
    sae = load_sae(tmp_path)
    assert (sae.cfg.architecture, sae.cfg.apply_b_dec_to_input) == ("relu", apply_b_dec_to_input)
    assert_same(sae, reference)


def test_topk(tmp_path: Path) -> None:
    reference = randomize(TopKSAE(TopKSAEConfig(d_in=D_IN, d_sae=D_SAE, k=K)))
    reference.save_model(tmp_path)
    sae = load_sae(tmp_path)
    assert (sae.cfg.architecture, sae.cfg.k) == ("topk", K)
    assert_same(sae, reference)


def test_topk_training_checkpoint_with_decoder_norm_rescaling(tmp_path: Path) -> None:
    cfg = TopKTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=K, rescale_acts_by_decoder_norm=True)
    reference = randomize(TopKTrainingSAE(cfg))
    reference.save_model(tmp_path)  # what SAELens's trainer checkpoints: norms not folded
    sae = load_sae(tmp_path)
    assert torch.allclose(sae.decoder_norms(), torch.ones(D_SAE))
    assert_same(sae, reference)


def test_jumprelu(tmp_path: Path) -> None:
    reference = randomize(JumpReLUSAE(JumpReLUSAEConfig(d_in=D_IN, d_sae=D_SAE)))
    reference.save_model(tmp_path)
    sae = load_sae(tmp_path)
    assert sae.cfg.architecture == "jumprelu"
    torch.testing.assert_close(sae.threshold, reference.threshold, rtol=1e-6, atol=0)
    assert_same(sae, reference)


def batchtopk_training_sae() -> Any:
    cfg = BatchTopKTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=K)
    trained = randomize(BatchTopKTrainingSAE(cfg))
    trained.topk_threshold.fill_(0.7)  # as if estimated during training
    return trained


def test_batchtopk_as_saelens_ships_it(tmp_path: Path) -> None:
    batchtopk_training_sae().save_inference_model(tmp_path)  # a JumpReLU folder
    reference = SAE.load_from_disk(tmp_path)
    assert isinstance(reference, JumpReLUSAE)
    sae = load_sae(tmp_path)
    assert (sae.cfg.architecture, sae.cfg.k) == ("batchtopk", K)
    assert float(sae.batch_threshold) == pytest.approx(0.7)
    assert_same(sae, reference)


def test_batchtopk_training_checkpoint(tmp_path: Path) -> None:
    trained = batchtopk_training_sae()
    trained.save_model(tmp_path / "checkpoint")  # architecture "batchtopk", topk_threshold
    trained.save_inference_model(tmp_path / "shipped")
    sae = load_sae(tmp_path / "checkpoint")
    assert (sae.cfg.architecture, sae.cfg.k) == ("batchtopk", K)
    assert_same(sae, SAE.load_from_disk(tmp_path / "shipped"))


@pytest.mark.parametrize("apply_b_dec_to_input", [True, False])
def test_gated(tmp_path: Path, apply_b_dec_to_input: bool) -> None:
    cfg = GatedSAEConfig(d_in=D_IN, d_sae=D_SAE, apply_b_dec_to_input=apply_b_dec_to_input)
    reference = randomize(GatedSAE(cfg))
    reference.save_model(tmp_path)
    sae = load_sae(tmp_path)
    assert (sae.cfg.architecture, sae.cfg.apply_b_dec_to_input) == ("gated", apply_b_dec_to_input)
    assert_same(sae, reference)


def matryoshka_training_sae() -> Any:
    cfg = MatryoshkaBatchTopKTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=K,
                                               matryoshka_widths=list(WIDTHS))  # fmt: skip
    trained = randomize(MatryoshkaBatchTopKTrainingSAE(cfg))
    trained.topk_threshold.fill_(0.7)
    return trained


def test_matryoshka_as_saelens_ships_it(tmp_path: Path) -> None:
    matryoshka_training_sae().save_inference_model(tmp_path)  # a JumpReLU folder
    reference = SAE.load_from_disk(tmp_path)
    assert isinstance(reference, JumpReLUSAE)
    sae = load_sae(tmp_path)
    assert sae.cfg.architecture == "matryoshka_batchtopk"
    assert (sae.cfg.k, sae.cfg.matryoshka_widths) == (K, tuple(WIDTHS))
    assert float(sae.batch_threshold) == pytest.approx(0.7)
    assert_same(sae, reference)


def test_matryoshka_training_checkpoint(tmp_path: Path) -> None:
    trained = matryoshka_training_sae()
    trained.save_model(tmp_path / "checkpoint")  # architecture "matryoshka_batchtopk"
    trained.save_inference_model(tmp_path / "shipped")
    sae = load_sae(tmp_path / "checkpoint")
    assert (sae.cfg.architecture, sae.cfg.matryoshka_widths) == ("matryoshka_batchtopk",
                                                                 tuple(WIDTHS))  # fmt: skip
    assert_same(sae, SAE.load_from_disk(tmp_path / "shipped"))


TRANSCODERS = {
    "transcoder": (Transcoder, TranscoderConfig, "relu", False),
    "skip_transcoder": (SkipTranscoder, SkipTranscoderConfig, "relu", True),
    "jumprelu_transcoder": (JumpReLUTranscoder, JumpReLUTranscoderConfig, "jumprelu", False),
    "jumprelu_skip_transcoder": (JumpReLUSkipTranscoder, JumpReLUSkipTranscoderConfig, "jumprelu",
                                 True),
}  # fmt: skip


@pytest.mark.parametrize("name", list(TRANSCODERS))
def test_transcoders(tmp_path: Path, name: str) -> None:
    cls, cfg_cls, architecture, skip = TRANSCODERS[name]
    meta = SAEMetadata(
        hook_name="blocks.0.ln2.hook_normalized", hook_name_out="blocks.0.hook_mlp_out"
    )
    cfg = cfg_cls(d_in=D_IN, d_sae=D_SAE, d_out=D_OUT, apply_b_dec_to_input=False, metadata=meta)
    reference = randomize(cls(cfg))
    reference.save_model(tmp_path)
    sae = load_sae(tmp_path)
    got = (sae.cfg.architecture, sae.cfg.skip_connection, sae.cfg.d_out, sae.cfg.target_hook_name)
    assert got == (architecture, skip, D_OUT, "blocks.0.hook_mlp_out")
    assert_same(sae, reference)


def test_transcoder_without_its_output_hook_is_refused_by_name(tmp_path: Path) -> None:
    cfg = TranscoderConfig(d_in=D_IN, d_sae=D_SAE, d_out=D_OUT, apply_b_dec_to_input=False)
    randomize(Transcoder(cfg)).save_model(tmp_path)
    with pytest.raises(ConfigError, match="hook_name_out"):
        load_sae(tmp_path)


# --- mitk writes, SAELens reads ---------------------------------------------------------------
TRANSCODE = {"hook_name": "a", "target_hook_name": "b", "d_out": D_OUT}


@pytest.mark.parametrize(
    ("architecture", "extra", "saelens_class"),
    [
        ("relu", {}, StandardSAE),
        ("topk", {}, TopKSAE),
        ("jumprelu", {}, JumpReLUSAE),
        ("batchtopk", {}, JumpReLUSAE),
        ("gated", {}, GatedSAE),
        ("matryoshka_batchtopk", {"matryoshka_widths": tuple(WIDTHS)}, JumpReLUSAE),
        ("relu", TRANSCODE, Transcoder),
        ("relu", {**TRANSCODE, "skip_connection": True}, SkipTranscoder),
        ("jumprelu", TRANSCODE, JumpReLUTranscoder),
        ("jumprelu", {**TRANSCODE, "skip_connection": True}, JumpReLUSkipTranscoder),
        ("batchtopk", TRANSCODE, JumpReLUTranscoder),
    ],
    ids=["relu", "topk", "jumprelu", "batchtopk", "gated", "matryoshka", "transcoder",
         "skip_transcoder", "jumprelu_transcoder", "jumprelu_skip_transcoder",
         "batchtopk_transcoder"],
)  # fmt: skip
def test_saelens_loads_what_mitk_saves(
    tmp_path: Path, architecture: str, extra: dict[str, Any], saelens_class: type
) -> None:
    cfg = SAEConfig(d_in=D_IN, d_sae=D_SAE, architecture=architecture, k=K, **extra)  # type: ignore[arg-type]
    sae = SparseAutoencoder(cfg)
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for param in sae.parameters():
            param.copy_(torch.randn(param.shape, generator=gen))
        if architecture == "jumprelu":
            sae.log_threshold.copy_((torch.rand(D_SAE, generator=gen) * 0.8).log())
        if cfg.batch_level_k:
            sae.batch_threshold.fill_(0.6)
    reference = SAE.load_from_disk(save_sae(sae, tmp_path / "sae"))
    assert type(reference) is saelens_class
    assert_same(sae, reference)
