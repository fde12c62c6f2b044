"""Property-based tests of the CLI contract: hostile specs, pairs files, option values, outputs.

Every generated case runs the real command line in process (``mitk.cli.app.run``)
and must end in exit 2 with ``error: ...`` first, naming the file (or the option)
at fault, and never a traceback. Inputs are checked before any model loads: the
model loader is replaced by one that fails the test. Output targets that pass
their check are followed by an input that fails, so no case does real work.
``CASES`` sums the examples each test asks hypothesis for.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
import pytest
import yaml

from mitk.cli.app import run
from mitk.model import HookedTransformer
from mitk.sweeps.spec import METRICS, SweepSpec

EXAMPLES = {"spec_bytes": 150, "spec_fields": 200, "pairs_jsonl": 150, "pairs_csv": 100,
            "options": 200, "outputs": 100, "sizes": 40, "token_files": 80}  # fmt: skip
CASES = sum(EXAMPLES.values())


def fuzz(name: str) -> Any:
    return settings(
        max_examples=EXAMPLES[name],
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )


JSON_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**30), max_value=10**30)
    | st.floats()  # nan and infinities included
    | st.text(max_size=12)
)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=8,
)
FIELDS = [f for f in SweepSpec.__dataclass_fields__ if f not in ("pairs_file",)] + ["sitez"]
NO_NUL = st.text(  # what a file or an argv can hold: no NUL, no lone surrogate
    alphabet=st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",)),
    max_size=30,
)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with a good pairs file, a good spec, and a file where OUT's parent should be."""
    root = tmp_path_factory.mktemp("fuzz")
    (root / "pairs.jsonl").write_text('{"clean": [0, 1, 2], "corrupted": [0, 3, 2]}\n')
    (root / "good.yaml").write_text("pairs_file: pairs.jsonl\nmetric: kl_to_clean\n")
    (root / "blocker").write_text("a file, so nothing can be created under it")
    return root


@pytest.fixture
def no_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail any case that gets as far as loading a model: inputs are checked before that."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a model was loaded before the inputs were checked")

    monkeypatch.setattr(HookedTransformer, "from_pretrained", classmethod(refuse))


_numbers = itertools.count()


def fresh(workdir: Path, name: str) -> Path:
    """A path not used by any earlier example (examples share the module's folder)."""
    return workdir / f"{next(_numbers)}-{name}"


def mitk(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = run(argv)
    return code, capsys.readouterr().err


def assert_refused(code: int, err: str, *places: str) -> None:
    """Exit 2, ``error:`` first, one of ``places`` named in that first line, no traceback."""
    assert code == 2, err
    assert err.startswith("error: "), err
    assert "Traceback" not in err, err
    first = err.splitlines()[0]
    assert any(place in first for place in places), (places, err)


def bad_out(workdir: Path) -> str:
    """An --out no run may use (its parent is a file): the last check a good input meets."""
    return str(workdir / "blocker" / "out")


@fuzz("spec_bytes")
@given(content=st.binary(max_size=600) | NO_NUL.map(str.encode))
def test_spec_files_of_random_bytes(
    content: bytes, workdir: Path, no_model: None, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = fresh(workdir, "spec.yaml")
    spec.write_bytes(content)
    code, err = mitk(["patch", "--spec", str(spec), "--out", bad_out(workdir)], capsys)
    assert_refused(code, err, str(spec), "pairs file", "--out")


@fuzz("spec_fields")
@given(
    fields=st.dictionaries(st.sampled_from(FIELDS), JSON_VALUES, min_size=1, max_size=4),
    as_json=st.booleans(),
)
def test_specs_with_wrong_types_and_extreme_values(
    fields: dict[str, Any],
    as_json: bool,
    workdir: Path,
    no_model: None,
    capsys: pytest.CaptureFixture[str],
) -> None:
    values = {"pairs_file": str(workdir / "pairs.jsonl"), "metric": "kl_to_clean", **fields}
    spec = fresh(workdir, "spec.json" if as_json else "spec.yaml")
    spec.write_text(json.dumps(values) if as_json else yaml.safe_dump(values))
    code, err = mitk(["patch", "--spec", str(spec), "--out", bad_out(workdir)], capsys)
    # a spec that happens to be valid reaches the output check, which every case fails
    assert_refused(code, err, str(spec), "--out")


PAIR_ROWS = st.lists(
    JSON_VALUES
    | st.fixed_dictionaries(
        {"clean": JSON_VALUES, "corrupted": JSON_VALUES},
        optional={"answer": JSON_VALUES, "wrong_answer": JSON_VALUES},
    ),
    max_size=4,
)


def patch_with_pairs(pairs: Path, metric: str, workdir: Path) -> list[str]:
    spec = fresh(workdir, "spec.yaml")
    spec.write_text(json.dumps({"pairs_file": str(pairs), "metric": metric}))
    return ["patch", "--spec", str(spec), "--out", bad_out(workdir)]


@fuzz("pairs_jsonl")
@given(rows=PAIR_ROWS, garbage=st.none() | st.binary(max_size=200), metric=st.sampled_from(METRICS))
def test_pairs_files_with_wrong_types_or_garbage(
    rows: list[Any],
    garbage: bytes | None,
    metric: str,
    workdir: Path,
    no_model: None,
    capsys: pytest.CaptureFixture[str],
) -> None:
    pairs = fresh(workdir, "pairs.jsonl")
    text = "".join(json.dumps(row) + "\n" for row in rows).encode()
    pairs.write_bytes(text + (garbage or b""))
    code, err = mitk(patch_with_pairs(pairs, metric, workdir), capsys)
    assert_refused(code, err, str(pairs), "--out")


@fuzz("pairs_csv")
@given(
    header=st.sampled_from(["clean,corrupted,answer,wrong_answer", "clean,corrupted", "a,b"]),
    cells=st.lists(st.lists(NO_NUL | st.integers().map(str), max_size=5), max_size=4),
    garbage=st.none() | st.binary(max_size=100),
)
def test_pairs_csv_files(
    header: str,
    cells: list[list[str]],
    garbage: bytes | None,
    workdir: Path,
    no_model: None,
    capsys: pytest.CaptureFixture[str],
) -> None:
    pairs = fresh(workdir, "pairs.csv")
    body = "".join(",".join(row) + "\n" for row in cells)
    pairs.write_bytes(f"{header}\n{body}".encode() + (garbage or b""))
    code, err = mitk(patch_with_pairs(pairs, "logit_diff", workdir), capsys)
    assert_refused(code, err, str(pairs), "--out")


OPTIONS = ["--batch-size", "--memory-budget-mb", "--layers", "--shard", "--site", "--per",
           "--metric", "--align", "--dtype", "--direction", "--device", "--device-map", "--pair",
           "--model"]  # fmt: skip


@fuzz("options")
@given(
    option=st.sampled_from(OPTIONS),
    value=NO_NUL | st.integers(min_value=-(10**40), max_value=10**40).map(str),
)
def test_option_values(
    option: str, value: str, workdir: Path, no_model: None, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["patch", "--spec", str(workdir / "good.yaml"), option, value]
    code, err = mitk([*argv, "--out", bad_out(workdir)], capsys)
    # the parser names the option; the spec check says "command line"; a good value
    # reaches the output check (an unknown --model is left to the loader, after it)
    assert_refused(code, err, option, "command line", "--out", "--pair", "No such option")


TARGET_NAMES = st.text(
    alphabet=st.characters(whitelist_categories=("L", "N"), whitelist_characters=" ._-~$"),
    min_size=1,
    max_size=300,
)


@fuzz("outputs")
@given(
    kind=st.sampled_from(["new", "file", "folder", "under_file", "nested_new"]),
    name=TARGET_NAMES,
    which=st.sampled_from(["--merge", "--dashboard"]),
)
def test_output_targets(
    kind: str,
    name: str,
    which: str,
    workdir: Path,
    no_model: None,
    capsys: pytest.CaptureFixture[str],
) -> None:
    base = fresh(workdir, "t")
    base.mkdir()
    target = base / name
    if kind == "file" and len(name.encode()) < 250 and name not in (".", ".."):
        target.write_text("")
    elif kind == "folder" and len(name.encode()) < 250 and name not in (".", ".."):
        target.mkdir()
    elif kind == "under_file":
        target = workdir / "blocker" / name
    elif kind == "nested_new":
        target = base / name / name
    empty = base / "no-sweep-here"
    argv = (["patch", "--merge", str(target), "--dashboard", str(base / "d.html")]
            if which == "--merge" else
            ["patch", "--merge", str(empty), "--dashboard", str(target)])  # fmt: skip
    code, err = mitk(argv, capsys)
    # a usable target meets the merge, which finds no sweep there: still exit 2
    assert_refused(code, err, which, "holds no sweep")


@fuzz("token_files")
@given(
    rows=st.lists(JSON_VALUES | st.lists(st.integers(min_value=-5, max_value=300), max_size=6),
                  max_size=4),
    garbage=st.none() | st.binary(max_size=100),
    suffix=st.sampled_from([".jsonl", ".safetensors"]),
)  # fmt: skip
def test_token_files(
    rows: list[Any],
    garbage: bytes | None,
    suffix: str,
    workdir: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    tokens = fresh(workdir, f"tokens{suffix}")
    tokens.write_bytes("".join(json.dumps(row) + "\n" for row in rows).encode() + (garbage or b""))
    argv = ["dla", "-m", "toy-induction", "--tokens", str(tokens), "--answer", "1", "--quiet"]
    code, err = mitk(argv, capsys)
    if code != 0:  # rows of token ids in the vocabulary are a good input
        assert_refused(code, err, str(tokens))


@fuzz("sizes")
@given(
    half=st.integers(min_value=1, max_value=8) | st.integers(min_value=9, max_value=10**12),
    count=st.integers(min_value=1, max_value=4) | st.integers(min_value=10**6, max_value=10**15),
)
def test_sizes_are_checked_before_allocating(
    half: int, count: int, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("MITK_MAX_MEMORY_GB", "1")
    argv = ["dla", "-m", "toy-induction", "--induction", str(half), "--n-prompts", str(count)]
    code, err = mitk([*argv, "--quiet"], capsys)
    if half <= 31 and count <= 4:  # the toy model's context fits 2 * 31 + 1 tokens
        assert code == 0, err
    else:
        assert_refused(code, err, "--induction", "GB")


def test_the_suite_size() -> None:
    """The number reported for the fuzz suite: examples asked of hypothesis, all tests together."""
    assert CASES >= 900
