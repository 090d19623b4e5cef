"""Training checkpoints that a kill cannot leave half-written as the one to resume from.

transformers writes ``checkpoint-N`` file by file. Once every file of it is written, adapterhub
drops a ``COMPLETE`` marker in it and only then deletes the older checkpoints, so at any moment
the newest marked checkpoint is whole; ``training.resume=true`` continues from that one and removes
unmarked ones (a save that a kill or a full disk interrupted).
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

COMPLETE = "COMPLETE"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def step_of(folder: Path) -> int | None:
    match = _CHECKPOINT.match(folder.name)
    return int(match.group(1)) if match else None


def checkpoints(root: Path) -> list[Path]:
    """``checkpoint-N`` folders under ``root``, newest (highest N) first."""
    if not root.is_dir():
        return []
    found = [path for path in root.iterdir() if path.is_dir() and step_of(path) is not None]
    return sorted(found, key=step_of, reverse=True)


def is_complete(folder: Path) -> bool:
    return (folder / COMPLETE).is_file()


def mark_complete_and_prune(folder: Path) -> None:
    """Mark ``folder`` whole, then delete every other checkpoint beside it (keeping one, as before)."""
    (folder / COMPLETE).write_text(f"{step_of(folder)}\n")
    for other in checkpoints(folder.parent):
        if other != folder:
            remove(other)


def newest_complete(root: Path) -> tuple[Path | None, list[Path]]:
    """The newest complete checkpoint under ``root``, and the incomplete ones newer than it."""
    incomplete = []
    for folder in checkpoints(root):
        if is_complete(folder):
            return folder, incomplete
        incomplete.append(folder)
    return None, incomplete


def remove(folder: Path) -> None:
    # Renamed first, so a kill mid-delete never leaves a half-deleted folder named like a checkpoint.
    doomed = folder.with_name(f".{folder.name}.deleting")
    shutil.rmtree(doomed, ignore_errors=True)
    folder.rename(doomed)
    shutil.rmtree(doomed, ignore_errors=True)
