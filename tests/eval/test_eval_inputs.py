"""What ``adapterhub eval`` refuses, with one line naming it, and how it reads lm-eval's requests."""

from __future__ import annotations

from pathlib import Path

import pytest

from adapterhub.errors import UserError
from tests.cli_runner import run_cli


@pytest.fixture(scope="module")
def model():
    from adapterhub.eval.lm import EngineLM
    from adapterhub.runtime.engine import Engine, EngineConfig

    return EngineLM(Engine(EngineConfig(base="builtin:tiny-llama", device="cpu")))


def _generation(context: str, **gen_kwargs):
    from lm_eval.api.instance import Instance

    arguments = (context, {"until": ["\n"], **gen_kwargs})
    return Instance("generate_until", {}, arguments, idx=0, metadata=("my_task", 0, 1))


def test_generation_kwargs_outside_the_allowlist_are_refused_by_name(model) -> None:
    with pytest.raises(UserError, match="task my_task: generation_kwargs 'num_beams' is not supported"):
        model.plan("generate_until", [_generation("Q:", num_beams=4)], [0])


def test_requests_become_what_lm_eval_hf_would_run(model) -> None:
    sampled = _generation("Q:", do_sample=True, temperature=0.7, top_p=0.9, until=["\n", "</s>", "<|user|>"])
    job = model.plan("generate_until", [_generation("Q:"), sampled, sampled], [0, 0, 1])
    greedy, first, repeat = (request.params for request in job.requests)
    assert (greedy.temperature, greedy.seed, greedy.max_tokens, greedy.stop) == (0.0, None, 256, ("\n",))
    assert (first.temperature, first.top_p) == (0.7, 0.9)
    assert first.seed != repeat.seed  # a task's repeats are new samples, reproducibly seeded
    # Output text skips special tokens, so a special token's text stops generation as its id.
    user = model.tokenizer.convert_tokens_to_ids("<|user|>")
    assert (first.stop, set(first.stop_token_ids)) == (("\n",), {model.eot_token_id, user})

    too_long = "word " * 600  # left-truncated as HFLM truncates, leaving room for max_gen_toks
    (request,) = model.plan("generate_until", [_generation(too_long, max_gen_toks=16)], [0]).requests
    assert request.prompt == model.tokenizer(too_long)["input_ids"][-(model.max_length - 16) :]


def test_recipe_eval_section_is_checked_by_key() -> None:
    from adapterhub.recipe import load_recipe

    recipe = Path(__file__).resolve().parents[2] / "recipes" / "quickstart.yaml"
    with pytest.raises(UserError, match=r"eval\.limit: must be ≥ 1, got 0"):
        load_recipe(recipe, ["eval.limit=0"])
    with pytest.raises(UserError, match=r"eval\.sample: unknown key"):
        load_recipe(recipe, ["eval.sample=3"])
    assert load_recipe(recipe, ["eval.tasks=[a.yaml]"]).to_dict()["eval"]["tasks"] == ["a.yaml"]


def test_what_cannot_be_evaluated_is_refused_before_loading_a_model() -> None:
    from adapterhub.eval.run import EvalSettings, evaluate_adapters

    settings = EvalSettings(("x.yaml",))
    with pytest.raises(UserError, match="builtin:tiny-mt5 is an encoder-decoder model"):
        evaluate_adapters([], settings, include_base=True, base="builtin:tiny-mt5")
    with pytest.raises(UserError, match="evaluating 'base' alone needs the model: pass --base"):
        evaluate_adapters([], settings, include_base=True)
    with pytest.raises(UserError, match=r"task file x\.yaml not found"):
        evaluate_adapters([], settings, include_base=True, base="builtin:tiny-llama")


def test_cli_error_is_one_line() -> None:
    result = run_cli(["eval", "base", "--base", "builtin:tiny-llama", "--tasks", "missing.yaml"])
    assert result.returncode == 1, result.stderr
    assert result.stderr == (
        "error: task file missing.yaml not found: give an lm-eval task name or a task YAML file\n"
    )
