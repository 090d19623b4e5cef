import json
from pathlib import Path

import pytest

from adapterhub.recipe import load_recipe
from adapterhub.train.peft_model import count_recipe_parameters
from tests.cli_runner import run_cli

REPO = Path(__file__).resolve().parents[2]
SEED = REPO / "recipes" / "seed"

# The seed benchmark's table: bigscience/mt0-large, counted as the real checkpoint is shaped.
SEED_COUNTS = {
    "lora": (2_359_296, 1_231_940_608),
    "prompt_tuning": (40_960, 1_229_622_272),
    "p_tuning": (320_768, 1_229_902_080),
    "prefix_tuning": (983_040, 1_230_564_352),
    "ia3": (282_624, 1_229_863_936),
}


@pytest.mark.parametrize("method", sorted(SEED_COUNTS))
def test_seed_recipes_reproduce_the_seed_table(method: str) -> None:
    count = count_recipe_parameters(load_recipe(SEED / f"{method}.yaml"))
    assert (count.trainable, count.total) == SEED_COUNTS[method]


def test_params_cli_json() -> None:
    out = run_cli(["params", str(SEED / "lora.yaml"), "method.r=16", "--json"])
    assert out.returncode == 0, out.stderr
    row = json.loads(out.stdout)
    assert row["trainable"] == 2 * SEED_COUNTS["lora"][0]
    assert row["total"] == SEED_COUNTS["lora"][1] + SEED_COUNTS["lora"][0]


def test_tiny_counts_match_a_built_model(tiny_llama: Path) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    recipe = load_recipe(REPO / "recipes" / "quickstart.yaml")
    peft_model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_llama),
        LoraConfig(**{k: v for k, v in recipe.method.params.items()}),
    )
    trainable, total = peft_model.get_nb_trainable_parameters()
    count = count_recipe_parameters(recipe)
    assert (count.trainable, count.total) == (trainable, total)
