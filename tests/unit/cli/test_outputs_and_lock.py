"""Output targets checked before any work, and one run per output folder (the lock)."""

from __future__ import annotations

import json
import os
from pathlib import Path
import signal
import subprocess
import sys
import threading
import time

import pytest

from mitk.cli.app import run
from mitk.cli.lock import lock_path, output_lock
from mitk.cli.outputs import check_output_dir, check_output_file
from mitk.errors import OutputLockedError, OutputPathError


def test_output_targets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "file").write_text("")
    check_output_file(tmp_path / "new" / "deeper" / "page.html", "--out")  # parents get made
    check_output_dir(tmp_path / "new" / "folder", "--out")
    check_output_dir(tmp_path, "--out")
    check_output_file(None, "--out")
    bad = [
        (check_output_file, tmp_path, "--out .*: is a folder; give a file path"),
        (check_output_dir, tmp_path / "file", "is a file; give a folder"),
        (check_output_file, tmp_path / "file" / "x.html", "file is a file, so nothing can go"),
        (check_output_dir, tmp_path / "file" / "a" / "b", "file is a file, so nothing can go"),
        (check_output_file, tmp_path / ("x" * 5000), "unusable path"),
    ]
    for check, path, message in bad:
        with pytest.raises(OutputPathError, match=message):
            check(path, "--out")
    assert not (tmp_path / "new").exists()  # checking creates nothing

    def unwritable(*args: object, **kwargs: object) -> None:  # root may write anywhere
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr("tempfile.NamedTemporaryFile", unwritable)
    with pytest.raises(OutputPathError, match=r"--dashboard .*: cannot write in .*Permission"):
        check_output_file(tmp_path / "d.html", "--dashboard")


def test_a_second_holder_is_refused_by_pid_and_the_lock_file_goes(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with output_lock(out, "--out") as path:
        assert path == lock_path(out) and path.parent == tmp_path
        holder = json.loads(path.read_text())
        assert holder["pid"] == os.getpid()
        refused = pytest.raises(
            OutputLockedError, match=f"--out {out} is in use by pid {os.getpid()}"
        )
        with refused, output_lock(out, "--out"):
            pass
        with output_lock(out, "--out", name="shard-1-of-2"):  # shards lock apart
            pass
    assert not lock_path(out).exists()
    with output_lock(out, "--out"):  # free again
        pass
    (tmp_path / "file").write_text("")
    unusable = pytest.raises(OutputPathError, match="cannot create its lock file")
    with unusable, output_lock(tmp_path / "file" / "out", "--out"):
        pass


def test_waiting_for_the_lock(tmp_path: Path) -> None:
    out, held = tmp_path / "out", threading.Event()

    def hold_briefly() -> None:
        with output_lock(out):
            held.set()
            time.sleep(0.6)

    thread = threading.Thread(target=hold_briefly)
    thread.start()
    held.wait()
    start = time.monotonic()
    with output_lock(out, wait_seconds=30):
        assert time.monotonic() - start > 0.3
    thread.join()


HOLD = """
import sys, time
from pathlib import Path
from mitk.cli.lock import output_lock
with output_lock(Path(sys.argv[1]), "--out", sys.argv[2]):
    print("held", flush=True)
    time.sleep(120)
"""


def test_another_process_holds_it_until_killed_then_it_is_taken_over(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    spec = tmp_path / "spec.yaml"
    (tmp_path / "p.jsonl").write_text('{"clean": [0, 1], "corrupted": [0, 2]}\n')
    spec.write_text("pairs_file: p.jsonl\nmetric: kl_to_clean\n")
    name = "shard-0-of-1"  # what a sweep's single run locks
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(out), name], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        assert run(["patch", "--spec", str(spec), "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: --out {out} is in use by pid {holder.pid} on ")
        assert "--lock-wait" in err
    finally:
        holder.send_signal(signal.SIGKILL)  # no cleanup: the lock file stays behind
        holder.wait()
        holder.stdout.close()  # type: ignore[union-attr]
    assert lock_path(out, name).exists() and not out.exists()  # refused before any work
    with output_lock(out, "--out", name):
        assert json.loads(lock_path(out, name).read_text())["pid"] == os.getpid()
    warning = capsys.readouterr().err
    assert f"taking over the lock left by pid {holder.pid}" in warning
    assert "no longer running" in warning
