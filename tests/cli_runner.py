"""Running the real ``adapterhub`` command in a fresh process, as a user would."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_cli(
    args: list[str], env: dict[str, str] | None = None, cwd: Path | None = REPO, timeout: float = 600
) -> subprocess.CompletedProcess:
    """``python -m adapterhub ARGS``; offline unless ``env`` says otherwise (it replaces the environment)."""
    return subprocess.run(
        [sys.executable, "-m", "adapterhub", *args],
        env=env if env is not None else {**os.environ, "HF_HUB_OFFLINE": "1"},
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
