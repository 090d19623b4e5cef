"""The train CLI end to end: bad input gets one clear line, a non-zero exit and no traceback."""

import json
import subprocess
from pathlib import Path

import pytest

from tests.cli_runner import run_cli
from tests.train.helpers import QUICKSTART_DATA


def assert_one_line_error(result: subprocess.CompletedProcess, fragment: str) -> None:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and fragment in errors[0], result.stderr


def write_recipe(tmp_path: Path, **extra: str) -> Path:
    path = tmp_path / "r.yaml"
    data = {"path": str(QUICKSTART_DATA), "max_samples": 40}
    text = (
        f"method: {{type: ia3}}\ndata: {json.dumps(data)}\n"
        "training: {max_steps: 2, batch_size: 8, eval_max_samples: 8}\n"
        f"output: {{dir: {tmp_path / 'out'}}}\n"
    )
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        (["training.max_stepz=3"], "training.max_stepz: unknown key"),
        (["training.max_steps=x"], "training.max_steps: expected int"),
        (["method.type=loha"], "unknown method.type 'loha'"),
        (["model.name=nobody/no-such-model"], "model 'nobody/no-such-model' not found: we are offline"),
        (["data.path=/nonexistent/data.jsonl"], "data file /nonexistent/data.jsonl not found"),
        (["data.format=messages"], "line 1 has no 'messages' column"),
    ],
)
def test_bad_input_is_one_line(tmp_path: Path, overrides: list[str], fragment: str) -> None:
    result = run_cli(["train", str(write_recipe(tmp_path)), *overrides])
    assert_one_line_error(result, fragment)
    assert not (tmp_path / "out").exists()


def test_empty_dataset_missing_columns_and_existing_output(tmp_path: Path) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert_one_line_error(
        run_cli(["train", str(write_recipe(tmp_path)), f"data.path={empty}"]), "the dataset is empty"
    )
    odd = tmp_path / "odd.jsonl"
    odd.write_text('{"question": "q", "answer": "a"}\n')
    assert_one_line_error(
        run_cli(["train", str(write_recipe(tmp_path)), f"data.path={odd}"]),
        "rows need columns prompt+completion, messages or text (found question, answer)",
    )
    (tmp_path / "out").mkdir()
    assert_one_line_error(
        run_cli(["train", str(write_recipe(tmp_path))]), "already exists: set training.overwrite=true"
    )


def test_train_cli_writes_output_and_json(tmp_path: Path) -> None:
    result = run_cli(["train", str(write_recipe(tmp_path)), "--json"])
    assert result.returncode == 0, result.stderr
    metrics = json.loads(result.stdout)
    assert metrics["steps"] == 2 and metrics["method"] == "ia3"
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["steps"] == 2
    assert "trained ia3" in result.stderr


def test_missing_recipe_and_help() -> None:
    assert_one_line_error(run_cli(["train", "nope.yaml"]), "recipe file nope.yaml not found")
    assert run_cli(["--help"]).returncode == 0
