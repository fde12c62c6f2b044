"""SAE folders: exact round trips, atomic writes, SAELens-style configs and clear refusals."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
import pytest
from safetensors.torch import load_file, save_file
import torch

from mitk.errors import ConfigError, MitkError, ShapeMismatchError, UnsupportedModelError
from mitk.sae import files
from mitk.sae.autoencoder import SparseAutoencoder
from mitk.sae.config import SAEConfig
from mitk.sae.files import EXACT_FILE, load_sae, save_sae
from mitk.sae.saelens_format import CONFIG_FILE, WEIGHTS_FILE

ARCHITECTURES = ["relu", "topk", "batchtopk", "jumprelu"]
TRANSCODER = {"target_hook_name": "blocks.0.hook_mlp_out", "d_out": 5}
SKIP = {**TRANSCODER, "skip_connection": True}
CASES: dict[str, tuple[str, dict[str, Any]]] = {
    **{arch: (arch, {}) for arch in ARCHITECTURES},
    "gated": ("gated", {}),
    "matryoshka": ("matryoshka_batchtopk", {"matryoshka_widths": (2, 5, 10)}),
    "transcoder": ("relu", TRANSCODER),
    "skip_transcoder": ("relu", SKIP),
    "jumprelu_skip_transcoder": ("jumprelu", SKIP),
    "matryoshka_transcoder": ("matryoshka_batchtopk", TRANSCODER),
    "topk_skip_transcoder": ("topk", SKIP),  # no SAELens equivalent: mitk reads it alone
    "gated_transcoder": ("gated", TRANSCODER),
}


def random_sae(architecture: str, dtype: str = "float32", **changes: Any) -> SparseAutoencoder:
    """An SAE with random weights, biases and thresholds (as if trained)."""
    cfg = SAEConfig(
        d_in=6,
        d_sae=10,
        architecture=architecture,
        k=3,
        dtype=dtype,
        hook_name="blocks.0.hook_resid_pre",
    ).replace(**changes)
    sae = SparseAutoencoder(cfg)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for param in sae.parameters():
            param.copy_(torch.randn(param.shape, generator=gen))
        if architecture == "jumprelu":
            sae.log_threshold.copy_(torch.rand(cfg.d_sae, generator=gen).log())
        if cfg.batch_level_k:
            sae.batch_threshold.fill_(0.25)
    return sae


def inputs(d_in: int = 6) -> torch.Tensor:
    return torch.randn(4, 3, d_in, generator=torch.Generator().manual_seed(3))


def read_cfg(folder: Path) -> dict[str, Any]:
    return json.loads((folder / CONFIG_FILE).read_text())


def write_cfg(folder: Path, raw: dict[str, Any]) -> None:
    (folder / CONFIG_FILE).write_text(json.dumps(raw))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("case", list(CASES))
def test_every_architecture_round_trips_exactly(tmp_path: Path, case: str, dtype: str) -> None:
    architecture, changes = CASES[case]
    sae = random_sae(architecture, dtype, **changes)
    folder = save_sae(sae, tmp_path / "sae")
    loaded = load_sae(folder)
    assert loaded.cfg == sae.cfg
    before, after = sae.state_dict(), loaded.state_dict()
    assert before.keys() == after.keys()
    for name in before:
        assert after[name].dtype == before[name].dtype, name
        assert torch.equal(after[name], before[name]), name
    x = inputs()
    assert torch.equal(loaded.encode(x), sae.encode(x))
    assert torch.equal(loaded(x).reconstruction, sae(x).reconstruction)


def test_saved_config_has_saelens_keys_and_the_exact_mitk_config(tmp_path: Path) -> None:
    sae = random_sae("topk", apply_b_dec_to_input=False, lr=1e-3)
    raw = read_cfg(save_sae(sae, tmp_path / "sae"))
    assert raw["architecture"] == "topk" and raw["k"] == 3
    assert (raw["d_in"], raw["d_sae"], raw["dtype"]) == (6, 10, "float32")
    assert raw["apply_b_dec_to_input"] is False
    assert raw["normalize_activations"] == "none" and raw["reshape_activations"] == "none"
    assert raw["metadata"]["hook_name"] == "blocks.0.hook_resid_pre"
    assert SAEConfig.from_dict(raw["mitk"]) == sae.cfg


def test_batchtopk_is_written_as_a_uniform_jumprelu_threshold(tmp_path: Path) -> None:
    folder = save_sae(random_sae("batchtopk"), tmp_path / "sae")
    raw = read_cfg(folder)
    assert raw["architecture"] == "jumprelu"
    assert raw["metadata"]["training_architecture"] == "batchtopk"
    assert torch.equal(load_file(folder / WEIGHTS_FILE)["threshold"], torch.full((10,), 0.25))


def test_untrained_batchtopk_round_trips_its_missing_threshold(tmp_path: Path) -> None:
    sae = SparseAutoencoder(SAEConfig(d_in=6, d_sae=10, architecture="batchtopk", k=3))
    loaded = load_sae(save_sae(sae, tmp_path / "sae"))
    assert torch.isnan(loaded.batch_threshold)
    with pytest.raises(RuntimeError, match="no inference threshold"):
        loaded.encode(inputs())


def test_mitk_folders_keep_values_saelens_would_clamp(tmp_path: Path) -> None:
    sae = random_sae("batchtopk")
    sae.batch_threshold.fill_(-0.5)  # legal in mitk; the SAELens view gates it at 0
    loaded = load_sae(save_sae(sae, tmp_path / "sae"))
    assert float(loaded.batch_threshold) == -0.5


def test_hook_z_saes_are_marked_for_saelens_to_flatten_heads(tmp_path: Path) -> None:
    sae = random_sae("relu", hook_name="blocks.0.attn.hook_z")
    folder = save_sae(sae, tmp_path / "sae")
    assert read_cfg(folder)["reshape_activations"] == "hook_z"
    raw = read_cfg(folder)
    del raw["mitk"]  # read it as a SAELens folder
    write_cfg(folder, raw)
    assert load_sae(folder).cfg.hook_name == "blocks.0.attn.hook_z"


def test_load_moves_to_the_device_and_keeps_parameters_trainable(tmp_path: Path) -> None:
    loaded = load_sae(save_sae(random_sae("jumprelu"), tmp_path / "sae"), device="cpu")
    assert all(p.requires_grad and p.device.type == "cpu" for p in loaded.parameters())
    loaded(inputs()).reconstruction.sum().backward()
    assert loaded.W_enc.grad is not None


def test_jumprelu_without_the_exact_file_loads_the_saelens_threshold(tmp_path: Path) -> None:
    sae = random_sae("jumprelu")
    folder = save_sae(sae, tmp_path / "sae")
    (folder / EXACT_FILE).unlink()
    loaded = load_sae(folder)
    torch.testing.assert_close(loaded.threshold, sae.threshold, rtol=1e-6, atol=0)


# --- atomic writing ---------------------------------------------------------------------------
def test_failed_save_leaves_no_folder_and_no_temp_files(tmp_path: Path, monkeypatch: Any) -> None:
    def broken(*args: Any, **kwargs: Any) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(files, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        save_sae(random_sae("relu"), tmp_path / "sae")
    assert list(tmp_path.iterdir()) == []


def test_failed_overwrite_keeps_the_old_folder_whole(tmp_path: Path, monkeypatch: Any) -> None:
    old = random_sae("relu")
    folder = save_sae(old, tmp_path / "sae")
    monkeypatch.setattr(files, "save_file", lambda *a, **k: (_ for _ in ()).throw(OSError("boom")))
    with pytest.raises(OSError, match="boom"):
        save_sae(random_sae("topk"), folder)
    assert [p.name for p in tmp_path.iterdir()] == ["sae"]
    assert load_sae(folder).cfg == old.cfg


def test_overwrite_replaces_the_folder(tmp_path: Path) -> None:
    folder = save_sae(random_sae("jumprelu"), tmp_path / "sae")
    new = random_sae("relu", d_sae=12)
    save_sae(new, folder)
    assert sorted(p.name for p in folder.iterdir()) == sorted([WEIGHTS_FILE, CONFIG_FILE])
    assert load_sae(folder).cfg == new.cfg
    assert [p.name for p in tmp_path.iterdir()] == ["sae"]


def test_save_refuses_to_replace_a_folder_with_other_files(tmp_path: Path) -> None:
    (tmp_path / "sae").mkdir()
    (tmp_path / "sae" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match=r"notes\.txt"):
        save_sae(random_sae("relu"), tmp_path / "sae")
    assert (tmp_path / "sae" / "notes.txt").read_text() == "keep me"


# --- refusals ---------------------------------------------------------------------------------
def test_missing_folder_and_files_are_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no SAE folder"):
        load_sae(tmp_path / "nowhere")
    folder = save_sae(random_sae("relu"), tmp_path / "sae")
    (folder / CONFIG_FILE).unlink()
    with pytest.raises(FileNotFoundError, match=CONFIG_FILE):
        load_sae(folder)
    (folder / WEIGHTS_FILE).unlink()
    with pytest.raises(FileNotFoundError, match=WEIGHTS_FILE):
        load_sae(folder)


@pytest.mark.parametrize("name", ["sae_weights.pt", "pytorch_model.bin"])
def test_pickle_weights_are_refused(tmp_path: Path, name: str) -> None:
    (tmp_path / name).write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(UnsupportedModelError, match="unpickling can execute code"):
        load_sae(tmp_path)


def test_tensor_shape_that_disagrees_with_the_config_is_refused(tmp_path: Path) -> None:
    folder = save_sae(random_sae("relu"), tmp_path / "sae")
    raw = read_cfg(folder)
    raw["d_in"] = raw["mitk"]["d_in"] = raw["mitk"]["d_out"] = 7
    write_cfg(folder, raw)
    with pytest.raises(ShapeMismatchError, match=r"W_enc has shape \(6, 10\).*\(7, 10\)"):
        load_sae(folder)


def test_config_edited_on_one_side_only_is_refused(tmp_path: Path) -> None:
    folder = save_sae(random_sae("topk"), tmp_path / "sae")
    raw = read_cfg(folder)
    raw["k"] = 5
    write_cfg(folder, raw)
    with pytest.raises(ConfigError, match="k=5 disagrees"):
        load_sae(folder)


def test_exact_threshold_file_that_disagrees_is_refused(tmp_path: Path) -> None:
    folder = save_sae(random_sae("jumprelu"), tmp_path / "sae")
    save_file({"log_threshold": torch.zeros(10)}, folder / EXACT_FILE)
    with pytest.raises(ConfigError, match="different JumpReLU thresholds"):
        load_sae(folder)


def test_missing_and_extra_tensors_are_named(tmp_path: Path) -> None:
    folder = save_sae(random_sae("relu"), tmp_path / "sae")
    tensors = load_file(folder / WEIGHTS_FILE)
    save_file({**tensors, "b_gate": torch.zeros(10)}, folder / WEIGHTS_FILE)
    with pytest.raises(ConfigError, match="b_gate"):
        load_sae(folder)
    del tensors["b_enc"]
    save_file(tensors, folder / WEIGHTS_FILE)
    with pytest.raises(ConfigError, match="lacks the tensor 'b_enc'"):
        load_sae(folder)


# --- SAELens-style folders written by hand (the real SAELens is in tests/parity) -------------
def saelens_folder(folder: Path, raw: dict[str, Any], **tensors: torch.Tensor) -> Path:
    gen = torch.Generator().manual_seed(5)
    d_in, d_sae = raw["d_in"], raw["d_sae"]
    weights = {
        "W_enc": torch.randn(d_in, d_sae, generator=gen),
        "W_dec": torch.randn(d_sae, d_in, generator=gen),
        "b_enc": torch.randn(d_sae, generator=gen),
        "b_dec": torch.randn(d_in, generator=gen),
        **tensors,
    }
    folder.mkdir()
    save_file(weights, folder / WEIGHTS_FILE)
    write_cfg(folder, raw)
    return folder


def test_old_saelens_topk_keys_are_read(tmp_path: Path) -> None:
    raw = {
        "d_in": 6,
        "d_sae": 10,
        "dtype": "torch.float32",
        "hook_point": "blocks.1.hook_resid_post",
        "activation_fn_str": "topk",
        "activation_fn_kwargs": {"k": 4},
        "normalize_activations": False,
    }
    sae = load_sae(saelens_folder(tmp_path / "old", raw, scaling_factor=torch.ones(10)))
    assert (sae.cfg.architecture, sae.cfg.k, sae.cfg.hook_name) == (
        "topk", 4, "blocks.1.hook_resid_post",
    )  # fmt: skip
    assert ((sae.encode(inputs()) > 0).sum(-1) <= 4).all()


def test_negative_jumprelu_thresholds_act_as_zero(tmp_path: Path) -> None:
    raw = {
        "architecture": "jumprelu",
        "d_in": 6,
        "d_sae": 10,
        "metadata": {"sae_lens_version": "6.1.0"},
    }
    threshold = torch.linspace(-1, 1, 10)
    folder = saelens_folder(tmp_path / "jr", raw, threshold=threshold)
    sae = load_sae(folder)
    w = load_file(folder / WEIGHTS_FILE)
    x = inputs()
    pre = (x - w["b_dec"]) @ w["W_enc"] + w["b_enc"]
    expected = pre.relu() * (pre > threshold)  # SAELens's JumpReLU gate
    torch.testing.assert_close(sae.encode(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"architecture": "temporal"}, "architecture 'temporal'"),
        ({"normalize_activations": "layer_norm"}, "normalize_activations='layer_norm'"),
        ({"normalize_activations": "expected_average_only_in"}, "normalize_activations"),
        ({"metadata": {"hook_head_index": 2}}, "hook_head_index=2"),
        ({"finetuning_scaling_factor": True}, "finetuning_scaling_factor"),
        ({"dtype": "int8"}, "dtype must be one of"),
        ({"architecture": "topk", "k": 2.5}, "k must be a whole number"),
    ],
)
def test_saelens_settings_mitk_cannot_reproduce_are_refused(
    tmp_path: Path, change: dict[str, Any], field: str
) -> None:
    raw = {"architecture": "standard", "d_in": 6, "d_sae": 10, **change}
    with pytest.raises(ConfigError, match=field):
        load_sae(saelens_folder(tmp_path / "s", raw))


def test_saelens_scaling_factor_other_than_one_is_refused(tmp_path: Path) -> None:
    raw = {"architecture": "standard", "d_in": 6, "d_sae": 10, "finetuning_scaling_factor": True}
    folder = saelens_folder(tmp_path / "s", raw, scaling_factor=torch.full((10,), 2.0))
    with pytest.raises(ConfigError, match="finetuning_scaling_factor"):
        load_sae(folder)


@settings(max_examples=60)
@given(
    name=st.sampled_from([WEIGHTS_FILE, CONFIG_FILE]),
    cut=st.floats(0.0, 0.99),
    flips=st.lists(st.tuples(st.floats(0.0, 0.999), st.integers(1, 255)), max_size=4),
    junk=st.binary(max_size=64),
)
def test_damaged_sae_folders_raise_mitk_errors_naming_the_file(
    tmp_path_factory: pytest.TempPathFactory, name: str, cut: float,
    flips: list[tuple[float, int]], junk: bytes,
) -> None:  # fmt: skip
    """Truncated, bit-flipped or garbage files: a MitkError naming the file, or a clean load."""
    folder = save_sae(random_sae("topk"), tmp_path_factory.mktemp("sae") / "sae")
    path = folder / name
    data = bytearray(path.read_bytes())
    for where, mask in flips:
        data[int(where * len(data))] ^= mask
    path.write_bytes(bytes(data[: max(1, int(len(data) * (1 - cut)))]) + junk)
    try:
        load_sae(folder)
    except MitkError as err:
        assert name in str(err) or "cfg.json" in str(err) or "W_" in str(err) or "b_" in str(err)
