"""The train CLI end to end: bad input gets one clear line, a non-zero exit and no traceback."""

import json
import os
import re
import shlex
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from adapterhub.paths import current_umask
from adapterhub.recipe import load_recipe
from adapterhub.train.checkpoints import COMPLETE
from tests.cli_runner import run_cli
from tests.table_text import column_texts, squeezed
from tests.train.helpers import QUICKSTART_DATA, REPO, write_chat_data


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
    shown = run_cli(["--help"])
    assert shown.returncode == 0
    commands = [line.split()[0] for line in shown.stdout.split("Commands:")[1].splitlines() if line.strip()]
    workflow = [
        "train",
        "params",
        "push",
        "pull",
        "list",
        "show",
        "rm",
        "serve",
        "chat",
        "eval",
        "merge",
        "bench",
    ]
    assert commands == [*workflow, "tiny"]


# Lines adapterhub itself writes to stderr while training: progress, notes, and the summary table.
OWN_STDERR = re.compile(r"^(train |note: |\s*trained lora\s*$|[┏┃┡│└])")


@pytest.mark.slow
def test_quickstart_stderr_holds_no_library_output_and_files_follow_the_umask(tmp_path: Path) -> None:
    # A fresh home, so the builtin tiny model is built too (transformers' "Writing model shards").
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "ADAPTERHUB_HOME": str(tmp_path / "home")}
    out = tmp_path / "quickstart"
    result = run_cli(["train", "recipes/quickstart.yaml", "training.max_steps=3", f"output.dir={out}"], env)
    assert result.returncode == 0, result.stderr
    foreign = [line for line in result.stderr.splitlines() if line.strip() and not OWN_STDERR.match(line)]
    assert not foreign, result.stderr
    mask = current_umask()
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~mask
    for path in out.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask, path.name


# Each bad value from the first hour of a new user: the key, the allowed values, and nothing written.
OUT_OF_RANGE = [
    ("training.batch_size=-4", "training.batch_size: must be ≥ 1, got -4"),
    ("training.batch_size=0", "training.batch_size: must be ≥ 1, got 0"),
    ("training.learning_rate=-1", "training.learning_rate: must be > 0, got -1"),
    ("method.r=0", "method.r: must be ≥ 1, got 0"),
    ("data.validation_fraction=1.5", "data.validation_fraction: must be in (0, 1), got 1.5"),
    ("training.optim=adamw_nope", "training.optim: 'adamw_nope' is not one of transformers' optimizers"),
]


@pytest.mark.parametrize(("override", "fragment"), OUT_OF_RANGE, ids=[o for o, _ in OUT_OF_RANGE])
def test_out_of_range_values_are_one_line_before_anything_is_written(
    tmp_path: Path, override: str, fragment: str
) -> None:
    recipe = write_recipe(tmp_path)
    result = run_cli(["train", str(recipe), "method.type=lora", override])
    assert_one_line_error(result, fragment)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["r.yaml"], "nothing may be left behind"


def test_optimizer_error_lists_the_choices_and_suggests_one(tmp_path: Path) -> None:
    from adapterhub.errors import UserError
    from adapterhub.recipe import load_recipe

    with pytest.raises(UserError) as refused:
        load_recipe(write_recipe(tmp_path), ["training.optim=adamw_torch_fusd"])
    message = str(refused.value)
    assert "(did you mean 'adamw_torch_fused'?)" in message and "paged_adamw_8bit" in message


@pytest.mark.slow
def test_ctrl_c_during_train_prints_the_resume_command(tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path)
    overrides = ["training.max_steps=100000", "training.save_steps=2", "training.generation_eval=false"]
    command = [sys.executable, "-m", "adapterhub", "train", str(recipe), *overrides]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    child = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    checkpoints = tmp_path / ".out.partial" / "checkpoints"
    try:
        deadline = time.monotonic() + 300
        # A whole checkpoint, not one still being written: the message names only complete ones.
        while not list(checkpoints.glob(f"checkpoint-*/{COMPLETE}")):
            assert child.poll() is None and time.monotonic() < deadline, "no checkpoint was written"
            time.sleep(0.1)
        child.send_signal(signal.SIGINT)
        _, err = child.communicate(timeout=120)
    finally:
        child.kill()
    assert child.returncode == 130 and "Traceback" not in err
    (line,) = [line for line in err.splitlines() if line.startswith("interrupted:")]
    checkpoint = re.search(r"the last checkpoint is (\S+);", line).group(1)
    assert Path(checkpoint).parent == checkpoints and Path(checkpoint).is_dir()
    resume = shlex.split(line.split("resume with: ", 1)[1])
    assert resume == ["adapterhub", "train", str(recipe), *overrides, "training.resume=true"]


@pytest.mark.slow
def test_a_shipped_chat_recipe_runs_offline_on_local_data_with_two_overrides(tmp_path: Path) -> None:
    data = write_chat_data(tmp_path / "chat.jsonl")
    recipe = REPO / "recipes" / "lora.yaml"
    # From another folder: the recipe's own paths are its business, output.dir lands here.
    result = run_cli(
        ["train", str(recipe), "model.name=builtin:tiny-llama", f"data.path={data}"], cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-3000:]
    note = (
        "note: data.path="
        + str(data)
        + " replaces the recipe's data.dataset, data.config, data.validation_split"
    )
    assert note in result.stderr.replace("\n", "")
    written = load_recipe(tmp_path / "runs" / "lora" / "recipe.yaml")
    assert written.data.dataset is None and written.data.validation_split is None
    assert Path(written.data.path).resolve() == data.resolve()


@pytest.mark.slow
def test_params_prints_the_seed_table_in_one_command() -> None:
    from tests.train.test_params import SEED_COUNTS

    recipes = [f"recipes/seed/{method}.yaml" for method in sorted(SEED_COUNTS)]
    result = run_cli(["params", *recipes])
    assert result.returncode == 0, result.stderr
    _, columns = column_texts(result.stdout)
    assert columns[0] == squeezed(recipes)
    assert columns[3] == squeezed([f"{SEED_COUNTS[method][0]:,}" for method in sorted(SEED_COUNTS)])
    assert columns[4] == squeezed([f"{SEED_COUNTS[method][1]:,}" for method in sorted(SEED_COUNTS)])


def test_bench_help_does_not_import_torch() -> None:
    code = (
        "import sys; from adapterhub.cli import main; sys.argv = ['adapterhub', 'bench', 'serve', '--help']\n"
    )
    code += "try:\n    main()\nexcept SystemExit:\n    pass\nprint('torch' in sys.modules)"
    shown = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert shown.stdout.strip().endswith("False") and "--static-decode" in shown.stdout, shown.stderr
