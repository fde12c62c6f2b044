"""The exit-code contract, in process: one table maps exception types to codes for every command."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mitk.cli.app import exit_code, run
from mitk.errors import ConfigError, InputFileError, OutputPathError


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (ConfigError("x"), 2),
        (InputFileError("x"), 2),
        (OutputPathError("x"), 2),
        (FileNotFoundError("x"), 2),
        (PermissionError("x"), 2),
        (IsADirectoryError("x"), 2),
        (json.JSONDecodeError("x", "doc", 0), 2),
        (UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte"), 2),
        (ValueError("deep inside torch"), 1),  # a bug is not bad input
        (RuntimeError("x"), 1),
        (MemoryError(), 1),
        (OSError(28, "No space left on device"), 1),
        (KeyboardInterrupt(), 130),
    ],
)
def test_exception_types_map_to_exit_codes(error: BaseException, code: int) -> None:
    assert exit_code(error) == code


def fail_in_model_loading(monkeypatch: pytest.MonkeyPatch, error: BaseException) -> None:
    def load(*args: object, **kwargs: object) -> None:
        raise error

    monkeypatch.setattr("mitk.cli.dla.load_named_model", load)


def test_a_failure_is_exit_1_with_one_line_and_a_hint(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    fail_in_model_loading(monkeypatch, ValueError("shapes do not broadcast"))
    assert run(["dla", "-m", "toy-induction", "--induction", "3"]) == 1
    err = capsys.readouterr().err
    assert err.splitlines()[0] == "error: ValueError: shapes do not broadcast"
    assert "--debug" in err and "Traceback" not in err


@pytest.mark.parametrize("how", ["flag", "environment"])
def test_debug_shows_the_traceback(
    how: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    fail_in_model_loading(monkeypatch, RuntimeError("kernel failed"))
    argv = ["dla", "-m", "toy-induction", "--induction", "3"]
    if how == "flag":
        argv.insert(0, "--debug")
    else:
        monkeypatch.setenv("MITK_DEBUG", "1")
    assert run(argv) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "in load" in err
    assert "error: RuntimeError: kernel failed" in err


def test_bad_input_is_exit_2_and_debug_keeps_the_code(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    fail_in_model_loading(monkeypatch, ConfigError("unknown model 'x'"))
    assert run(["dla", "-m", "x", "--induction", "3"]) == 2
    err = capsys.readouterr().err
    assert err == "error: unknown model 'x'\n"
    assert run(["--debug", "dla", "-m", "x", "--induction", "3"]) == 2
    assert "Traceback" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["frobnicate"], "error: No such command 'frobnicate'"),
        (["dla", "--seed", "1" * 30], "error: Invalid value for '--seed'"),
        (["dla", "--n-prompts", "0"], "error: Invalid value for '--n-prompts'"),
        (["dla", "--device", "cuda:99"], "error: Invalid value for '--device'"),
        (["--lock-wait", "-1", "models"], "error: Invalid value for '--lock-wait'"),
    ],
)
def test_usage_errors_are_exit_2_with_one_line_first(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(argv) == 2
    assert capsys.readouterr().err.startswith(message)


def test_outputs_are_checked_before_the_model_loads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    fail_in_model_loading(monkeypatch, AssertionError("the model was loaded"))
    monkeypatch.setattr("mitk.cli.circuits.load_named_model", lambda *a: pytest.fail("loaded"))
    (tmp_path / "file").write_text("")
    cases = [
        (["dla", "-m", "toy-induction", "--induction", "3", "--out", str(tmp_path)], "is a folder"),
        (["circuits", "-m", "toy-induction", "--out", str(tmp_path / "file")], "is a file"),
        (["dla", "-m", "t", "--induction", "3", "--out", str(tmp_path / "file" / "x.parquet")],
         "is a file, so nothing can go under it"),
        (["sae", "train", "-m", "t", "--hook", "h", "--induction", "3", "--out",
          str(tmp_path / "sae"), "--log-csv", "--checkpoint-dir", str(tmp_path / "file")],
         "--checkpoint-dir"),
        (["dashboard", "x.parquet", "--out", str(tmp_path)], "--out"),
        (["demo", "--out", str(tmp_path)], "is a folder"),
    ]  # fmt: skip
    for argv, message in cases:
        assert run(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err, err


def test_a_sae_config_of_the_wrong_types_is_refused_by_field(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr("mitk.cli.sae.load_named_model", lambda *a: pytest.fail("loaded"))
    config = tmp_path / "cfg.json"
    argv = ["sae", "train", "-m", "t", "--hook", "h", "--induction", "3", "--out",
            str(tmp_path / "sae"), "--config", str(config)]  # fmt: skip
    for text, message in [
        ('{"batch_size": 2.5}', "cfg.json: batch_size must be an int, got 2.5"),
        ('{"lr": "fast"}', "cfg.json: lr must be a finite number"),
        ("[1, 2]", "must hold a JSON object"),
        ("\x00\x01", "holds a NUL byte"),
    ]:
        config.write_text(text)
        assert run(argv) == 2
        assert message in capsys.readouterr().err
    config.write_bytes(b"\xff\xfe{")
    assert run(argv) == 2
    assert "not UTF-8 text" in capsys.readouterr().err
