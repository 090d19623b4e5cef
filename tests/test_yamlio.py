"""The one YAML reader: YAML 1.2 floats; documents whose aliases expand without bound are refused."""

from __future__ import annotations

import time
import tracemalloc
from pathlib import Path

import pytest

from adapterhub import yamlio
from adapterhub.errors import UserError
from adapterhub.recipe import load_recipe, parse_overrides
from tests.cli_runner import run_cli


def alias_bomb(levels: int = 9) -> str:
    """The "billion laughs": each level lists the previous one ten times, 10**levels strings in all."""
    lines = ["a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    for level in range(1, levels):
        lines.append(f"a{level}: &a{level} [{', '.join([f'*a{level - 1}'] * 10)}]")
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize(("text", "value"), [("5e-3", 0.005), ("1e-4", 1e-4), ("2E-5", 2e-5), ("1e+0", 1.0)])
def test_scientific_notation_is_a_float_in_files_and_overrides(
    tmp_path: Path, text: str, value: float
) -> None:
    assert yamlio.loads(f"learning_rate: {text}", "x") == {"learning_rate": value}
    assert parse_overrides([f"training.learning_rate={text}"]) == {"training.learning_rate": value}
    recipe_file = tmp_path / "r.yaml"
    recipe_file.write_text(
        f"method: {{type: lora}}\ndata: {{path: x.jsonl}}\ntraining: {{learning_rate: {text}}}\n"
    )
    assert load_recipe(recipe_file).training.learning_rate == value


def test_other_scalars_keep_their_yaml_types() -> None:
    data = yamlio.loads("a: 12\nb: '5e-3'\nc: 1.5\nd: true\ne: v1e3\nf: 0x10\ng: null", "x")
    assert data == {"a": 12, "b": "5e-3", "c": 1.5, "d": True, "e": "v1e3", "f": 16, "g": None}


def test_written_strings_that_look_like_numbers_read_back_as_strings() -> None:
    data = {"prompt_template": "5e-3", "name": "1E10", "rate": 2e-05}
    assert yamlio.loads(yamlio.dumps(data), "x") == data


def test_an_alias_bomb_is_refused_at_once_with_bounded_memory() -> None:
    bomb = alias_bomb()
    tracemalloc.start()
    started = time.perf_counter()
    try:
        with pytest.raises(UserError, match=r"bomb.yaml: refused: .* once its aliases are expanded"):
            yamlio.loads(bomb, "bomb.yaml")
        seconds = time.perf_counter() - started
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 5 * 2**20, f"parsing the bomb took {peak / 2**20:.1f} MiB"
    assert seconds < 2.0


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("&a [*a]", "an anchor that contains itself"),
        ("x: &x 1\n" + "".join(f"k{i}: *x\n" for i in range(101)), "more than 100 aliases"),
        ("[" * 5000, "nested too deeply"),
        ("a: [1, 2\n", "not valid YAML"),
    ],
    ids=["self-reference", "many-aliases", "deep", "broken"],
)
def test_other_hostile_or_broken_yaml_is_one_line(text: str, message: str) -> None:
    with pytest.raises(UserError, match=message) as refused:
        yamlio.loads(text, "doc.yaml")
    assert "\n" not in str(refused.value)


def test_a_few_anchors_still_work() -> None:
    data = yamlio.loads("base: &base {r: 8, lora_alpha: 16}\nlora: {<<: *base, r: 16}\n", "x")
    assert data["lora"] == {"r": 16, "lora_alpha": 16}


def test_params_refuses_an_alias_bomb_recipe_in_one_line(tmp_path: Path) -> None:
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("method: {type: lora}\ndata: {path: x.jsonl}\n" + alias_bomb())
    started = time.perf_counter()
    result = run_cli(["params", str(bomb)], timeout=120)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1 and "refused" in result.stderr, result.stderr
    assert time.perf_counter() - started < 60  # a process start; the bomb itself would take minutes and GBs
