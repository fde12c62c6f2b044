"""Property-based fuzzing of what loading reads: configs, safetensors headers, shard indexes.

For random bytes, wrong types and extreme values, loading either succeeds or raises a
``MitkError`` naming the file (never a bare ``KeyError``/``TypeError``/``struct.error``/
``RuntimeError``), never builds a weight before the memory estimate passed (and never
more than it), and never opens a file outside the model directory.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
import json
from pathlib import Path
import shutil
import sys
import tempfile
from typing import Any
from unittest import mock

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
import pytest
from safetensors.torch import load_file
import torch

from mitk import HookedTransformer, TransformerConfig
from mitk.errors import MitkError, ModelTooLargeError
from mitk.model import block, memory
from mitk.model.pretrained import files, supported_architectures
from tests.checkpoints import save_gpt2

LIMIT_GB = 0.25
FUZZ = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
_OPENED: list[str] | None = None  # paths Python opened while a case ran (audit hook)


def _audit(event: str, args: tuple[Any, ...]) -> None:
    if _OPENED is not None and event == "open" and isinstance(args[0], str | bytes | Path):
        _OPENED.append(str(args[0] if not isinstance(args[0], bytes) else args[0].decode()))


sys.addaudithook(_audit)  # audit hooks cannot be removed: it records only inside _watched()


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny native save and a tiny HF GPT-2 directory to copy each case from."""
    root = tmp_path_factory.mktemp("fuzz-sources")
    cfg = TransformerConfig(d_model=16, n_layers=1, n_heads=2, d_vocab=20, n_ctx=8)
    HookedTransformer(cfg).save(root / "native")
    save_gpt2(root / "hf", with_tokenizer=False, n_layer=1, n_embd=16, n_head=2, vocab_size=20,
              n_positions=8)  # fmt: skip
    return {"native": root / "native", "hf": root / "hf"}


@contextmanager
def _watched() -> Iterator[tuple[Path, list[int]]]:
    """A sandbox (``model/`` to load, a decoy ``outside/``), with the memory checks watched.

    Yields the sandbox and the estimates that passed; a block built (off the meta
    device) before an estimate passed fails the case.
    """
    sandbox = Path(tempfile.mkdtemp(prefix="mitk-fuzz-")).resolve()
    (sandbox / "outside").mkdir()
    (sandbox / "outside" / "secret.json").write_text("{}")
    passed: list[int] = []
    real_fits, real_block_init = memory.ensure_fits, block.TransformerBlock.__init__

    def fits(*args: Any, **kwargs: Any) -> int:
        passed.append(real_fits(*args, **kwargs))
        return passed[-1]

    def block_init(self: Any, *args: Any, **kwargs: Any) -> None:
        if torch.get_default_device().type != "meta":
            assert passed, "a block was built before the memory estimate passed"
        real_block_init(self, *args, **kwargs)

    def load(path: Any) -> Any:
        if _OPENED is not None:
            _OPENED.append(str(path))
        return load_file(path)

    try:
        with (
            mock.patch("mitk.model.pretrained.ensure_fits", fits),
            mock.patch("mitk.model.transformer.ensure_fits", fits),
            mock.patch.object(block.TransformerBlock, "__init__", block_init),
            mock.patch.object(files, "load_file", load),
            mock.patch.dict("os.environ", {memory.LIMIT_VARIABLE: str(LIMIT_GB)}),
        ):
            yield sandbox, passed
    finally:
        shutil.rmtree(sandbox, ignore_errors=True)


def _load_and_check(directory: Path, passed: list[int], names: tuple[str, ...]) -> str:
    """Load ``directory``: success within the estimate, or a MitkError naming one of ``names``.

    Every file Python or safetensors opens in the sandbox around ``directory`` while
    loading must lie inside ``directory``.
    """
    global _OPENED
    opened: list[str] = []
    _OPENED = opened
    try:
        model = HookedTransformer.from_pretrained(directory)
    except ModelTooLargeError as err:
        assert "GB" in str(err) and str(directory) in str(err)
        return "too large"
    except MitkError as err:
        assert any(name in str(err) for name in names), f"{err!r} names none of {names}"
        return type(err).__name__
    finally:
        _OPENED = None
        for path in opened:
            resolved = Path(path).resolve()
            if resolved.is_relative_to(directory.parent):
                assert resolved.is_relative_to(directory), f"read outside: {resolved}"
    assert any(Path(p).name == "model.safetensors" for p in opened)  # the watch sees reads
    built = sum(p.numel() * p.element_size() for p in model.parameters())
    assert passed and built <= min(passed) <= LIMIT_GB * memory.GB
    return "loaded"


EXTREMES = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([0, -1, 1, 2, 3, 7, 2**26, 2**31, 10**9, 2**63]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=6),
    st.booleans(),
    st.none(),
    st.lists(st.integers(min_value=-3, max_value=40), max_size=3),
    st.dictionaries(st.text(max_size=4), st.integers(), max_size=2),
    st.sampled_from(supported_architectures()),
)
"""Values a hostile or careless config holds: wrong types, extreme and non-finite numbers."""


def _mutated(base: dict[str, Any], extra_keys: list[str]) -> st.SearchStrategy[dict[str, Any]]:
    keys = st.sampled_from(sorted(base) + extra_keys)
    changes = st.dictionaries(keys, EXTREMES, min_size=1, max_size=3)
    return changes.map(lambda c: {**base, **c})


def _config_cases(base: dict[str, Any], extra_keys: list[str]) -> st.SearchStrategy[bytes]:
    """Config files: mutated valid configs (as JSON, NaN allowed) or arbitrary bytes."""
    mutated = _mutated(base, extra_keys).map(lambda d: json.dumps(d).encode())
    return st.one_of(mutated, mutated, st.binary(max_size=200))


def _fuzz_config(sources: dict[str, Path], kind: str, name: str, content: bytes) -> None:
    with _watched() as (sandbox, passed):
        directory = sandbox / "model"
        shutil.copytree(sources[kind], directory)
        (directory / name).write_bytes(content)
        _load_and_check(directory, passed, (name, "model.safetensors", "weights in"))


NATIVE_BASE = TransformerConfig(d_model=16, n_layers=1, n_heads=2, d_vocab=20, n_ctx=8).to_dict(
    placement=False
)
HF_BASE = {
    "model_type": "gpt2", "n_embd": 16, "n_layer": 1, "n_head": 2, "vocab_size": 20,
    "n_positions": 8, "n_inner": None, "activation_function": "gelu_new",
    "layer_norm_epsilon": 1e-5, "tie_word_embeddings": True,
}  # fmt: skip


@FUZZ
@given(content=_config_cases(NATIVE_BASE, ["moe", "rotary_scaling", "unknown_field"]))
def test_fuzzed_native_config(sources: dict[str, Path], content: bytes) -> None:
    _fuzz_config(sources, "native", "mitk_config.json", content)


@FUZZ
@given(content=_config_cases(HF_BASE, ["hidden_size", "num_hidden_layers", "rope_scaling"]))
def test_fuzzed_hf_config(sources: dict[str, Path], content: bytes) -> None:
    _fuzz_config(sources, "hf", "config.json", content)


HEADER = st.dictionaries(
    st.text(max_size=20),
    st.one_of(
        st.fixed_dictionaries({
            "dtype": st.sampled_from(["F32", "F16", "BF16", "I64", "BOOL", "F8_E4M3", "X"]),
            "shape": st.lists(st.integers(min_value=-1, max_value=2**40), max_size=3),
            "data_offsets": st.lists(st.integers(min_value=-1, max_value=2**40), max_size=3),
        }),
        EXTREMES,
    ),
    max_size=3,
)  # fmt: skip


@st.composite
def _safetensors_cases(draw: st.DrawFn, original: bytes) -> bytes:
    """Truncations, byte flips, hostile headers with a consistent length, or random bytes."""
    how = draw(st.sampled_from(["truncate", "flip", "header", "random"]))
    if how == "truncate":
        return original[: draw(st.integers(min_value=0, max_value=len(original) - 1))]
    if how == "flip":
        data = bytearray(original)
        for at in draw(st.lists(st.integers(0, len(data) - 1), min_size=1, max_size=8)):
            data[at] = draw(st.integers(0, 255))
        return bytes(data)
    if how == "header":
        header = json.dumps(draw(HEADER)).encode()
        size = draw(st.one_of(st.just(len(header)), st.integers(0, 2**64 - 1)))
        return size.to_bytes(8, "little") + header + draw(st.binary(max_size=64))
    return draw(st.binary(max_size=300))


@FUZZ
@given(data=st.data())
def test_fuzzed_safetensors(sources: dict[str, Path], data: st.DataObject) -> None:
    original = (sources["native"] / "model.safetensors").read_bytes()
    content = data.draw(_safetensors_cases(original))
    _fuzz_config(sources, "native", "model.safetensors", content)


SHARD_NAMES = st.one_of(
    st.sampled_from([
        "model.safetensors", "../outside/model.safetensors", "./model.safetensors",
        "sub/../model.safetensors", "..", ".", "", "/etc/hostname", "OUTSIDE_ABS",
        "../outside/secret.json", "model.safetensors/..", "\\..\\outside\\x",
    ]),
    EXTREMES,
)  # fmt: skip


@FUZZ
@given(
    weight_map=st.one_of(
        st.dictionaries(st.text(max_size=30), SHARD_NAMES, max_size=4),
        EXTREMES,
    ),
    keep_names=st.booleans(),
)
def test_fuzzed_shard_index(sources: dict[str, Path], weight_map: Any, keep_names: bool) -> None:
    with _watched() as (sandbox, passed):
        directory = sandbox / "model"
        shutil.copytree(sources["native"], directory)
        shutil.copy(directory / "model.safetensors", sandbox / "outside" / "model.safetensors")
        if isinstance(weight_map, dict):
            outside = str(sandbox / "outside" / "model.safetensors")
            weight_map = {k: outside if v == "OUTSIDE_ABS" else v for k, v in weight_map.items()}
            if keep_names:  # every real tensor mapped somewhere, so the names alone decide
                tensors = load_file(directory / "model.safetensors")
                weight_map |= dict.fromkeys(tensors, "model.safetensors")
        index = {"metadata": {}, "weight_map": weight_map}
        (directory / "model.safetensors.index.json").write_text(json.dumps(index))
        _load_and_check(directory, passed, ("model.safetensors", "weights in", "index.json"))
