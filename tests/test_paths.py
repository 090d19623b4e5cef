import errno
import os
import stat
import time
from pathlib import Path

import pytest

from adapterhub.errors import UserError
from adapterhub.paths import atomic_dir


def test_atomic_dir_appears_only_on_success(tmp_path: Path) -> None:
    final = tmp_path / "out"
    with pytest.raises(RuntimeError), atomic_dir(final) as tmp:
        (tmp / "half.txt").write_text("half")
        raise RuntimeError("crash")
    assert list(tmp_path.iterdir()) == []
    with atomic_dir(final) as tmp:
        (tmp / "whole.txt").write_text("whole")
    assert (final / "whole.txt").read_text() == "whole"
    with pytest.raises(FileExistsError), atomic_dir(final):
        pass
    with atomic_dir(final, replace=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert [p.name for p in final.iterdir()] == ["new.txt"]


def test_folders_left_by_a_killed_writer_are_swept(tmp_path: Path) -> None:
    abandoned = tmp_path / ".out.tmp-killed"
    abandoned.mkdir()
    an_hour_ago = time.time() - 3700
    os.utime(abandoned, (an_hour_ago, an_hour_ago))
    in_progress = tmp_path / ".out.tmp-working"
    in_progress.mkdir()
    with atomic_dir(tmp_path / "out") as tmp:
        (tmp / "f").write_text("x")
    assert not abandoned.exists()
    assert in_progress.exists(), "a writer still at work keeps its folder"


@pytest.mark.parametrize(
    ("code", "words"),
    [
        (errno.ENOSPC, "no space left on the device: free some space"),
        (errno.EROFS, "the file system is read-only: choose a writable folder"),
        (errno.EACCES, "permission denied: choose a folder you can write to"),
    ],
)
def test_a_full_disk_or_read_only_folder_is_one_line_naming_the_path(
    tmp_path: Path, code: int, words: str
) -> None:
    final = tmp_path / "out"
    with pytest.raises(UserError) as refused, atomic_dir(final) as tmp:
        (tmp / "adapter_model.safetensors").write_bytes(b"half")
        raise OSError(code, os.strerror(code))  # what a write() that fails mid-file raises: no file name
    assert str(refused.value).startswith(f"{final}: {words}")
    assert list(tmp_path.iterdir()) == [], "nothing half-written is left"


def test_written_folders_and_files_follow_the_umask(tmp_path: Path) -> None:
    previous = os.umask(0o027)
    try:
        with atomic_dir(tmp_path / "out") as tmp:
            (tmp / "weights").write_bytes(b"w")
            os.chmod(tmp / "weights", 0o600)  # as safetensors leaves it
            (tmp / "run.sh").write_text("#!/bin/sh\n")
            os.chmod(tmp / "run.sh", 0o700)
    finally:
        os.umask(previous)
    modes = {
        path.name: stat.S_IMODE(path.stat().st_mode)
        for path in [tmp_path / "out", *(tmp_path / "out").iterdir()]
    }
    assert modes == {"out": 0o750, "weights": 0o640, "run.sh": 0o750}
