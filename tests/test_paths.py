import os
import time
from pathlib import Path

import pytest

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
