from pathlib import Path

import pytest

from adapterhub.errors import UserError
from adapterhub.recipe import load_recipe, parse_overrides

REPO = Path(__file__).resolve().parents[2]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "r.yaml"
    path.write_text(text)
    return path


BASE = "method: {type: lora}\ndata: {path: x.jsonl}\n"


def test_overrides_are_yaml_typed(tmp_path: Path) -> None:
    recipe = load_recipe(
        write(tmp_path, BASE),
        [
            "training.max_steps=20",
            "output.dir=runs/x",
            "method.target_modules=[q_proj, v_proj]",
            "training.gradient_checkpointing=true",
            "method.r=4",
        ],
    )
    assert recipe.training.max_steps == 20
    assert recipe.output.dir == "runs/x"
    assert recipe.method.params["target_modules"] == ["q_proj", "v_proj"]
    assert recipe.method.params["r"] == 4
    assert recipe.training.gradient_checkpointing is True


def test_resolved_recipe_round_trips(tmp_path: Path) -> None:
    recipe = load_recipe(write(tmp_path, BASE), ["method.r=4"])
    again = load_recipe(write(tmp_path, recipe.to_yaml()))
    assert again.to_dict() == recipe.to_dict()


@pytest.mark.parametrize(
    ("text", "overrides", "message"),
    [
        (BASE + "training: {max_stepz: 3}\n", [], r"r.yaml: training.max_stepz: unknown key"),
        (BASE, ["training.max_steps=many"], r"training.max_steps: expected int, got 'many'"),
        (BASE, ["method.rank=4"], r"method.rank: not a lora parameter"),
        (BASE, ["method.r=four"], r"method.r: expected int"),
        (
            "method: {type: loha}\ndata: {path: x}\n",
            [],
            r"unknown method.type 'loha' \(did you mean 'lora'\?\); choose one of",
        ),
        ("data: {path: x}\n", [], r"missing key 'method.type'"),
        ("method: {type: ia3}\n", [], r"missing key 'data.path'"),
        (BASE + "modle: {}\n", [], r"unknown section 'modle'"),
        (BASE, ["model.quantization=nf5"], r"model.quantization: expected one of none, nf4, int8"),
        (BASE, ["training.compile=yes please"], r"training.compile: expected bool"),
        (
            BASE,
            ["training.compile_mode=fast"],
            r"training.compile_mode: expected one of default, reduce-overhead",
        ),
        (BASE, ["training.max_steps"], r"not section.key=value"),
        ("method: [\n", [], r"not valid YAML"),
    ],
)
def test_schema_errors_name_the_key(tmp_path: Path, text: str, overrides: list[str], message: str) -> None:
    with pytest.raises(UserError, match=message):
        load_recipe(write(tmp_path, text), overrides)


def test_missing_recipe_file(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="not found"):
        load_recipe(tmp_path / "nope.yaml")


def test_parse_overrides_keeps_strings() -> None:
    assert parse_overrides(["output.dir=runs/a b", "model.name=org/model"]) == {
        "output.dir": "runs/a b",
        "model.name": "org/model",
    }


@pytest.mark.parametrize("path", sorted((REPO / "recipes").rglob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_recipe_validates(path: Path) -> None:
    load_recipe(path)
