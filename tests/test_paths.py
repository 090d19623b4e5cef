import errno
import json
import os
import signal
import stat
import subprocess
import sys
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


# A writer replacing ``argv[1]`` that is killed (SIGKILL) between the replace's two renames.
KILLED_BETWEEN_RENAMES = """
import os, pathlib, signal, sys
from adapterhub.paths import atomic_dir

real_rename = pathlib.Path.rename
def rename_then_die(self, target):
    result = real_rename(self, target)
    if ".old-" in str(target):
        os.kill(os.getpid(), signal.SIGKILL)
    return result
pathlib.Path.rename = rename_then_die
with atomic_dir(pathlib.Path(sys.argv[1]), replace=True) as tmp:
    (tmp / "f").write_text("new")
"""


def test_a_replace_killed_between_its_renames_is_undone_on_the_next_access(tmp_path: Path) -> None:
    from adapterhub.paths import restore_orphaned

    final = tmp_path / "entry"
    with atomic_dir(final) as tmp:
        (tmp / "f").write_text("old")
    killed = subprocess.run([sys.executable, "-c", KILLED_BETWEEN_RENAMES, str(final)], timeout=60)
    assert killed.returncode == -signal.SIGKILL
    assert not final.exists() and [p.name for p in tmp_path.glob(".entry.old-*")]
    assert restore_orphaned(final)
    assert (final / "f").read_text() == "old"
    with atomic_dir(final, replace=True) as tmp:  # the killed writer's temp folder is swept in time
        (tmp / "f").write_text("newer")
    assert (final / "f").read_text() == "newer"
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".entry.tmp-")) == ["entry"]


def test_a_store_entry_left_mid_replace_is_listed_again(tmp_path: Path, monkeypatch) -> None:
    from adapterhub.hub import store

    monkeypatch.setenv("ADAPTERHUB_HOME", str(tmp_path))
    entry = store.root() / "kept"
    entry.mkdir(parents=True)
    fields = {"name": "kept", "source": "a/b", "revision": None, "method": "lora", "base_model": "m"}
    manifest = {**fields, "rank": 4, "num_virtual_tokens": None, "params": 1}
    (entry / "manifest.json").write_text(json.dumps(manifest))
    finished = subprocess.Popen(["true"])
    finished.wait()
    entry.rename(entry.with_name(f".kept.old-{finished.pid}"))  # left by a process that is gone
    assert [listed.name for listed in store.entries()] == ["kept"]
    assert store.exists("kept") and not list(store.root().glob(".kept.old-*"))


def test_a_lock_admits_one_writer_and_names_it_to_the_next(tmp_path: Path) -> None:
    from adapterhub.errors import UserError
    from adapterhub.paths import exclusive_lock

    lock_file = tmp_path / ".out.lock"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, pathlib\nfrom adapterhub.paths import exclusive_lock\n"
            "with exclusive_lock(pathlib.Path(sys.argv[1]), 'x', 'y'):\n"
            "    print('held', flush=True); sys.stdin.read()",
            str(lock_file),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(UserError) as refused, exclusive_lock(lock_file, "output dir out", "pick another"):
            pass
        assert str(refused.value) == (
            f"output dir out is being written by another adapterhub process (PID {holder.pid}): pick another"
        )
    finally:
        holder.communicate("", timeout=60)
    assert not lock_file.exists(), "released locks leave no file"
    lock_file.write_text("999999999")  # what a killed holder leaves: a file nobody has locked
    with exclusive_lock(lock_file, "x", "y"), exclusive_lock(lock_file, "x", "y"):  # the holder may re-enter
        assert lock_file.read_text() == str(os.getpid())
    assert not lock_file.exists()
