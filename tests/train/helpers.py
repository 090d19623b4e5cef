"""Building small recipes and datasets for training tests."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

from rich.console import Console

from adapterhub.recipe import Recipe, recipe_from_dict
from adapterhub.synthetic import sentiment_rows
from adapterhub.train.trainer import TrainResult, train

REPO = Path(__file__).resolve().parents[2]
QUICKSTART_DATA = REPO / "recipes" / "data" / "quickstart.jsonl"


def recipe(tmp_path: Path, method: dict[str, Any], **sections: dict[str, Any]) -> Recipe:
    raw = {
        "model": {"name": "builtin:tiny-llama"},
        "method": method,
        "data": {"path": str(QUICKSTART_DATA), "max_samples": 160},
        "training": {
            "max_steps": 25,
            "learning_rate": 0.01,
            "batch_size": 16,
            "eval_max_samples": 16,
            "logging_steps": 5,
        },
        "output": {"dir": str(tmp_path / "out")},
    }
    for name, values in sections.items():
        raw[name] = {**raw[name], **values}
    return recipe_from_dict(raw, source="test.yaml")


def quiet_train(recipe: Recipe) -> TrainResult:
    return train(recipe, console=Console(file=io.StringIO()))


def write_seed_style_data(path: Path, n: int = 64) -> Path:
    """financial_phrasebank-shaped rows: a sentence and an integer label."""
    names = ["negative", "neutral", "positive"]
    rows = [
        {"sentence": row["prompt"], "label": names.index(row["completion"].strip())}
        for row in sentiment_rows(n, seed=3)
    ]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def write_chat_data(path: Path, n: int = 32) -> Path:
    rows = [
        {
            "messages": [
                {"role": "user", "content": row["prompt"]},
                {"role": "assistant", "content": row["completion"].strip()},
            ]
        }
        for row in sentiment_rows(n, seed=5)
    ]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path
