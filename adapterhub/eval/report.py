"""What an evaluation found, as JSON and as a rich table (one row per adapter, one column per metric)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.table import Table
from rich.text import Text

from adapterhub.eval.results import Score, TaskScores


@dataclass
class EvalReport:
    base_model: str
    tasks: tuple[str, ...]
    limit: int | None
    num_fewshot: int | None
    scores: dict[str, list[TaskScores]]  # adapter name (or "base") -> its scores, task by task
    saved: dict[str, list[Path]] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "base_model": self.base_model,
            "tasks": list(self.tasks),
            "limit": self.limit,
            "num_fewshot": self.num_fewshot,
            "results": {
                name: {
                    task.task: {
                        metric: {
                            "value": score.value,
                            "stderr": score.stderr,
                            "higher_is_better": score.higher_is_better,
                        }
                        for metric, score in task.metrics.items()
                    }
                    for task in tasks
                }
                for name, tasks in self.scores.items()
            },
            "saved": {name: [str(path) for path in paths] for name, paths in self.saved.items()},
        }

    def columns(self) -> list[tuple[str, str]]:
        """(task, metric) pairs in the order first met."""
        found: dict[tuple[str, str], None] = {}
        for tasks in self.scores.values():
            for task in tasks:
                for metric in task.metrics:
                    found[(task.task, metric)] = None
        return list(found)

    def score(self, adapter: str, task: str, metric: str) -> Score | None:
        for scores in self.scores.get(adapter, []):
            if scores.task == task:
                return scores.metrics.get(metric)
        return None


def scores_table(report: EvalReport) -> Table:
    """Adapters by task metrics, value ± stderr, the best of each column in bold green (by the
    metric's own direction; ↑ higher is better, ↓ lower)."""
    table = Table(title=f"lm-eval on {report.base_model}", title_justify="left")
    table.add_column("adapter", overflow="fold")
    columns = report.columns()
    for task, metric in columns:
        direction = _direction(report, task, metric)
        table.add_column(f"{task}\n{metric}{direction}", justify="right", overflow="fold")
    best = {column: _best(report, *column) for column in columns}
    for adapter in report.scores:
        cells: list[Text | str] = [adapter]
        for column in columns:
            score = report.score(adapter, *column)
            if score is None:
                cells.append("-")
                continue
            text = f"{score.value:.4f}" + (f" ± {score.stderr:.4f}" if score.stderr is not None else "")
            cells.append(Text(text, style="bold green" if score.value == best[column] else ""))
        table.add_row(*cells)
    return table


def _direction(report: EvalReport, task: str, metric: str) -> str:
    higher = next(
        (s.higher_is_better for a in report.scores if (s := report.score(a, task, metric)) is not None), None
    )
    return "" if higher is None else " ↑" if higher else " ↓"


def _best(report: EvalReport, task: str, metric: str) -> float | None:
    """The column's best value, when its direction is known and more than one adapter has it."""
    scores = [s for a in report.scores if (s := report.score(a, task, metric)) is not None]
    if len(scores) < 2 or scores[0].higher_is_better is None:
        return None
    values = [score.value for score in scores]
    return max(values) if scores[0].higher_is_better else min(values)
