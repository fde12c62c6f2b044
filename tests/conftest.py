"""Shared fixtures: tiny random models and checkpoints written to temp dirs."""

from __future__ import annotations

import os
from pathlib import Path
import pkgutil

from hypothesis import settings
from jaxtyping import install_import_hook
import pytest
import torch

from tests.checkpoints import save_gpt2

# Hypothesis's per-example deadline is a timing assert, and these machines' speed swings
# several-fold with load: no test fails for being slow.
settings.register_profile("mitk", deadline=None)
settings.load_profile("mitk")

# Every annotated function in these packages gets its jaxtyping shapes checked at test time.
# mitk.config and mitk.sae.config are left out on purpose: they validate their own fields, and
# those checks (with their messages) are what the config tests assert. So mitk.sae is named
# module by module, every one but its config.
# Only modules first imported inside the block are checked, so every checked package is
# imported here, before any test module imports it.
_SAE_DIR = Path(__file__).resolve().parents[1] / "mitk" / "sae"
_SAE_MODULES = [f"mitk.sae.{m.name}" for m in pkgutil.iter_modules([str(_SAE_DIR)])]
_CHECKED = ["mitk.model", "mitk.cache", "mitk.hooks", "mitk.analysis", "mitk.viz"]
_CHECKED += [m for m in _SAE_MODULES if m != "mitk.sae.config"]

with install_import_hook(_CHECKED, "beartype.beartype"):
    from mitk import HookedTransformer, TransformerConfig
    import mitk.analysis.circuits
    import mitk.analysis.composition
    import mitk.analysis.detectors
    import mitk.analysis.discovery
    import mitk.analysis.dla
    import mitk.analysis.graphs
    import mitk.analysis.lens
    import mitk.analysis.patching
    import mitk.analysis.patching.path
    import mitk.analysis.probes
    import mitk.analysis.steering
    import mitk.sae
    import mitk.viz  # noqa: F401

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def gpt2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 3-layer GPT-2 saved as a Hugging Face directory, with a word tokenizer."""
    return save_gpt2(tmp_path_factory.mktemp("gpt2"))


@pytest.fixture(scope="session")
def gpt2(gpt2_dir: Path) -> HookedTransformer:
    """mitk's load of ``gpt2_dir`` (shared: tests must not leave hooks or edits behind)."""
    return HookedTransformer.from_pretrained(gpt2_dir)


@pytest.fixture
def tiny_cfg() -> TransformerConfig:
    return TransformerConfig(d_model=32, n_layers=2, n_heads=4, d_vocab=50, n_ctx=16)


@pytest.fixture
def tiny(tiny_cfg: TransformerConfig) -> HookedTransformer:
    return HookedTransformer(tiny_cfg, seed=1)


@pytest.fixture
def tokens() -> torch.Tensor:
    return torch.randint(1, 97, (3, 12), generator=torch.Generator().manual_seed(0))
