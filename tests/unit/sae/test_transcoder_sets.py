"""circuit-tracer transcoder sets: the on-disk layout read by hand, round trips and refusals."""

from __future__ import annotations

from pathlib import Path
import shutil
import tempfile

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
import pytest
from safetensors.torch import save_file
import torch
import yaml

from mitk.analysis.graphs import attribution_graph
from mitk.errors import ConfigError, MitkError, ShapeMismatchError, UnsupportedModelError
from mitk.sae import SparseAutoencoder
from mitk.sae.transcoder_sets import load_transcoder_set, save_transcoder_set
from tests.unit.graphs import models

D_MODEL, D_SAE = 8, 12


def _layer(gen: torch.Generator, *, threshold: bool = False, skip: bool = False) -> dict:
    """One layer's tensors in circuit-tracer's layout (W_enc [d_sae, d_model])."""
    tensors = {
        "W_enc": torch.randn(D_SAE, D_MODEL, generator=gen),
        "W_dec": torch.randn(D_SAE, D_MODEL, generator=gen),
        "b_enc": torch.randn(D_SAE, generator=gen) * 0.1,
        "b_dec": torch.randn(D_MODEL, generator=gen),
    }
    if threshold:
        tensors["activation_function.threshold"] = torch.rand(D_SAE, generator=gen) * 0.5
    if skip:
        tensors["W_skip"] = torch.randn(D_MODEL, D_MODEL, generator=gen)
    return tensors


def _write_set(folder: Path, layers: list[dict], config: dict | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, tensors in enumerate(layers):
        save_file(tensors, folder / f"layer_{i}.safetensors")
    config = config or {
        "model_kind": "transcoder_set",
        "feature_input_hook": "hook_resid_mid",
        "feature_output_hook": "hook_mlp_out",
        "scan": "test",
    }
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    return folder


@pytest.mark.parametrize(("threshold", "skip"), [(False, False), (True, False), (False, True)])
def test_circuit_tracer_layout_is_read_as_it_computes(
    tmp_path: Path, threshold: bool, skip: bool
) -> None:
    gen = torch.Generator().manual_seed(0)
    layers = [_layer(gen, threshold=threshold, skip=skip) for _ in range(2)]
    loaded = load_transcoder_set(_write_set(tmp_path / "set", layers))
    x = torch.randn(5, D_MODEL, generator=gen)
    for layer, (sae, t) in enumerate(zip(loaded, layers, strict=True)):
        assert sae.cfg.hook_name == f"blocks.{layer}.hook_resid_mid"
        assert sae.cfg.target_hook_name == f"blocks.{layer}.hook_mlp_out"
        # circuit-tracer's encode and decode, written out
        pre = x @ t["W_enc"].T + t["b_enc"]
        gate = pre > t.get("activation_function.threshold", torch.zeros(D_SAE))
        acts = pre * gate if threshold else pre.relu()
        out = acts @ t["W_dec"] + t["b_dec"] + (x @ t["W_skip"].T if skip else 0)
        torch.testing.assert_close(sae.encode(x), acts, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(sae(x).reconstruction, out, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("architecture", "skip"), [("relu", False), ("jumprelu", True)])
def test_round_trip_keeps_every_output(tmp_path: Path, architecture: str, skip: bool) -> None:
    built = models.model()
    saved = models.transcoders(built, architecture=architecture, skip=skip)
    folder = save_transcoder_set(saved, tmp_path / "set")
    config = yaml.safe_load((folder / "config.yaml").read_text())
    assert config["model_kind"] == "transcoder_set"
    assert config["feature_input_hook"] == "ln2.hook_normalized"
    loaded = load_transcoder_set(folder / "config.yaml")
    x = torch.randn(7, built.cfg.d_model)
    for before, after in zip(saved, loaded, strict=True):
        torch.testing.assert_close(after(x).reconstruction, before(x).reconstruction)
        torch.testing.assert_close(after.encode(x), before.encode(x))
    tokens = torch.arange(1, 9)
    graph_before = attribution_graph(built, saved, tokens)
    graph_after = attribution_graph(built, loaded, tokens)
    torch.testing.assert_close(graph_after.adjacency, graph_before.adjacency)


def test_listed_files_and_saelens_folders_load_in_order(tmp_path: Path) -> None:
    built = models.model()
    saved = models.transcoders(built, reads="hook_resid_mid", skip=True)
    written = save_transcoder_set(saved, tmp_path / "written")
    folder = tmp_path / "set"
    saved[0].save(folder / "sub" / "zero")  # layer 0: a SAELens folder
    shutil.copy(written / "layer_1.safetensors", folder / "one.safetensors")
    shutil.copy(written / "layer_2.safetensors", folder / "two.safetensors")
    config = {
        "model_kind": "transcoder_set",
        "feature_input_hook": "hook_resid_mid",
        "feature_output_hook": "mlp.hook_out",
        # an absolute name inside the folder is accepted
        "transcoders": ["sub/zero", "one.safetensors", str(folder / "two.safetensors")],
    }
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    loaded = load_transcoder_set(folder)
    x = torch.randn(4, built.cfg.d_model)
    for layer, (before, after) in enumerate(zip(saved, loaded, strict=True)):
        assert after.cfg.hook_name == f"blocks.{layer}.hook_resid_mid"
        torch.testing.assert_close(after(x).reconstruction, before(x).reconstruction)
    gen = torch.Generator().manual_seed(1)
    save_file(_layer(gen), folder / "narrow.safetensors")
    config["transcoders"] = ["sub/zero", "narrow.safetensors"]
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(ShapeMismatchError, match="layer 0's maps 32 to 32"):
        load_transcoder_set(folder)


def test_saelens_folder_hooks_must_match_its_layer(tmp_path: Path) -> None:
    built = models.model()
    saved = models.transcoders(built, reads="hook_resid_mid")
    folder = tmp_path / "set"
    saved[1].save(folder / "one")
    config = {
        "model_kind": "transcoder_set",
        "feature_input_hook": "hook_resid_mid",
        "feature_output_hook": "hook_mlp_out",
        "transcoders": ["one"],
    }
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(ConfigError, match="as layer 0 of this set it must read"):
        load_transcoder_set(folder)


def _valid(tmp_path: Path) -> Path:
    gen = torch.Generator().manual_seed(2)
    return _write_set(tmp_path / "set", [_layer(gen), _layer(gen)])


def _edit_config(folder: Path, **changes: object) -> None:
    config = yaml.safe_load((folder / "config.yaml").read_text())
    config.update(changes)
    (folder / "config.yaml").write_text(yaml.safe_dump(config))


@pytest.mark.parametrize(
    ("changes", "error", "match"),
    [
        ({"model_kind": "cross_layer_transcoder"}, UnsupportedModelError, "cross_layer"),
        ({"model_kind": "sae"}, ConfigError, "model_kind must be"),
        ({"feature_input_hook": "hook_resid_pre"}, ConfigError, "feature_input_hook must be"),
        ({"feature_input_hook": "mlp.hook_in"}, UnsupportedModelError, "norms_folded=True"),
        ({"feature_output_hook": "hook_resid_post"}, ConfigError, "feature_output_hook must"),
        ({"lazy_decoder": True}, ConfigError, r"unknown key\(s\) \['lazy_decoder'\]"),
        ({"transcoders": ["hf://org/repo/layer_0.safetensors"]}, ConfigError, "hub reference"),
        ({"transcoders": ["../outside.safetensors"]}, MitkError, "outside"),
        ({"transcoders": ["/etc/passwd"]}, MitkError, "passwd"),
        ({"transcoders": ["layer_0.npz"]}, UnsupportedModelError, ".npz"),
        ({"transcoders": ["missing.safetensors"]}, FileNotFoundError, "does not exist"),
        ({"transcoders": []}, ConfigError, "non-empty list"),
        ({"transcoders": "layer_0.safetensors"}, ConfigError, "non-empty list"),
    ],
)
def test_malformed_configs_are_refused_by_name(
    tmp_path: Path, changes: dict, error: type[Exception], match: str
) -> None:
    folder = _valid(tmp_path)
    (tmp_path / "outside.safetensors").write_bytes(b"")
    _edit_config(folder, **changes)
    with pytest.raises(error, match=match):
        load_transcoder_set(folder)


def test_mlp_hook_in_loads_when_norms_are_folded(tmp_path: Path) -> None:
    folder = _valid(tmp_path)
    _edit_config(folder, feature_input_hook="mlp.hook_in")
    loaded = load_transcoder_set(folder, norms_folded=True)
    assert loaded[1].cfg.hook_name == "blocks.1.ln2.hook_normalized"


@pytest.mark.parametrize(
    ("edit", "error", "match"),
    [
        (lambda t: t.update(W_enc=t["W_enc"].T.contiguous()), ShapeMismatchError, "W_enc"),
        (lambda t: t.update(W_dec=t["W_dec"][:-1].contiguous()), ShapeMismatchError, "W_dec"),
        (lambda t: t.update(W_skip=torch.zeros(3, 3)), ShapeMismatchError, "W_skip"),
        (lambda t: t.update(b_enc=torch.zeros(())), ShapeMismatchError, "b_enc"),
        (lambda t: t.pop("b_dec"), ConfigError, r"missing tensor\(s\) \['b_dec'\]"),
        (lambda t: t.update(log_thresholds=torch.zeros(D_SAE)), ConfigError, "log_thresholds"),
        (lambda t: t.update(b_enc=torch.zeros(D_SAE, dtype=torch.int64)), ConfigError, "int64"),
        (
            lambda t: t.update({"activation_function.threshold": -torch.ones(D_SAE)}),
            UnsupportedModelError,
            "negative",
        ),
    ],
)
def test_malformed_layer_files_are_refused_by_name(
    tmp_path: Path, edit: object, error: type[Exception], match: str
) -> None:
    gen = torch.Generator().manual_seed(3)
    tensors = _layer(gen)
    edit(tensors)  # type: ignore[operator]
    folder = _write_set(tmp_path / "set", [_layer(gen), tensors])
    with pytest.raises(error, match=match):
        load_transcoder_set(folder)


def test_layer_widths_must_agree_and_files_run_without_gaps(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(4)
    folder = _write_set(tmp_path / "set", [_layer(gen), _layer(gen)])
    shutil.copy(folder / "layer_1.safetensors", folder / "layer_3.safetensors")
    with pytest.raises(ConfigError, match="without gaps"):
        load_transcoder_set(folder)
    (folder / "layer_3.safetensors").unlink()
    with pytest.raises(ConfigError, match="max_file_bytes"):
        load_transcoder_set(folder, max_file_bytes=100)
    with pytest.raises(FileNotFoundError, match="no transcoder-set"):
        load_transcoder_set(tmp_path)


def test_writer_refuses_what_circuit_tracer_cannot_read(tmp_path: Path) -> None:
    built = models.model()
    with pytest.raises(UnsupportedModelError, match="topk"):
        save_transcoder_set(models.transcoders(built, architecture="topk"), tmp_path / "a")
    mixed = models.transcoders(built)[:1] + models.transcoders(built, reads="hook_resid_mid")[1:]
    with pytest.raises(ConfigError, match="different hooks"):
        save_transcoder_set(mixed, tmp_path / "b")
    save_transcoder_set(models.transcoders(built), tmp_path / "c")
    with pytest.raises(FileExistsError):
        save_transcoder_set(models.transcoders(built), tmp_path / "c")


_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=8,
)
_configs = st.dictionaries(
    st.sampled_from(
        [
            "model_kind",
            "feature_input_hook",
            "feature_output_hook",
            "transcoders",
            "scan",
            "other",
        ]
    ),
    _values
    | st.sampled_from(
        [
            "transcoder_set",
            "hook_resid_mid",
            "hook_mlp_out",
            "layer_0.safetensors",
            "../x",
            "/tmp",
            "hf://a/b",
        ]
    )
    | st.lists(st.sampled_from(["layer_0.safetensors", "layer_1.safetensors", "..", ""])),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(config=_configs | _values, raw=st.none() | st.binary(max_size=64))
def test_any_malformed_config_raises_a_named_error(config: object, raw: bytes | None) -> None:
    gen = torch.Generator().manual_seed(5)
    with tempfile.TemporaryDirectory() as tmp:
        folder = _write_set(Path(tmp) / "set", [_layer(gen), _layer(gen)])
        if raw is not None:
            (folder / "config.yaml").write_bytes(raw)
        else:
            (folder / "config.yaml").write_text(yaml.safe_dump(config))
        try:
            loaded = load_transcoder_set(folder)
        except (MitkError, FileNotFoundError) as err:
            assert str(err)
        else:
            assert all(isinstance(sae, SparseAutoencoder) for sae in loaded)
