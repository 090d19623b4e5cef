"""Every shipped recipe runs a few steps when pointed at a builtin tiny model and local data.

Modelled on LitGPT's config-hub test: the real recipes name Hub models and datasets we can't
download here, so the test overrides only the model, the data source and the step count.
"""

import json
from pathlib import Path

import pytest

from adapterhub.recipe import load_recipe
from tests.cli_runner import run_cli
from tests.train.helpers import REPO, quiet_train, write_chat_data, write_seed_style_data

# Two timed steps after one warm-up step, one eval batch: enough to fill every column.
SHORT_BENCH = ["--steps", "2", "--warmup", "1", "--eval-batches", "1"]
CHAT_RECIPES = sorted(p for p in (REPO / "recipes").glob("*.yaml") if p.name != "quickstart.yaml")
SEED_RECIPES = sorted((REPO / "recipes" / "seed").glob("*.yaml"))
SMOKE = [
    "training.max_steps=2",
    "training.eval_max_samples=4",
    "training.batch_size=4",
    "training.gradient_accumulation_steps=1",
    "training.optim=adamw_torch",
    "training.precision=fp32",
    "data.dataset=null",
    "data.validation_split=null",
]


CASES = [(p, "builtin:tiny-llama", write_chat_data) for p in CHAT_RECIPES] + [
    (p, "builtin:tiny-mt5", write_seed_style_data) for p in SEED_RECIPES
]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("path", "model", "write_data"), CASES, ids=[f"{p.parent.name}-{p.stem}" for p, *_ in CASES]
)
def test_shipped_recipe_smoke_runs(tmp_path: Path, path: Path, model: str, write_data) -> None:
    data = write_data(tmp_path / "data.jsonl")
    recipe = load_recipe(
        path, [*SMOKE, f"model.name={model}", f"data.path={data}", f"output.dir={tmp_path / 'out'}"]
    )
    metrics = quiet_train(recipe).metrics
    assert metrics["steps"] == 2 and metrics["method"] == recipe.method.type
    if path.parent.name == "seed":
        assert "generation_accuracy" in metrics, "financial sentiment is label-style data"


def test_bench_train_reports_the_seed_columns(tmp_path: Path) -> None:
    seed = REPO / "recipes" / "seed"
    result = run_cli(
        [
            "bench",
            "train",
            str(seed / "ia3.yaml"),
            str(seed / "prefix_tuning.yaml"),
            "--random",
            "--set",
            "model.name=builtin:tiny-mt5",
            "--set",
            "training.compile=false",  # the seed recipes compile for a GPU; the columns are the same eager
            *SHORT_BENCH,
            "--baseline",
            "--json",
        ]
    )
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout)
    assert report["random_weights"] is True
    for row in report["results"]:
        assert row["accuracy"] == "n/a"
        assert row["train_it_s"] > 0 and row["eval_it_s"] > 0 and row["baseline_train_it_s"] > 0
        assert row["peak_memory_mib"] > 0 and row["trainable_params"] < row["total_params"]
    assert [row["method"] for row in report["results"]] == ["ia3", "prefix_tuning"]


def test_bench_train_on_local_data_reports_accuracy() -> None:
    result = run_cli(
        [
            "bench",
            "train",
            "recipes/quickstart.yaml",
            *SHORT_BENCH,
            "--json",
        ]
    )
    assert result.returncode == 0, result.stderr[-2000:]
    (row,) = json.loads(result.stdout)["results"]
    assert isinstance(row["accuracy"], float) and 0.0 <= row["accuracy"] <= 1.0
    assert row["trainable_params"] == 32768


@pytest.mark.slow
def test_bench_train_full_scores_the_finished_adapter_on_a_test_file_next_to_the_base(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from adapterhub.bench import bench_train

    rows = [
        json.loads(line) for line in (REPO / "recipes" / "data" / "quickstart.jsonl").read_text().splitlines()
    ]
    test = tmp_path / "test.jsonl"
    test.write_text("".join(json.dumps(row) + "\n" for row in rows[:24]))
    out = tmp_path / "lora"
    args = ["recipes/quickstart.yaml", "--full", "--test", str(test), "--zero-shot", "--json"]
    overrides = ["training.max_steps=100", "training.eval_max_samples=8", f"output.dir={out}"]
    result = CliRunner().invoke(bench_train, args + [f"--set={item}" for item in overrides])
    assert result.exit_code == 0, result.output[-2000:]
    report = json.loads(result.stdout[result.stdout.index("{") :])
    base, lora = report["results"]
    assert base["method"] == "zero-shot base" and base["trainable_params"] == 0
    assert base["total_params"] == lora["total_params"] - lora["trainable_params"]
    assert lora["steps"] == 100 and (out / "adapter_config.json").is_file()
    assert isinstance(lora["accuracy"], float) and lora["accuracy"] > base["accuracy"]
    assert report["test"] == str(test) and report["steps"] == "each recipe's own"


def test_real_recipes_keep_the_seed_method_settings() -> None:
    """recipes/real/ is the seed table on SmolLM2 + rt-polarity: the same method settings, Llama module
    names for LoRA's targets and a task-specific init text for prompt tuning."""
    real = {path.stem: load_recipe(path) for path in (REPO / "recipes" / "real").glob("*.yaml")}
    assert sorted(real) == sorted(path.stem for path in SEED_RECIPES)
    task_specific = {"target_modules", "prompt_tuning_init_text", "tokenizer_name_or_path"}
    for path in SEED_RECIPES:
        seed, ours = load_recipe(path).method, real[path.stem].method
        assert ours.type == seed.type
        assert {k: v for k, v in ours.params.items() if k not in task_specific} == {
            k: v for k, v in seed.params.items() if k not in task_specific
        }, path.stem
    assert real["lora"].method.params["target_modules"] == ["q_proj", "v_proj"]
    data = REPO / "data" / "real"  # the recipes name it relative to themselves: they run from anywhere
    for recipe in real.values():
        assert Path(recipe.model.name).resolve() == data / "SmolLM2-135M-Instruct.Q4_1.gguf"
        assert Path(recipe.data.path).resolve() == data / "train.jsonl" and recipe.training.max_steps <= 150
