"""Pretrained SAEs from a registry in SAELens's format, resolved through a Hugging Face
cache built in tmp_path (offline: nothing touches the network)."""

from __future__ import annotations

from collections.abc import Iterator
import contextlib
import hashlib
import os
from pathlib import Path
import shutil
import tempfile
from typing import Any
import warnings

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
import pytest
import torch
import yaml

from mitk.errors import (
    ConfigError,
    HubFileNotFoundError,
    MitkError,
    UnknownNameError,
    UnsupportedModelError,
)
from mitk.sae import pretrained
from mitk.sae.autoencoder import SparseAutoencoder
from mitk.sae.config import SAEConfig
from mitk.sae.files import save_sae
from mitk.sae.pretrained import from_pretrained, list_pretrained, lookup
from mitk.sae.saelens_format import CONFIG_FILE, WEIGHTS_FILE

REPO = "someorg/tiny-saes"
MAIN, OTHER = "a" * 40, "b" * 40
D_IN, D_SAE, K = 6, 16, 3
ARCHITECTURES = ["relu", "topk", "batchtopk", "jumprelu"]


# --- a hub cache and a registry ---------------------------------------------------------------
@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty hub cache the environment points at, offline."""
    home = tmp_path / "hf"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (home / "hub").mkdir(parents=True)
    return home / "hub"


def put_in_cache(
    cache: Path,
    folder: Path,
    path: str,
    *,
    repo: str = REPO,
    commit: str = MAIN,
    ref: str | None = "main",
) -> None:
    """Lay ``folder``'s files out as huggingface_hub does: blobs, and snapshot symlinks to them."""
    storage = cache / f"models--{repo.replace('/', '--')}"
    (storage / "blobs").mkdir(parents=True, exist_ok=True)
    if ref is not None:
        (storage / "refs").mkdir(exist_ok=True)
        (storage / "refs" / ref).write_text(commit)
    target = storage / "snapshots" / commit / path
    target.mkdir(parents=True, exist_ok=True)
    for file in folder.iterdir():
        blob = storage / "blobs" / hashlib.sha256(file.read_bytes()).hexdigest()
        shutil.copyfile(file, blob)
        (target / file.name).symlink_to(os.path.relpath(blob, target))


def registry(saes: list[dict[str, Any]], **release: Any) -> dict[str, Any]:
    """A registry with one release, ``tiny-saes``, holding ``saes``."""
    info = {"repo_id": REPO, "model": "tiny", "conversion_func": None, "saes": saes}
    return {"tiny-saes": info | release}


def random_sae(architecture: str, seed: int = 7) -> SparseAutoencoder:
    """An SAE with random weights, biases and thresholds (as if trained)."""
    cfg = SAEConfig(
        d_in=D_IN, d_sae=D_SAE, architecture=architecture, k=K, hook_name="blocks.0.hook_resid_pre"
    )
    sae = SparseAutoencoder(cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in sae.parameters():
            param.copy_(torch.randn(param.shape, generator=gen))
        if architecture == "jumprelu":
            sae.log_threshold.copy_(torch.rand(D_SAE, generator=gen).log())
        if architecture == "batchtopk":
            sae.batch_threshold.fill_(0.25)
    return sae


def inputs() -> torch.Tensor:
    return torch.randn(4, 3, D_IN, generator=torch.Generator().manual_seed(3)) * 2


def saelens() -> Any:
    """The sae_lens package (skips the test where it is not installed)."""
    with warnings.catch_warnings():
        # sae_lens imports transformer_lens.utils, which transformer-lens 3 deprecates on import
        warnings.filterwarnings(
            "ignore", message="The 'utils' module has been deprecated", category=DeprecationWarning
        )
        return pytest.importorskip("sae_lens")


def randomize(sae: Any, seed: int = 0) -> Any:
    """Random values for every parameter of a SAELens SAE (thresholds positive)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sae.named_parameters():
            values = torch.randn(param.shape, generator=gen)
            param.copy_(values.abs() * 0.5 if name == "threshold" else values)
    return sae


# --- mitk and SAELens folders load as saved ---------------------------------------------------
@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_mitk_folder_loads_exactly(tmp_path: Path, cache: Path, architecture: str) -> None:
    sae = random_sae(architecture)
    put_in_cache(cache, save_sae(sae, tmp_path / "saved"), f"layer_0/{architecture}")
    entries = [{"id": "blocks.0.hook_resid_pre", "path": f"layer_0/{architecture}"}]
    loaded = SparseAutoencoder.from_pretrained(
        "tiny-saes", "blocks.0.hook_resid_pre", registry=registry(entries), device="cpu"
    )
    assert loaded.cfg == sae.cfg
    x = inputs()
    with torch.no_grad():
        latents = sae.encode(x)
        assert (latents != 0).any() and (latents == 0).any()
        assert torch.equal(loaded.encode(x), latents)
        assert torch.equal(loaded.decode(latents), sae.decode(latents))


@pytest.mark.parametrize("kind", ["standard", "topk", "jumprelu"])
def test_saelens_folder_matches_saelens_from_pretrained(
    tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    """SAELens writes the folder; mitk and SAELens's own ``from_pretrained`` read the cache."""
    import huggingface_hub.constants

    sl = saelens()
    cfg = {
        "standard": lambda: sl.StandardSAEConfig(d_in=D_IN, d_sae=D_SAE),
        "topk": lambda: sl.TopKSAEConfig(d_in=D_IN, d_sae=D_SAE, k=K),
        "jumprelu": lambda: sl.JumpReLUSAEConfig(d_in=D_IN, d_sae=D_SAE),
    }[kind]()
    written = randomize(sl.SAE.from_dict(cfg.to_dict()))
    written.save_model(tmp_path / "saved")
    put_in_cache(cache, tmp_path / "saved", f"saes/{kind}")
    registry_file = tmp_path / "registry.yaml"
    entries = [{"id": f"{kind}-sae", "path": f"saes/{kind}", "l0": 3.0}]
    registry_file.write_text(yaml.safe_dump(registry(entries)))

    sae = from_pretrained("tiny-saes", f"{kind}-sae", registry=registry_file)
    # SAELens resolves a repo id given as the release through the cache huggingface_hub knows
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    reference = sl.SAE.from_pretrained(REPO, f"saes/{kind}")
    x = inputs()
    with torch.no_grad():
        latents = reference.encode(x)
        assert (latents != 0).any() and (latents == 0).any()
        torch.testing.assert_close(sae.encode(x), latents, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(
            sae.decode(latents), reference.decode(latents), rtol=1e-5, atol=1e-5
        )


def test_norm_scaling_factor_is_folded_as_saelens_does(tmp_path: Path, cache: Path) -> None:
    sl = saelens()
    cfg = sl.StandardSAEConfig(
        d_in=D_IN, d_sae=D_SAE, normalize_activations="expected_average_only_in"
    )
    written = randomize(sl.StandardSAE(cfg))
    written.save_model(tmp_path / "saved")
    put_in_cache(cache, tmp_path / "saved", "scaled")
    factor = 3.5
    entries = [{"id": "scaled", "path": "scaled", "norm_scaling_factor": factor}]
    sae = from_pretrained("tiny-saes", "scaled", registry=registry(entries))
    reference = sl.SAE.load_from_disk(tmp_path / "saved")
    reference.fold_activation_norm_scaling_factor(factor)  # what SAELens's from_pretrained does
    x = inputs()
    with torch.no_grad():
        torch.testing.assert_close(sae.encode(x), reference.encode(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(sae(x).reconstruction, reference(x), rtol=1e-5, atol=1e-5)
    # without the registry's factor the input scaling cannot be reproduced: refused by name
    entries[0].pop("norm_scaling_factor")
    with pytest.raises(ConfigError, match="normalize_activations"):
        from_pretrained("tiny-saes", "scaled", registry=registry(entries))


def test_config_overrides(tmp_path: Path, cache: Path) -> None:
    sl = saelens()
    randomize(sl.StandardSAE(sl.StandardSAEConfig(d_in=D_IN, d_sae=D_SAE))).save_model(
        tmp_path / "saved"
    )
    put_in_cache(cache, tmp_path / "saved", "sae")
    entries = [{"id": "sae", "path": "sae"}]
    overrides = {
        "hook_name": "blocks.3.hook_mlp_out",
        "dataset_path": "some/dataset",
        "model_from_pretrained_kwargs": {"center_writing_weights": True},
    }
    sae = from_pretrained(
        "tiny-saes", "sae", registry=registry(entries, config_overrides=overrides)
    )
    assert sae.cfg.hook_name == "blocks.3.hook_mlp_out"
    rescaled = {"normalize_activations": "constant_norm_rescale"}
    with pytest.raises(ConfigError, match="normalize_activations='constant_norm_rescale'"):
        from_pretrained("tiny-saes", "sae", registry=registry(entries, config_overrides=rescaled))
    for unknown in ({"d_sae": 3}, {"mitk": {}}, {"hook_name": 4}):
        with pytest.raises(ConfigError, match="config_overrides"):
            from_pretrained(
                "tiny-saes", "sae", registry=registry(entries, config_overrides=unknown)
            )


def test_revision_picks_another_snapshot(tmp_path: Path, cache: Path) -> None:
    main, other = random_sae("relu", seed=1), random_sae("relu", seed=2)
    put_in_cache(cache, save_sae(main, tmp_path / "main"), "sae")
    put_in_cache(cache, save_sae(other, tmp_path / "other"), "sae", commit=OTHER, ref="v2")
    entries = [{"id": "sae", "path": "sae"}]
    for revision, expected in ((None, main), ("v2", other), (OTHER, other)):
        loaded = from_pretrained("tiny-saes", "sae", registry=registry(entries), revision=revision)
        assert torch.equal(loaded.W_enc, expected.W_enc), revision
    for bad in ("../../x", "/abs", "a/../b"):
        with pytest.raises(HubFileNotFoundError, match="not a branch"):
            from_pretrained("tiny-saes", "sae", registry=registry(entries), revision=bad)


def test_online_reads_the_cache_first_and_downloads_only_what_is_missing(
    tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import huggingface_hub
    from huggingface_hub.errors import EntryNotFoundError

    sae = random_sae("topk")
    saved = save_sae(sae, tmp_path / "saved")
    only_cfg = tmp_path / "only_cfg"
    only_cfg.mkdir()
    shutil.copyfile(saved / CONFIG_FILE, only_cfg / CONFIG_FILE)
    put_in_cache(cache, only_cfg, "sae")
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "0")
    real = huggingface_hub.hf_hub_download
    downloads: list[str] = []

    def no_network(repo_id: str, filename: str, **kwargs: Any) -> Any:
        if kwargs.get("local_files_only"):
            return real(repo_id, filename, **kwargs)
        downloads.append(filename)
        if not (saved / Path(filename).name).is_file():
            raise EntryNotFoundError(f"{filename} is not in the repo")
        fetched = tmp_path / "fetched"
        fetched.mkdir(exist_ok=True)
        shutil.copyfile(saved / Path(filename).name, fetched / Path(filename).name)
        put_in_cache(cache, fetched, "sae")  # stands in for the download
        return real(repo_id, filename, local_files_only=True, cache_dir=kwargs["cache_dir"])

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_network)
    loaded = from_pretrained("tiny-saes", "sae", registry=registry([{"id": "sae", "path": "sae"}]))
    assert downloads == [f"sae/{WEIGHTS_FILE}", "sae/mitk_exact.safetensors"]  # cfg was cached
    assert torch.equal(loaded.encode(inputs()), sae.encode(inputs()))


# --- refusals ---------------------------------------------------------------------------------
def test_unknown_release_and_id_name_close_matches(cache: Path) -> None:
    saes = [{"id": f"blocks.{i}.hook_resid_pre", "path": f"layer_{i}"} for i in range(3)]
    reg = registry(saes) | {"tiny-saes-v2": {"repo_id": REPO, "saes": []}}
    with pytest.raises(UnknownNameError, match="'tiny-saes'") as info:
        from_pretrained("tiny-sae", "blocks.0.hook_resid_pre", registry=reg)
    assert isinstance(info.value, KeyError)
    assert "unknown pretrained SAE release 'tiny-sae'" in str(info.value)
    with pytest.raises(UnknownNameError, match=r"'blocks\.1\.hook_resid_pre'") as info:
        from_pretrained("tiny-saes", "blocks.1.hook_resid_post", registry=reg)
    assert "SAE id of release 'tiny-saes'" in str(info.value)
    assert list_pretrained(registry=reg) == ["tiny-saes", "tiny-saes-v2"]
    assert list_pretrained("tiny-saes", registry=reg) == [s["id"] for s in saes]


@pytest.mark.parametrize(
    "path", ["../x", "a/../../x", "/etc", "a//b", "./a", "a/", "C:\\x", "a\\..\\b", "", "a\nb"]
)
def test_paths_outside_the_repo_are_refused(cache: Path, path: str) -> None:
    with pytest.raises(ConfigError, match="path"):
        from_pretrained("tiny-saes", "sae", registry=registry([{"id": "sae", "path": path}]))


def test_numeric_folder_names_are_paths(cache: Path) -> None:
    assert lookup("tiny-saes", "sae", registry=registry([{"id": "sae", "path": 12}])).path == "12"


def test_missing_files_offline_say_how_to_fetch(tmp_path: Path, cache: Path) -> None:
    entries = [{"id": "sae", "path": "layer_0/sae"}]
    with pytest.raises(HubFileNotFoundError) as info:
        from_pretrained("tiny-saes", "sae", registry=registry(entries))
    message = str(info.value)
    assert isinstance(info.value, (MitkError, FileNotFoundError))
    assert "pretrained SAE 'sae' of release 'tiny-saes'" in message
    assert f"not in the Hugging Face cache {cache}" in message and "offline" in message
    assert f"hf download {REPO} layer_0/sae/{CONFIG_FILE} layer_0/sae/{WEIGHTS_FILE}" in message
    # a snapshot holding the config but not the weights is not enough either
    folder = save_sae(random_sae("relu"), tmp_path / "saved")
    (folder / WEIGHTS_FILE).unlink()
    put_in_cache(cache, folder, "layer_0/sae")
    with pytest.raises(HubFileNotFoundError, match=f"layer_0/sae/{WEIGHTS_FILE} of"):
        from_pretrained("tiny-saes", "sae", registry=registry(entries))


def test_converted_releases_are_refused_naming_the_conversion(cache: Path) -> None:
    reg = registry([{"id": "sae", "path": "layer_0"}], conversion_func="gemma_2")
    with pytest.raises(UnsupportedModelError, match="'gemma_2' loader") as info:
        from_pretrained("tiny-saes", "sae", registry=reg)
    assert "save_model" in str(info.value)


def test_registry_sources(tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bad = tmp_path / "bad.yaml"
    for text, match in (
        ("[1, 2]", "must map release names"),
        ("a: [", "not valid YAML"),
        ("1: {}", "release names must be strings"),
        ("~: {}", "release names must be strings, got None"),
    ):
        bad.write_text(text)
        with pytest.raises(ConfigError, match=match):
            list_pretrained(registry=bad)
    bad.write_bytes(b"\xff\xfe")
    with pytest.raises(ConfigError, match="not UTF-8"):
        list_pretrained(registry=bad)
    with pytest.raises(ConfigError, match="cannot read"):
        list_pretrained(registry=tmp_path / "absent.yaml")
    monkeypatch.setattr(pretrained, "MAX_REGISTRY_BYTES", 4)
    bad.write_text("tiny: {}")
    with pytest.raises(ConfigError, match="larger than 4 bytes"):
        list_pretrained(registry=bad)
    monkeypatch.setattr(pretrained, "installed_registry", lambda: None)
    with pytest.raises(ConfigError, match="Pass registry="):
        list_pretrained()


def test_installed_saelens_registry(cache: Path) -> None:
    """SAELens's own registry reads; its entries resolve; offline its repos are not cached."""
    saelens()
    assert pretrained.installed_registry() is not None
    assert "gpt2-small-res-jb" in list_pretrained()
    entry = lookup("gpt2-small-res-jb", "blocks.8.hook_resid_pre")
    assert (entry.repo_id, entry.path) == (
        "jbloom/GPT2-Small-SAEs-Reformatted",
        "blocks.8.hook_resid_pre",
    )
    with pytest.raises(
        HubFileNotFoundError, match="hf download jbloom/GPT2-Small-SAEs-Reformatted"
    ):
        SparseAutoencoder.from_pretrained("gpt2-small-res-jb", "blocks.8.hook_resid_pre")
    with pytest.raises(UnknownNameError, match="gpt2-small-res-jb"):
        SparseAutoencoder.from_pretrained("gpt2-small-res-bj", "blocks.8.hook_resid_pre")
    gemma_scope = next(r for r in list_pretrained() if r.startswith("gemma-scope-2b-pt-res"))
    first = list_pretrained(gemma_scope)[0]
    with pytest.raises(UnsupportedModelError, match="'gemma_2' loader"):
        SparseAutoencoder.from_pretrained(gemma_scope, first)


# --- malformed registries never escape as anything but MitkError ------------------------------
_JUNK = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3)
    ),
    max_leaves=8,
)
_DELETE = object()
# per field of a valid release: values that break it (besides junk of any shape, or deletion)
_BREAKS: dict[str, st.SearchStrategy[Any]] = {
    "repo_id": st.sampled_from(["bad--id", "../x", "a/b/c", "", "a" * 200]),
    "conversion_func": st.sampled_from(["gemma_2", "sparsify"]),
    "config_overrides": st.dictionaries(
        st.sampled_from(["hook_name", "d_in", "mitk", "normalize_activations"]), _JUNK, max_size=2
    ),
    "saes": st.lists(_JUNK, max_size=3),
    "saes.0": _JUNK,
    "saes.0.id": st.sampled_from(["other", "", "Sae"]),
    "saes.0.path": st.sampled_from(["../x", "/x", "a//b", "", "a/./b", "C:/x", "a\\b", 12]),
    "saes.0.norm_scaling_factor": st.sampled_from([0.0, -1.0, float("nan"), float("inf"), True]),
}


def _child(container: Any, key: str) -> Any:
    """``container[key]`` (a list index for lists), or None where an earlier change broke it."""
    if isinstance(container, dict):
        return container.get(key)
    if isinstance(container, list) and int(key) < len(container):
        return container[int(key)]
    return None


@st.composite
def damaged_releases(draw: st.DrawFn) -> Any:
    """A valid release with a few of its fields deleted or replaced by wrong values."""
    release: Any = {
        "repo_id": REPO,
        "model": "tiny",
        "conversion_func": None,
        "config_overrides": {"hook_name": "blocks.0.hook_mlp_out", "dataset_path": "d"},
        "saes": [
            {"id": "sae", "path": "layer_0/sae", "norm_scaling_factor": 1.5},
            {"id": "other", "path": 12},
        ],
    }
    for field in draw(st.lists(st.sampled_from(sorted(_BREAKS)), max_size=3, unique=True)):
        *parents, last = field.split(".")
        container = release
        for key in parents:  # "saes.0.path": release["saes"][0]["path"]
            container = _child(container, key)
        value = draw(st.just(_DELETE) | _BREAKS[field] | _JUNK)
        if isinstance(container, list):  # the only list step is "saes.0"
            if container:
                if value is _DELETE:
                    del container[0]
                else:
                    container[0] = value
        elif isinstance(container, dict):
            if value is _DELETE:
                container.pop(last, None)
            else:
                container[last] = value
    return release


@contextlib.contextmanager
def empty_offline_cache() -> Iterator[Path]:
    """A fresh empty hub cache for one hypothesis example (function fixtures are shared)."""
    names = ("HF_HOME", "HF_HUB_CACHE", "HF_HUB_OFFLINE")
    saved = {name: os.environ.get(name) for name in names}
    with tempfile.TemporaryDirectory() as home:
        os.environ.update(HF_HOME=home, HF_HUB_CACHE=f"{home}/hub", HF_HUB_OFFLINE="1")
        try:
            yield Path(home)
        finally:
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(release=damaged_releases() | _JUNK, sae_id=st.sampled_from(["sae", "other", ""]))
def test_malformed_registry_entries_raise_mitk_errors(release: Any, sae_id: str) -> None:
    with empty_offline_cache():  # nothing is cached: a valid entry fails to resolve, by name
        with pytest.raises(MitkError) as info:
            from_pretrained("tiny-saes", sae_id, registry={"tiny-saes": release})
        event(type(info.value).__name__)
        try:
            ids = list_pretrained("tiny-saes", registry={"tiny-saes": release})
        except MitkError:
            return
        assert all(isinstance(i, str) for i in ids)


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(
    text=st.text(max_size=200)
    | st.builds(
        yaml.safe_dump, st.dictionaries(st.text(max_size=6), damaged_releases(), max_size=3)
    )
)
def test_malformed_registry_files_raise_mitk_errors(text: str) -> None:
    with empty_offline_cache() as home:
        path = Path(home) / "registry.yaml"
        path.write_text(text)
        try:
            releases = list_pretrained(registry=path)
        except MitkError:
            return
        assert all(isinstance(r, str) for r in releases)
        for release in releases[:3]:
            with pytest.raises(MitkError) as info:
                from_pretrained(release, "sae", registry=path)
            event(type(info.value).__name__)
