"""Where adapterhub keeps its files, and how it writes them without leaving half-done output."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from adapterhub.errors import UserError

ABANDONED_AFTER_S = 3600.0
# What to do about an OSError that no retry fixes, by errno.
DISK_PROBLEMS = {
    errno.ENOSPC: ("no space left on the device", "free some space or choose a folder on another disk"),
    errno.EDQUOT: ("disk quota exceeded", "free some space or choose a folder on another disk"),
    errno.EROFS: ("the file system is read-only", "choose a writable folder"),
    errno.EACCES: ("permission denied", "choose a folder you can write to, or fix its permissions"),
    errno.EPERM: ("operation not permitted", "choose a folder you can write to, or fix its permissions"),
}


def home() -> Path:
    """The adapterhub cache root: ``$ADAPTERHUB_HOME`` or ``~/.cache/adapterhub``."""
    return Path(os.environ.get("ADAPTERHUB_HOME", Path.home() / ".cache" / "adapterhub"))


@contextlib.contextmanager
def atomic_dir(final: Path, *, replace: bool = False) -> Iterator[Path]:
    """Yield a temp folder beside ``final`` and rename it to ``final`` only if the block succeeds.

    The temp folder lives in the same parent so the rename is atomic on one filesystem.
    """
    final = Path(final)
    with disk_errors(final):
        final.parent.mkdir(parents=True, exist_ok=True)
        sweep_abandoned(final)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        with disk_errors(final):
            yield tmp
            apply_umask(tmp)
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


def current_umask() -> int:
    """The process umask (read from /proc on Linux; elsewhere set and restored at once)."""
    with contextlib.suppress(OSError, ValueError, StopIteration):
        status = Path("/proc/self/status").read_text().splitlines()
        return int(next(line for line in status if line.startswith("Umask:")).split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask(folder: Path) -> None:
    """Give ``folder`` and everything in it the modes the user's umask asks for.

    ``mkdtemp`` makes folders 0700 and some writers (safetensors, huggingface_hub's downloads) make
    files 0600, so without this another user or a container with another uid could not read them.
    Executable bits are kept only where the file had them.
    """
    mask = current_umask()
    for path in [folder, *folder.rglob("*")]:
        if path.is_symlink():
            continue
        if path.is_dir():
            path.chmod(0o777 & ~mask)
        else:
            executable = path.stat().st_mode & 0o111
            path.chmod((0o777 if executable else 0o666) & ~mask)


@contextlib.contextmanager
def disk_errors(target: Path) -> Iterator[None]:
    """Turn a full disk, a read-only file system or a permission error under ``target`` into one line."""
    try:
        yield
    except OSError as err:
        known = disk_error(err, target)
        if known is None:
            raise
        raise known from err


def disk_error(err: OSError, target: Path | None = None) -> UserError | None:
    """The one-line ``UserError`` for an OSError in ``DISK_PROBLEMS`` (naming its file, else ``target``)."""
    if err.errno not in DISK_PROBLEMS:
        return None
    what, fix = DISK_PROBLEMS[err.errno]
    where = err.filename or target
    return UserError(f"{where}: {what}: {fix}" if where else f"{what}: {fix}")
