"""CrossLayerTranscoder and its files: decoding vs a loop oracle, scale folding, the format."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
import tempfile
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
import pytest
from safetensors.torch import load_file, save_file
import torch
import yaml

from mitk.errors import ConfigError, ModelFileError, ShapeMismatchError, UnsupportedModelError
from mitk.sae import CLTConfig, CrossLayerTranscoder, load_clt, save_clt

ACTIVATIONS = ["relu", "jumprelu", "topk"]
NAMED_ERRORS = (ConfigError, ShapeMismatchError, UnsupportedModelError, ModelFileError)


def random_clt(
    activation: str = "jumprelu", n_layers: int = 3, seed: int = 0
) -> CrossLayerTranscoder:
    """A CLT whose every parameter (biases, thresholds) is random, so no term hides as zero."""
    cfg = CLTConfig(n_layers=n_layers, d_model=8, d_sae=6, activation=activation, k=2)  # type: ignore[arg-type]
    clt = CrossLayerTranscoder(cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in clt.parameters():
            param.copy_(torch.randn(param.shape, generator=gen) * 0.5)
    return clt


def test_decode_matches_a_loop_over_source_and_target_layers() -> None:
    clt = random_clt()
    latents = torch.randn(3, 5, 6, generator=torch.Generator().manual_seed(1))
    expected = torch.stack([
        clt.b_dec[target] + sum(latents[source] @ clt.W_dec[source][:, target - source]
                                for source in range(target + 1))
        for target in range(3)
    ])  # fmt: skip
    torch.testing.assert_close(clt.decode(latents), expected)
    partial = clt.decode_layers(list(latents), upto=2)
    torch.testing.assert_close(partial, expected[:2])


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_encode_matches_its_definition(activation: str) -> None:
    clt = random_clt(activation)
    x = torch.randn(3, 5, 8, generator=torch.Generator().manual_seed(2))
    for layer in range(3):
        pre = x[layer] @ clt.W_enc[layer] + clt.b_enc[layer]
        if activation == "relu":
            want = pre.relu()
        elif activation == "jumprelu":
            want = pre * (pre > clt.threshold[layer])
        else:
            top = pre.topk(2, dim=-1)
            want = torch.zeros_like(pre).scatter(-1, top.indices, top.values.relu())
        torch.testing.assert_close(clt.encode(x)[layer], want)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_folded_scales_make_raw_inputs_equal_normalised_ones(activation: str) -> None:
    clt = random_clt(activation)
    inputs, outputs = [0.5, 2.0, 3.0], [4.0, 0.25, 1.5]
    x = torch.randn(3, 5, 8, generator=torch.Generator().manual_seed(3))
    normalised = torch.stack([x[layer] / inputs[layer] for layer in range(3)])
    recon, latents = clt(normalised)
    clt.fold_scales_(inputs, outputs)
    raw_recon, raw_latents = clt(x)
    torch.testing.assert_close(raw_latents, latents)
    torch.testing.assert_close(raw_recon, recon * torch.tensor(outputs)[:, None, None])


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_save_load_round_trip_keeps_every_output(tmp_path: Path, activation: str) -> None:
    clt = random_clt(activation)
    if activation == "jumprelu":  # thresholds are saved as exp(log_threshold), which must be >= 0
        assert bool((clt.threshold > 0).all())
    save_clt(clt, tmp_path / "clt")
    loaded = load_clt(tmp_path / "clt")
    assert loaded.cfg == clt.cfg
    x = torch.randn(3, 5, 8, generator=torch.Generator().manual_seed(4))
    for got, want in zip(loaded(x), clt(x), strict=True):
        torch.testing.assert_close(got, want)
    for name, tensor in clt.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], tensor, msg=name)


def test_folder_is_circuit_tracers_clt_format(tmp_path: Path) -> None:
    clt = random_clt("jumprelu")
    folder = save_clt(clt, tmp_path / "clt", scan="my-scan")
    names = sorted(p.name for p in folder.iterdir())
    assert names == sorted(["config.yaml", "mitk_clt.json"] + [
        f"W_{part}_{layer}.safetensors" for layer in range(3) for part in ("enc", "dec")
    ])  # fmt: skip
    assert yaml.safe_load((folder / "config.yaml").read_text()) == {
        "model_kind": "cross_layer_transcoder",
        "feature_input_hook": "hook_resid_mid",
        "feature_output_hook": "hook_mlp_out",
        "scan": "my-scan",
    }
    for layer in range(3):
        encoder = load_file(folder / f"W_enc_{layer}.safetensors")
        assert {name: tuple(t.shape) for name, t in encoder.items()} == {
            f"W_enc_{layer}": (6, 8),
            f"b_enc_{layer}": (6,),
            f"b_dec_{layer}": (8,),
            f"threshold_{layer}": (6,),
        }
        torch.testing.assert_close(encoder[f"W_enc_{layer}"], clt.W_enc[layer].T.detach())
        decoder = load_file(folder / f"W_dec_{layer}.safetensors")
        assert {name: tuple(t.shape) for name, t in decoder.items()} == {
            f"W_dec_{layer}": (6, 3 - layer, 8)
        }
    # without mitk's own config it is read as circuit-tracer wrote it: thresholds mean JumpReLU
    (folder / "mitk_clt.json").unlink()
    assert load_clt(folder / "config.yaml").cfg.activation == "jumprelu"


def test_relu_without_thresholds_and_topk_without_config_yaml(tmp_path: Path) -> None:
    relu = save_clt(random_clt("relu"), tmp_path / "relu")
    assert "threshold_0" not in load_file(relu / "W_enc_0.safetensors")
    (relu / "mitk_clt.json").unlink()
    assert load_clt(relu).cfg.activation == "relu"
    topk = save_clt(random_clt("topk"), tmp_path / "topk")
    assert not (topk / "config.yaml").exists()  # circuit-tracer would read it as ReLU
    assert load_clt(topk).cfg.k == 2


def _edit(file: Path, change: Any) -> None:
    tensors = dict(load_file(file))
    change(tensors)
    save_file(tensors, file)


def _negative_threshold(t: dict[str, torch.Tensor]) -> None:
    t["threshold_1"] = -t["threshold_1"].abs() - 0.1


REFUSALS: dict[str, tuple[Any, type[Exception], str]] = {
    "missing layer file": (lambda f: (f / "W_dec_1.safetensors").unlink(), ConfigError,
                           "W_dec_1.safetensors"),
    "unknown tensor": (lambda f: _edit(f / "W_enc_2.safetensors",
                                       lambda t: t.update(extra=torch.zeros(2))),
                       ConfigError, "'extra'"),
    "wrong shape": (lambda f: _edit(f / "W_enc_1.safetensors",
                                    lambda t: t.update(b_enc_1=torch.zeros(7))),
                    ShapeMismatchError, "b_enc_1"),
    "negative threshold": (lambda f: _edit(f / "W_enc_1.safetensors", _negative_threshold),
                           UnsupportedModelError, "threshold_1"),
    "mitk_clt.json disagrees": (
        lambda f: (f / "mitk_clt.json").write_text(
            json.dumps({**json.loads((f / "mitk_clt.json").read_text()), "d_sae": 5})),
        ConfigError, "d_sae"),
    "config.yaml of another kind": (
        lambda f: (f / "config.yaml").write_text(
            "model_kind: transcoder_set\nfeature_input_hook: hook_resid_mid\n"
            "feature_output_hook: hook_mlp_out\n"),
        ConfigError, "model_kind"),
    "not a safetensors file": (lambda f: (f / "W_dec_2.safetensors").write_bytes(b"junk"),
                               ModelFileError, "W_dec_2"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(REFUSALS))
def test_malformed_folders_are_refused_by_name(tmp_path: Path, case: str) -> None:
    damage, error, named = REFUSALS[case]
    folder = save_clt(random_clt("jumprelu"), tmp_path / "clt")
    damage(folder)
    with pytest.raises(error, match=named):
        load_clt(folder)


def test_oversize_files_are_refused_before_reading(tmp_path: Path) -> None:
    folder = save_clt(random_clt("relu"), tmp_path / "clt")
    with pytest.raises(ConfigError, match="max_file_bytes=100"):
        load_clt(folder, max_file_bytes=100)


# --- any corrupted folder: a named mitk error or a CLT, never anything else ------------------
_NAMES = st.sampled_from(["W_enc_{}", "b_enc_{}", "b_dec_{}", "threshold_{}", "W_dec_{}", "x"])
_DTYPES = st.sampled_from([torch.float32, torch.float16, torch.int64, torch.bool])
_SHAPES = st.lists(st.integers(0, 4), max_size=3)
_TENSORS = st.dictionaries(_NAMES, st.tuples(_SHAPES, _DTYPES), max_size=5)
_FILE = st.one_of(st.binary(max_size=32), _TENSORS)
_FOLDERS = st.dictionaries(
    st.tuples(st.sampled_from(["enc", "dec"]), st.integers(0, 3)), _FILE, min_size=1, max_size=6
)
_YAML = st.none() | st.sampled_from([
    "model_kind: cross_layer_transcoder\nfeature_input_hook: hook_resid_mid\n"
    "feature_output_hook: hook_mlp_out\n",
    "model_kind: cross_layer_transcoder\nfeature_input_hook: hook_resid_pre\n",
    "[1, 2", "- a\n- b\n", "model_kind: 3\n",
])  # fmt: skip
_JSON = st.none() | st.sampled_from([
    "{}", "[]", "null", '{"n_layers": 2, "d_model": 4, "d_sae": 3}',
    '{"n_layers": "x"}', "{not json",
    '{"n_layers": 2, "d_model": 4, "d_sae": 3, "activation": "topk", "k": 9}',
])  # fmt: skip


@settings(max_examples=60)
@given(files=_FOLDERS, config_yaml=_YAML, mitk_json=_JSON)
def test_any_corrupted_folder_raises_a_named_error(
    files: dict[tuple[str, int], Any], config_yaml: str | None, mitk_json: str | None
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for (part, index), content in files.items():
            path = folder / f"W_{part}_{index}.safetensors"
            if isinstance(content, bytes):
                path.write_bytes(content)
                continue
            tensors = {
                name.format(index): torch.zeros(shape, dtype=dtype)
                for name, (shape, dtype) in content.items()
            }
            save_file(tensors, path)
        if config_yaml is not None:
            (folder / "config.yaml").write_text(config_yaml)
        if mitk_json is not None:
            (folder / "mitk_clt.json").write_text(mitk_json)
        with contextlib.suppress(*NAMED_ERRORS):  # anything else fails the test
            load_clt(folder)


@settings(max_examples=60)
@given(
    activation=st.sampled_from(ACTIVATIONS),
    file=st.sampled_from(["W_enc_0", "W_enc_1", "W_dec_0", "W_dec_2"]),
    which=st.integers(0, 3),
    shape=_SHAPES,
    dtype=_DTYPES,
    rename=st.booleans(),
)
def test_one_damaged_tensor_in_a_saved_folder_raises_a_named_error(
    activation: str, file: str, which: int, shape: list[int], dtype: torch.dtype, rename: bool
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        folder = save_clt(random_clt(activation), Path(tmp) / "clt")
        path = folder / f"{file}.safetensors"
        tensors = dict(load_file(path))
        name = sorted(tensors)[which % len(tensors)]
        replaced = tensors.pop(name)
        new = torch.zeros(shape, dtype=dtype)
        tensors[f"{name}_x" if rename else name] = new
        save_file(tensors, path)
        damaged = rename or tuple(shape) != tuple(replaced.shape) or not dtype.is_floating_point
        try:
            load_clt(folder)
        except NAMED_ERRORS:
            return
        assert not damaged, f"{name} -> {tuple(shape)} {dtype} (renamed: {rename}) loaded"
