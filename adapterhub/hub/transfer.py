"""Bounds on one pull: a size cap, an overall deadline, cancellation, and a full disk said in one line.

The repo's listed file sizes are checked against the cap (and the free disk) before any byte is
fetched. While huggingface_hub downloads, every chunk it reports passes through ``TransferBudget``,
which cuts the transfer once more bytes arrived than the listing promised (a restarted transfer
counts again), once the deadline is past, or once the caller cancels; the exception it raises ends
the download, and the pull's temp folder goes with it.
"""

from __future__ import annotations

import re
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from adapterhub.errors import UserError

GB = 1 << 30
# A rank-64 LoRA on every linear layer of Llama-2-70B has 0.83 B parameters, 1.7 GB in bf16: room for six.
DEFAULT_MAX_BYTES = 10 * GB
DEFAULT_DEADLINE_S = 3600.0
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


@dataclass(frozen=True)
class PullLimits:
    max_bytes: int = DEFAULT_MAX_BYTES
    deadline_s: float = DEFAULT_DEADLINE_S


DEFAULT_LIMITS = PullLimits()


class PullCancelled(UserError):
    """The caller (a server request that went away, a shutdown) stopped the pull."""


def parse_size(text: str, option: str = "--max-size") -> int:
    """``"10GB"``, ``"512 MiB"``, ``"2048"`` (bytes) -> bytes; units are binary (1 KB = 1024 B)."""
    match = _SIZE.match(text)
    if match is None:
        raise UserError(f"{option} '{text}' is not a size: write e.g. 500MB, 10GB or a number of bytes")
    number, unit = match.groups()
    return int(float(number) * _UNITS[(unit or "").upper()[:1]])


def human_size(size: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TB"


def check_listing(repo: str, listed: int | None, limits: PullLimits, into: Path) -> None:
    """Refuse, before any byte is fetched, a repo whose listed files pass the cap or the free disk."""
    if listed is None:
        return
    if listed > limits.max_bytes:
        raise UserError(
            f"{repo} lists {human_size(listed)} of adapter files, over the {human_size(limits.max_bytes)} "
            "limit on pulls: pull it with a larger --max-size if you trust it"
        )
    into.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(into).free
    if listed > free:
        raise UserError(
            f"pulling {repo} needs {human_size(listed)} but {into} has {human_size(free)} free: "
            "free some space or set ADAPTERHUB_HOME to a larger disk"
        )


class TransferBudget:
    """Counts the bytes a pull receives and stops it at the cap, the deadline or a cancel."""

    def __init__(
        self, repo: str, listed: int | None, limits: PullLimits, cancel: threading.Event | None = None
    ) -> None:
        self.repo, self.listed, self.limits, self.cancel = repo, listed, limits, cancel
        # Twice the listing leaves room for one transfer restarted from the start (a server that
        # ignores Range); a repo that sends more than that is lying about its files.
        self.allowed = limits.max_bytes if listed is None else min(limits.max_bytes, 2 * listed)
        self.deadline = time.monotonic() + limits.deadline_s
        self.received = 0

    def take(self, size: float) -> None:
        """Account for ``size`` more bytes (huggingface_hub reports a restart as a negative size)."""
        self.received += max(0, int(size))
        self.check()

    def check(self) -> None:
        if self.cancel is not None and self.cancel.is_set():
            raise PullCancelled(f"the pull of {self.repo} was cancelled")
        if self.received > self.allowed:
            if self.listed is not None and self.allowed < self.limits.max_bytes:
                raise UserError(
                    f"{self.repo} sent more than its listed {human_size(self.listed)} of files: the "
                    "transfer was cut; the repo does not serve what it lists, pull from a repo you trust"
                )
            raise UserError(
                f"{self.repo} passed the {human_size(self.limits.max_bytes)} limit on pulls: the "
                "transfer was cut; pull it with a larger --max-size if you trust it"
            )
        if time.monotonic() > self.deadline:
            raise UserError(
                f"pulling {self.repo} took over {self.limits.deadline_s:g} s: the transfer was stopped; "
                "retry on a faster connection or with a larger --timeout"
            )
