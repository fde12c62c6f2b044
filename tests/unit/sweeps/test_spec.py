"""The sweep spec: validation up front, JSON/YAML round trips, fingerprints, sharding, units."""

from __future__ import annotations

from pathlib import Path

import pytest

from mitk.errors import ConfigError, MitkError
from mitk.sweeps import SweepSpec, current_shard, field_help, parse_shard, read_spec_file
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
    with pytest.raises(ConfigError, match=r"evil\.yaml:1"):
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
