"""The sweep spec: validation up front, JSON/YAML round trips, fingerprints, sharding, units."""

from __future__ import annotations

from pathlib import Path

import pytest

from mitk.errors import ConfigError, InputFileError, MitkError
from mitk.sweeps import SweepSpec, current_shard, field_help, parse_shard, read_spec_file
from mitk.sweeps.spec import load_spec_file
from mitk.sweeps.units import plan_units

PAIRS = ({"clean": [0, 1, 2], "corrupted": [0, 3, 2], "answer": 4, "wrong_answer": 5},)


def spec(**changes: object) -> SweepSpec:
    return SweepSpec.from_dict({"pairs": list(PAIRS), **changes})


def test_json_round_trip_gives_an_equal_spec() -> None:
    original = spec(sites=["z:head", "resid_pre"], per=["pos"], layers=[1], align="left-pad")
    assert SweepSpec.from_json(original.to_json()) == original
    assert original.grid() == [("z", "head"), ("resid_pre", "pos")]


def test_yaml_and_json_files_read_the_same(tmp_path: Path) -> None:
    (tmp_path / "s.yaml").write_text(
        "model: toy-induction\npairs_file: p.jsonl\nsites: [z]\nper: [head]\nbatch_size: 4\n"
    )
    (tmp_path / "s.json").write_text(
        '{"model": "toy-induction", "pairs_file": "p.jsonl", '
        '"sites": ["z"], "per": ["head"], "batch_size": 4}'
    )
    from_yaml = SweepSpec.from_dict(read_spec_file(tmp_path / "s.yaml"))
    assert from_yaml == SweepSpec.from_dict(read_spec_file(tmp_path / "s.json"))
    assert from_yaml.grid() == [("z", "head")]


def test_yaml_is_read_safely(tmp_path: Path) -> None:
    path = tmp_path / "evil.yaml"
    path.write_text("model: !!python/object/apply:os.system ['true']\n")
    with pytest.raises(InputFileError, match=r"evil\.yaml:1:8: not valid YAML"):
        read_spec_file(path)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"sites": ["resid_pree"]}, "did you mean 'resid_pre'"),
        ({"sites": ["resid_pre"], "per": ["head"]}, "granularity of site 'resid_pre'"),
        ({"sites": ["z:heads"]}, "got 'heads'"),
        ({"metric": "logitdiff"}, "metric must be one of"),
        ({"align": "pad"}, "align must be one of"),
        ({"batch_size": 0}, "batch_size must be at least 1"),
        ({"sitez": ["z"]}, "unknown spec field 'sitez'; did you mean 'sites'"),
        ({"pairs_file": "p.jsonl"}, "either inline"),
        ({"device_map": "balanced"}, "device_map must be 'auto'"),
    ],
)
def test_bad_specs_name_the_field(changes: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as caught:
        spec(**changes)
    assert isinstance(caught.value, MitkError) and isinstance(caught.value, ValueError)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("pairs_file: p.jsonl\nlayers: [0, a]\n", r"s.yaml:2: layers\[1\]: expected an int"),
        ("pairs_file: p.jsonl\nlayers:\n  - 0\n  - b\n", r"s.yaml:4: layers\[1\]: expected an int"),
        ("pairs_file: p\n\nbatch_size: 2.5\n", r"s.yaml:3: batch_size: expected an int, got 2\.5"),
        ("pairs_file: p.jsonl\nbatch_size: true\n", r"s.yaml:2: batch_size: expected an int"),
        ("pairs_file: [p.jsonl]\n", r"s.yaml:1: pairs_file: expected a string or null"),
        ("pairs_file: p.jsonl\nsites: [z, 3]\n", r"s.yaml:2: sites\[1\]: expected a string, got 3"),
        ("pairs: 5\n", r"s.yaml:1: pairs: expected a list of dict"),
        ("pairs_file: p.jsonl\nmetric: [a]\n", r"s.yaml:2: metric: expected a string, got \['a'\]"),
        ("pairs_file: p.jsonl\nsitez: [z]\n", r"s.yaml:2: unknown spec field 'sitez'"),
        ("pairs_file: p.jsonl\nbatch_size: 0\n", r"s.yaml:2: batch_size must be at least 1"),
        ("a: &x [1]\nb: [*x, *x, *x, *x, *x, *x]\n", r"unknown spec field 'a'"),
    ],
)  # fmt: skip
def test_wrong_types_name_file_line_and_field(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "s.yaml"
    path.write_text(text)
    loaded = load_spec_file(path)
    with pytest.raises(ConfigError, match=message):
        SweepSpec.from_dict(loaded.values, str(path), loaded.places())


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"model: \xff\xfe\n", r"s.yaml:1: not UTF-8 text \(byte 0xff\)"),
        (b"model: x\n\x00\x00", r"s.yaml:2: holds a NUL byte: a binary file"),
        (b"model: [\n", r"s.yaml:2:1: not valid YAML/JSON"),
        (b'{"model": "x",\n "layers": [1,}', r"s.yaml:2:\d+: not valid YAML/JSON"),
        (b"- 1\n- 2\n", r"s.yaml: a spec file holds one mapping"),
        (b"", r"s.yaml: a spec file holds one mapping"),
        (b"[" * 50_000, r"s.yaml: nested too deeply"),
        (b"batch_size: " + b"9" * 5000, r"s.yaml: not a usable YAML/JSON value"),
    ],
)
def test_unreadable_spec_files_name_the_file(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "s.yaml"
    path.write_bytes(content)
    with pytest.raises(InputFileError, match=message):
        load_spec_file(path)


def test_a_bare_site_string_is_one_site() -> None:
    assert spec(sites="resid_pre").sites == ("resid_pre",)


def test_fingerprint_covers_results_not_execution() -> None:
    base = spec().fingerprint("pairs", "model")
    assert spec(device="cuda:1", memory_budget_mb=64).fingerprint("pairs", "model") == base
    assert spec(metric="prob").fingerprint("pairs", "model") != base
    assert spec(batch_size=2).fingerprint("pairs", "model") != base
    assert spec().fingerprint("other pairs", "model") != base


def test_every_field_has_help_text() -> None:
    helps = field_help()
    assert set(helps) == set(SweepSpec.__dataclass_fields__)
    assert all(text and "\n" not in text for text in helps.values())


def test_units_split_pairs_into_fixed_batches_per_site() -> None:
    units = plan_units(10, 4, [("z", "head"), ("resid_pre", "pos")])
    assert [(u.site, u.start, u.stop) for u in units[:3]] == [
        ("z", 0, 4),
        ("z", 4, 8),
        ("z", 8, 10),
    ]
    assert [u.index for u in units] == list(range(6)) and units[3].batch == 0


def test_shards_partition_the_units_deterministically() -> None:
    units = plan_units(10, 2, [("z", "head"), ("k", "pos")])
    shares = [parse_shard(f"{i}/3").take(units) for i in range(3)]
    assert sorted(u.index for share in shares for u in share) == list(range(len(units)))
    assert shares == [parse_shard(f"{i}/3").take(units) for i in range(3)]


def test_shard_comes_from_the_flag_or_torchrun() -> None:
    assert current_shard(None, {}).count == 1
    ranked = current_shard(None, {"RANK": "1", "WORLD_SIZE": "2"})
    assert (ranked.index, ranked.count, ranked.launched) == (1, 2, True)
    assert current_shard("2/4", {}).label() == "2-of-4"
    for bad in ("4/4", "a/b", "3"):
        with pytest.raises(ConfigError, match="shard"):
            current_shard(bad, {})
    with pytest.raises(ConfigError, match="torchrun"):
        current_shard("0/2", {"RANK": "0", "WORLD_SIZE": "2"})
