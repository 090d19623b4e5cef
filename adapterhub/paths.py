"""Where adapterhub keeps its files, and how it writes them without leaving half-done output."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

ABANDONED_AFTER_S = 3600.0


def home() -> Path:
    """The adapterhub cache root: ``$ADAPTERHUB_HOME`` or ``~/.cache/adapterhub``."""
    return Path(os.environ.get("ADAPTERHUB_HOME", Path.home() / ".cache" / "adapterhub"))


@contextlib.contextmanager
def atomic_dir(final: Path, *, replace: bool = False) -> Iterator[Path]:
    """Yield a temp folder beside ``final`` and rename it to ``final`` only if the block succeeds.

    The temp folder lives in the same parent so the rename is atomic on one filesystem.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    sweep_abandoned(final)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield tmp
        if final.exists():
            if not replace:
                raise FileExistsError(final)
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def sweep_abandoned(final: Path, older_than_s: float = ABANDONED_AFTER_S) -> None:
    """Remove temp folders that a killed writer of ``final`` left behind (a SIGKILL skips ``finally``).

    Only folders untouched for ``older_than_s`` go, so a writer still at work keeps its own.
    """
    cutoff = time.time() - older_than_s
    for pattern in (f".{final.name}.tmp-*", f".{final.name}.old-*"):
        for leftover in final.parent.glob(pattern):
            if leftover.is_dir() and leftover.stat().st_mtime < cutoff:
                shutil.rmtree(leftover, ignore_errors=True)
