"""``adapterhub train`` with ``eval.tasks`` in the recipe: the quickstart adapter, evaluated at the end of
training on an lm-eval task built from the quickstart data, beats the base, by lm-eval's own count too."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.cli_runner import REPO, run_cli

# The quickstart recipe in fewer, larger steps (60 x 64 rows instead of 300 x 16), so the test stays
# lean; measured on this recipe, 50 to 120 such steps all learn the task.
SHORTER = ["training.max_steps=60", "training.batch_size=64", "training.eval_max_samples=16"]
SHORTER += ["training.generation_eval=false"]


@pytest.mark.slow
def test_quickstart_adapter_beats_the_base_on_the_quickstart_task(tmp_path: Path, tiny_llama: Path) -> None:
    import lm_eval
    from lm_eval.tasks import TaskManager

    out = tmp_path / "quickstart"
    evaluation = ["eval.tasks=[tasks/quickstart.yaml]", "eval.limit=96"]
    result = run_cli(
        ["train", "recipes/quickstart.yaml", *SHORTER, *evaluation, f"output.dir={out}", "--json"]
    )
    assert result.returncode == 0, result.stderr[-3000:]
    scores = {
        name: tasks["quickstart_sentiment"]["acc"]["value"]
        for name, tasks in json.loads(result.stdout)["eval"].items()
    }
    assert scores["quickstart"] > scores["base"] + 0.2, scores
    saved = json.loads((out / "eval" / "quickstart_sentiment.json").read_text())
    assert saved["metrics"]["acc"]["value"] == scores["quickstart"] and saved["samples"] == 96

    cwd = os.getcwd()
    os.chdir(REPO)  # the task reads recipes/data/quickstart.jsonl relative to the working directory
    try:
        reference = lm_eval.simple_evaluate(
            model="hf",
            model_args=f"pretrained={tiny_llama},device=cpu,peft={out}",
            tasks=["tasks/quickstart.yaml"],
            task_manager=TaskManager(include_defaults=False),
            limit=96,
        )
    finally:
        os.chdir(cwd)
    assert reference["results"]["quickstart_sentiment"]["acc,none"] == scores["quickstart"]
