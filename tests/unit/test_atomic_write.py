"""mitk.atomic: whole files and folders or nothing, mode 0644, no temp files left on failure."""

from __future__ import annotations

from pathlib import Path
import signal
import subprocess
import sys
import tempfile

from hypothesis import given, settings
from hypothesis import strategies as st
import pytest

from mitk.atomic import (
    atomic_folder,
    atomic_write,
    atomic_write_bytes,
    atomic_write_text,
    complete_folder,
    discard_folder,
    move_folder,
    remove_leftovers,
    set_aside_path,
)


class WriterError(Exception):
    pass


def names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_write_creates_parents_and_returns_the_path(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b" / "out.bin"
    assert atomic_write_bytes(target, b"\x00\x01") == target
    assert target.read_bytes() == b"\x00\x01"
    assert atomic_write_text(str(target), "é\r\n") == target  # str paths too
    assert target.read_bytes() == "é\r\n".encode()  # utf-8, newlines untranslated
    assert names(target.parent) == ["out.bin"]


def test_files_are_0644_whatever_mkstemp_gave(tmp_path: Path) -> None:
    target = atomic_write(tmp_path / "x.txt", lambda temp: temp.write_text("x"))
    assert target.stat().st_mode & 0o777 == 0o644


def test_writer_may_recreate_the_temp_file(tmp_path: Path) -> None:
    def recreate(temp: Path) -> None:
        temp.unlink()
        temp.write_bytes(b"new")

    assert atomic_write(tmp_path / "x", recreate).read_bytes() == b"new"


@pytest.mark.parametrize("error", [WriterError("boom"), KeyboardInterrupt()])
def test_failing_writer_keeps_the_old_file_and_leaves_no_temp(
    tmp_path: Path, error: BaseException
) -> None:
    target = atomic_write_bytes(tmp_path / "x", b"old")

    def fail(temp: Path) -> None:
        temp.write_bytes(b"half")
        raise error

    with pytest.raises(type(error)):
        atomic_write(target, fail)
    assert target.read_bytes() == b"old"
    assert names(tmp_path) == ["x"]


def test_failing_first_write_leaves_nothing(tmp_path: Path) -> None:
    with pytest.raises(WriterError):
        atomic_write(tmp_path / "x", lambda temp: (_ for _ in ()).throw(WriterError()))
    assert names(tmp_path) == []


@settings(max_examples=60, deadline=None)
@given(
    old=st.binary(max_size=2048),
    new=st.binary(max_size=2048),
    fail_after=st.none() | st.integers(min_value=0, max_value=2048),
)
def test_any_payload_any_failure_point(old: bytes, new: bytes, fail_after: int | None) -> None:
    """The target holds exactly the old or the new payload, never a mix; no temp file stays."""
    with tempfile.TemporaryDirectory() as folder:
        target = atomic_write_bytes(Path(folder) / "f", old)

        def writer(temp: Path) -> None:
            with temp.open("wb") as handle:
                if fail_after is not None and fail_after <= len(new):
                    handle.write(new[:fail_after])
                    raise WriterError
                handle.write(new)

        fails = fail_after is not None and fail_after <= len(new)
        if fails:
            with pytest.raises(WriterError):
                atomic_write(target, writer)
        else:
            atomic_write(target, writer)
        assert target.read_bytes() == (old if fails else new)
        assert names(Path(folder)) == ["f"]


def test_folder_appears_whole_with_folder_mode(tmp_path: Path) -> None:
    target = tmp_path / "run"
    with atomic_folder(target) as staging:
        assert staging.parent == tmp_path and not target.exists()
        (staging / "a.txt").write_text("a")
        (staging / "sub").mkdir()
        (staging / "sub" / "b.txt").write_text("b")
    assert names(target) == ["a.txt", "sub"] and (target / "sub" / "b.txt").read_text() == "b"
    assert target.stat().st_mode & 0o777 == 0o755
    assert names(tmp_path) == ["run"]


def test_folder_replaces_the_old_one_whole(tmp_path: Path) -> None:
    target = tmp_path / "run"
    with atomic_folder(target) as staging:
        (staging / "old-only.txt").write_text("1")
    with atomic_folder(target) as staging:
        (staging / "new.txt").write_text("2")
    assert names(target) == ["new.txt"]
    assert names(tmp_path) == ["run"]  # the old copy set aside is gone


@pytest.mark.parametrize("error", [WriterError("boom"), KeyboardInterrupt()])
def test_failing_folder_keeps_the_old_one(tmp_path: Path, error: BaseException) -> None:
    target = tmp_path / "run"
    with atomic_folder(target) as staging:
        (staging / "old.txt").write_text("old")
    with pytest.raises(type(error)), atomic_folder(target) as staging:
        (staging / "new.txt").write_text("half")
        raise error
    assert names(target) == ["old.txt"]
    assert names(tmp_path) == ["run"]


def test_crash_between_the_renames_leaves_the_old_folder_findable(tmp_path: Path) -> None:
    """Killed after the old folder was set aside and before the new one was renamed in."""
    target = tmp_path / "run"
    with atomic_folder(target) as staging:
        (staging / "v").write_text("1")
    target.rename(set_aside_path(target))  # the state that crash leaves behind
    found = complete_folder(target)
    assert found is not None and (found / "v").read_text() == "1"
    with atomic_folder(target) as staging:  # the next write recovers
        (staging / "v").write_text("2")
    assert complete_folder(target) == target and (target / "v").read_text() == "2"
    assert names(tmp_path) == ["run"]


def test_crash_after_the_swap_leaves_a_stale_copy_that_the_next_write_clears(
    tmp_path: Path,
) -> None:
    target = tmp_path / "run"
    with atomic_folder(target) as staging:
        (staging / "v").write_text("new")
    set_aside_path(target).mkdir()  # the old copy a crash kept from being deleted
    (set_aside_path(target) / "v").write_text("old")
    assert complete_folder(target) == target  # the newer, complete folder wins
    with atomic_folder(target) as staging:
        (staging / "v").write_text("newer")
    assert names(tmp_path) == ["run"] and (target / "v").read_text() == "newer"


def test_folder_over_a_file_is_refused(tmp_path: Path) -> None:
    atomic_write_bytes(tmp_path / "run", b"")
    with pytest.raises(FileExistsError), atomic_folder(tmp_path / "run"):
        pass
    assert names(tmp_path) == ["run"]


def test_no_folder_yet_means_none(tmp_path: Path) -> None:
    assert complete_folder(tmp_path / "never") is None


def test_leftovers_of_the_named_targets_are_removed_and_nothing_else(tmp_path: Path) -> None:
    atomic_write_bytes(tmp_path / "run.bin", b"whole")
    (tmp_path / "run").mkdir()
    ours = [
        tmp_path / ".run.bin.ab_c1234.tmp",
        tmp_path / ".run.tmp-0123abcd",
        tmp_path / ".run.old",
    ]
    ours[0].write_bytes(b"half")
    for folder in ours[1:]:
        folder.mkdir()
        (folder / "f").write_bytes(b"half")
    kept = [
        tmp_path / ".other.bin.ab_c1234.tmp",  # another target's: maybe someone else's write
        tmp_path / ".run.bin.short.tmp",  # not a name mkstemp gives
        tmp_path / "run.bin.ab_c1234.tmp",  # not hidden
        tmp_path / ".gone.old",  # gone/ is missing: this is its last complete copy
    ]
    for path in kept:
        path.write_bytes(b"keep")
    (tmp_path / ".run.tmp-link5678").symlink_to(tmp_path / "run")
    removed = remove_leftovers(tmp_path, ["run.bin", "run", "gone"])
    assert sorted(removed) == sorted(ours)
    assert names(tmp_path) == sorted(
        [".run.tmp-link5678", "run", "run.bin", *(p.name for p in kept)]
    )
    assert remove_leftovers(tmp_path / "absent", ["run"]) == []


KILLED_MIDWAY = """
import os, signal, sys
from mitk.atomic import atomic_folder, atomic_write
def die(temp):
    temp.write_bytes(b"half")
    os.kill(os.getpid(), signal.SIGKILL)
if sys.argv[2] == "file":
    atomic_write(sys.argv[1] + "/x", die)
with atomic_folder(sys.argv[1] + "/y") as staging:
    die(staging / "f")
"""


@pytest.mark.parametrize("kind", ["file", "folder"])
def test_what_a_sigkill_leaves_is_found_and_removed(tmp_path: Path, kind: str) -> None:
    done = subprocess.run([sys.executable, "-c", KILLED_MIDWAY, str(tmp_path), kind], timeout=120)
    assert done.returncode == -signal.SIGKILL
    assert len(names(tmp_path)) == 1  # the temp file or staging folder
    assert len(remove_leftovers(tmp_path, ["x", "y"])) == 1
    assert names(tmp_path) == []


def test_a_discarded_folder_goes_whole(tmp_path: Path) -> None:
    with atomic_folder(tmp_path / "run") as staging:
        (staging / "a").write_text("a")
    discard_folder(tmp_path / "run")
    assert names(tmp_path) == []


@pytest.mark.parametrize("target_exists", [False, True])
def test_a_moved_folder_replaces_the_target_whole(tmp_path: Path, target_exists: bool) -> None:
    (tmp_path / "latest").mkdir()
    (tmp_path / "latest" / "new").write_text("new")
    if target_exists:
        (tmp_path / "previous").mkdir()
        (tmp_path / "previous" / "old").write_text("old")
    move_folder(tmp_path / "latest", tmp_path / "previous")
    assert names(tmp_path) == ["previous"]
    assert names(tmp_path / "previous") == ["new"]
