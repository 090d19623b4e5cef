"""Evaluation results as files: ``eval/<task>.json`` beside an adapter, written whole or not at all.

``push`` uploads them and turns them into the model card's Hub ``model-index``; this module has no
lm-eval imports, so reading them is cheap.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from adapterhub.errors import UserError

EVAL_DIR = "eval"
SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")


@dataclass(frozen=True)
class Score:
    value: float
    stderr: float | None
    higher_is_better: bool | None  # None: the task does not say


@dataclass
class TaskScores:
    """One adapter's scores on one lm-eval task (or group), with what the run was."""

    task: str
    metrics: dict[str, Score]  # lm-eval's "metric,filter" key, less ",none"
    num_fewshot: int | None
    samples: int | None  # documents scored (after --limit)
    version: Any = None  # the task's version, as lm-eval reports it
    dataset: dict[str, str | None] = field(default_factory=dict)  # path, name, split


def save_scores(folder: Path, scores: TaskScores, run: dict[str, Any]) -> Path:
    """Write ``folder/eval/<task>.json`` atomically (a temp file renamed over it); ``run`` says how
    the scores were made (adapter, base model, limit, versions)."""
    directory = Path(folder) / EVAL_DIR
    directory.mkdir(exist_ok=True)
    path = directory / f"{SAFE_NAME.sub('_', scores.task)}.json"
    record = {**asdict(scores), "run": run}
    handle, temp = tempfile.mkstemp(prefix=f".{path.name}.", dir=directory)
    try:
        with os.fdopen(handle, "w") as out:
            out.write(json.dumps(record, indent=2) + "\n")
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    return path


def read_evaluations(folder: Path) -> list[dict[str, Any]]:
    """The records in ``folder/eval/*.json``, by task name; a file that is not one is an error."""
    directory = Path(folder) / EVAL_DIR
    records = []
    for path in sorted(directory.glob("*.json")) if directory.is_dir() else []:
        try:
            record = json.loads(path.read_text())
            if not isinstance(record.get("task"), str) or not isinstance(record.get("metrics"), dict):
                raise ValueError("no task and metrics")
        except (ValueError, AttributeError) as err:
            raise UserError(
                f"{path} is not an adapterhub eval result ({err}): delete it or run `adapterhub eval` again"
            ) from err
        records.append(record)
    return records
