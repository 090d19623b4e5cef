"""Where adapterhub keeps its files, and how it writes them without leaving half-done output.

Writers make a folder appear whole by one rename (``atomic_dir``) and keep a second writer of the
same folder out with an exclusive lock (``exclusive_lock``); a replace that a kill interrupted
between its two renames is undone on the next access (``restore_orphaned``).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import shutil
import tempfile
import threading
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
_OLD_COPY = re.compile(r"\.old-(\d+)$")
_locks_held = threading.local()  # lock files this thread holds: a holder may re-enter its own lock


def home() -> Path:
    """The adapterhub cache root: ``$ADAPTERHUB_HOME`` or ``~/.cache/adapterhub``."""
    return Path(os.environ.get("ADAPTERHUB_HOME", Path.home() / ".cache" / "adapterhub"))


@contextlib.contextmanager
def atomic_dir(final: Path, *, replace: bool = False) -> Iterator[Path]:
    """Yield a temp folder beside ``final`` and rename it to ``final`` only if the block succeeds.

    The temp folder lives in the same parent so the rename is atomic on one filesystem. Replacing
    takes two renames (``final`` aside to ``.NAME.old-PID``, the temp folder in); a kill between
    them leaves the old copy, which ``restore_orphaned`` puts back.
    """
    final = Path(final)
    with disk_errors(final):
        final.parent.mkdir(parents=True, exist_ok=True)
        restore_orphaned(final)
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
            try:
                tmp.rename(final)
            except BaseException:
                old.rename(final)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def restore_orphaned(final: Path) -> bool:
    """Put back the old copy of ``final`` that a writer killed mid-replace left; True if it did.

    Only when ``final`` is missing and the writer (the PID in the name) is gone: a live writer is
    between its two renames and is about to finish.
    """
    final = Path(final)
    if final.exists() or not final.parent.is_dir():
        return False
    for old in sorted(final.parent.glob(f".{final.name}.old-*")):
        match = _OLD_COPY.search(old.name)
        if match is None or not old.is_dir() or _process_alive(int(match.group(1))):
            continue
        with contextlib.suppress(FileNotFoundError, OSError):  # another reader restored it first
            old.rename(final)
            return True
    return False


def sweep_abandoned(final: Path, older_than_s: float = ABANDONED_AFTER_S) -> None:
    """Remove temp folders that a killed writer of ``final`` left behind (a SIGKILL skips ``finally``).

    Only folders untouched for ``older_than_s`` go, so a writer still at work keeps its own; an old
    copy goes only once ``final`` is back in place (otherwise it is what ``restore_orphaned`` restores).
    """
    cutoff = time.time() - older_than_s
    patterns = [f".{final.name}.tmp-*"] + ([f".{final.name}.old-*"] if final.exists() else [])
    for pattern in patterns:
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


@contextlib.contextmanager
def exclusive_lock(lock_file: Path, what: str, fix: str) -> Iterator[None]:
    """Hold an exclusive lock on ``lock_file`` for the block, or fail at once naming the holder's PID.

    ``what`` names the thing being written and ``fix`` what the user can do instead, for the one-line
    error. The lock is an ``flock`` the kernel drops when its holder dies, so a killed writer never
    leaves a stale lock; the file holds the holder's PID and is removed on release. The same thread
    may take a lock it already holds.
    """
    lock_file = Path(lock_file)
    held: set[Path] = _locks_held.__dict__.setdefault("paths", set())
    key = lock_file.absolute()
    if key in held:
        yield
        return
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    descriptor = _acquire(lock_file, what, fix)
    held.add(key)
    try:
        yield
    finally:
        held.discard(key)
        # Unlink before unlocking: a waiter that then locks the unlinked file sees it is stale.
        with contextlib.suppress(FileNotFoundError):
            lock_file.unlink()
        os.close(descriptor)


def _acquire(lock_file: Path, what: str, fix: str) -> int:
    while True:
        descriptor = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            holder = os.pread(descriptor, 32, 0).decode(errors="replace").strip()
            os.close(descriptor)
            if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise
            pid = f"PID {holder}" if holder.isdigit() else "PID unknown"
            raise UserError(f"{what} is being written by another adapterhub process ({pid}): {fix}") from err
        try:
            same_file = os.fstat(descriptor).st_ino == os.stat(lock_file).st_ino
        except FileNotFoundError:
            same_file = False
        if same_file:
            os.ftruncate(descriptor, 0)
            os.pwrite(descriptor, str(os.getpid()).encode(), 0)
            return descriptor
        os.close(descriptor)  # the previous holder removed this file as we locked it: take the new one


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True
