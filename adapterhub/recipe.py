"""Training recipes: a typed YAML schema with sections model, method, data, training and output.

A recipe is read from YAML, patched with dotted ``key=value`` overrides (values parsed as YAML),
and checked field by field, types and allowed values, before anything is loaded or written, so that any
mistake names the file, the key and what it may be.

Relative input paths in a recipe file (``data.path``, ``data.validation_path``, and ``model.name`` when it
starts with ``./`` or ``../``) are read relative to the recipe file, so a recipe runs from any folder;
paths given as overrides on the command line are relative to the working directory, as shell paths are.
``output.dir`` is relative to the working directory: runs land where you run them.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from adapterhub import yamlio
from adapterhub.errors import UserError, did_you_mean
from adapterhub.typecheck import Choices, Range, above, at_least, between, field_hints, field_rule, problem

CompileMode = Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]


def _optimizer_names() -> list[str]:
    from transformers.training_args import OptimizerNames

    return [name.value for name in OptimizerNames]


def _scheduler_names() -> list[str]:
    from transformers.trainer_utils import SchedulerType

    return [name.value for name in SchedulerType]


Count = Annotated[int, at_least(1)]
OptionalCount = Annotated[int | None, at_least(1)]
Seed = Annotated[int, between(0, 2**32 - 1)]  # numpy's seeds, which transformers' set_seed also sets


@dataclass
class ModelArgs:
    name: str = "builtin:tiny-llama"
    quantization: Literal["none", "nf4", "int8"] = "none"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    random_init: bool = False


@dataclass
class MethodArgs:
    """``type`` picks a method from the registry; every other key is that method's PEFT parameter."""

    type: str = "lora"
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class DataArgs:
    path: str | None = None
    dataset: str | None = None
    config: str | None = None
    split: str = "train"
    validation_path: str | None = None
    validation_split: str | None = None
    validation_fraction: Annotated[float, between(0, 1, low_open=True, high_open=True)] = 0.1
    split_seed: Seed = 42
    format: Literal["auto", "prompt_completion", "messages", "text"] = "auto"
    columns: dict[str, str] = field(default_factory=dict)
    label_names: list[str] | None = None
    prompt_template: str = "{prompt}"
    max_length: Count = 512
    max_target_length: Count = 32
    max_samples: OptionalCount = None


@dataclass
class TrainingArgs:
    max_steps: Annotated[int, Range(low=1, also=(-1,))] = -1  # -1: train for ``epochs``
    epochs: Annotated[float, above(0)] = 1.0
    learning_rate: Annotated[float, above(0)] = 2e-4
    batch_size: Count = 8
    eval_batch_size: OptionalCount = None
    gradient_accumulation_steps: Count = 1
    gradient_checkpointing: bool = False
    optim: Annotated[str, Choices(_optimizer_names, "transformers' optimizers")] = "adamw_torch"
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    # torch.compile the model: fewer, fused kernels for steps bound by per-op launch overhead.
    # Batches are then padded to data.max_length (labels to data.max_target_length) so one shape is traced.
    compile: bool = False
    compile_mode: CompileMode = "default"
    lr_scheduler: Annotated[str, Choices(_scheduler_names, "transformers' schedulers")] = "linear"
    warmup_steps: Annotated[float, at_least(0)] = 0.0  # whole steps, or a fraction of all steps when below 1
    weight_decay: Annotated[float, at_least(0)] = 0.0
    max_grad_norm: Annotated[float, at_least(0)] = 1.0  # 0: no clipping
    seed: Seed = 42
    logging_steps: Count = 10
    eval_steps: OptionalCount = None
    save_steps: Count = 500
    eval_max_samples: Annotated[int | None, at_least(0)] = 256  # 0: no evaluation; null: all rows
    generation_eval: bool = True
    resume: bool = False
    overwrite: bool = False


@dataclass
class OutputArgs:
    dir: str = "runs/adapter"
    store_name: str | None = None  # also add the finished adapter to the local store under this name


@dataclass
class EvalArgs:
    """lm-eval tasks (names or task YAML files) that ``adapterhub eval`` runs on the finished adapter,
    and on the base too when ``compare_base``; none: no evaluation."""

    tasks: list[str] = field(default_factory=list)
    limit: OptionalCount = None
    num_fewshot: Annotated[int | None, at_least(0)] = None
    apply_chat_template: bool = False
    compare_base: bool = True


@dataclass
class Recipe:
    model: ModelArgs = field(default_factory=ModelArgs)
    method: MethodArgs = field(default_factory=MethodArgs)
    data: DataArgs = field(default_factory=DataArgs)
    training: TrainingArgs = field(default_factory=TrainingArgs)
    output: OutputArgs = field(default_factory=OutputArgs)
    eval: EvalArgs = field(default_factory=EvalArgs)
    source: str = "<recipe>"
    notes: list[str] = field(default_factory=list)  # what loading changed, for the user to see

    def to_dict(self, relative_to: Path | None = None) -> dict[str, Any]:
        """The resolved recipe as YAML-ready data, method parameters flattened back into ``method``.

        With ``relative_to`` (the folder the recipe will be written in), local paths are rewritten
        relative to it, so the written recipe reads the same files from wherever it is run.
        """
        data = {name: dataclasses.asdict(getattr(self, name)) for name in SECTIONS}
        method = data["method"]
        data["method"] = {"type": method["type"], **method["params"]}
        if relative_to is not None:
            _move_paths(data, lambda path: os.path.relpath(path, relative_to))
        return data

    def to_yaml(self, relative_to: Path | None = None) -> str:
        return yamlio.dumps(self.to_dict(relative_to))


SECTIONS: dict[str, type] = {
    "model": ModelArgs,
    "method": MethodArgs,
    "data": DataArgs,
    "training": TrainingArgs,
    "output": OutputArgs,
    "eval": EvalArgs,
}


# Where the recipe's own data comes from: a ``data.path`` given on the command line replaces them all.
DATA_SOURCE_KEYS = ("dataset", "config", "validation_split", "validation_path")


def parse_overrides(pairs: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """``["training.max_steps=20", "output.dir=runs/x"]`` -> ``{"training.max_steps": 20, ...}``."""
    overrides = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or "." not in key:
            raise UserError(f"override '{pair}' is not section.key=value (e.g. training.max_steps=20)")
        overrides[key.strip()] = yamlio.loads(raw, f"override '{pair}'")
    return overrides


def apply_overrides(raw: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    for dotted, value in overrides.items():
        node = raw
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise UserError(f"override '{dotted}': '{part}' is not a section")
        node[leaf] = value
    return raw


def local_data_replaces_hub(raw: dict[str, Any], overrides: dict[str, Any]) -> list[str]:
    """A ``data.path`` override trains on that file alone: drop the recipe's Hub dataset and validation.

    Validation is then carved from the file (``data.validation_fraction``), unless the override also names
    ``data.validation_path``. Returns a note saying what was dropped.
    """
    data = raw.get("data")
    if "data.path" not in overrides or not isinstance(data, dict):
        return []
    dropped = [
        key for key in DATA_SOURCE_KEYS if data.get(key) is not None and f"data.{key}" not in overrides
    ]
    for key in dropped:
        data[key] = None
    if not dropped:
        return []
    listing = ", ".join(f"data.{key}" for key in dropped)
    return [f"data.path={overrides['data.path']} replaces the recipe's {listing}"]


def resolve_recipe_paths(raw: dict[str, Any], folder: Path) -> None:
    """Make the recipe file's relative input paths relative to the working directory instead."""
    _move_paths(raw, lambda path: os.path.join(folder, path))


def _move_paths(raw: dict[str, Any], move: Callable[[str], str]) -> None:
    """Apply ``move`` to each relative input path of ``raw`` (the local data files, a ``./`` model)."""

    def moved(value: str, *, mark: bool) -> str:
        if value.startswith("~") or Path(value).is_absolute():
            return value
        path = os.path.normpath(move(value))
        # A model folder keeps its ./ so that it is not mistaken for a Hub id.
        return f"./{path}" if mark and not path.startswith(("..", "/")) else path

    data, model = raw.get("data"), raw.get("model")
    if isinstance(data, dict):
        for key in ("path", "validation_path"):
            if isinstance(data.get(key), str):
                data[key] = moved(data[key], mark=False)
    if isinstance(model, dict) and str(model.get("name")).startswith(("./", "../")):
        model["name"] = moved(model["name"], mark=True)


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read, override and validate a recipe file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"recipe file {path} not found: give the path of a YAML recipe (see recipes/)")
    raw = yamlio.load_file(path) or {}
    if not isinstance(raw, dict):
        raise UserError(f"{path}: a recipe is a mapping with sections {', '.join(SECTIONS)}")
    resolve_recipe_paths(raw, path.parent)
    parsed = parse_overrides(overrides)
    notes = local_data_replaces_hub(raw, parsed)
    recipe = recipe_from_dict(apply_overrides(raw, parsed), source=str(path))
    recipe.notes.extend(notes)
    return recipe


def recipe_from_dict(raw: dict[str, Any], source: str = "<recipe>") -> Recipe:
    unknown = set(raw) - set(SECTIONS)
    if unknown:
        name = sorted(unknown)[0]
        raise UserError(
            f"{source}: unknown section '{name}'{did_you_mean(name, SECTIONS)}; "
            f"sections are {', '.join(SECTIONS)}"
        )
    for name in SECTIONS:
        if not isinstance(raw.get(name) or {}, dict):
            raise UserError(f"{source}: section '{name}' must be a mapping of keys to values")
    # The sections that need no PEFT first, so their mistakes are reported before torch is imported.
    sections = {
        name: build_section(cls, raw.get(name) or {}, f"{source}: {name}")
        for name, cls in SECTIONS.items()
        if cls is not MethodArgs
    }
    from adapterhub import methods  # imports PEFT, and so torch

    values = dict(raw.get("method") or {})
    method_type = values.pop("type", None)
    if method_type is None:
        raise UserError(f"{source}: missing key 'method.type': one of {', '.join(methods.names())}")
    method = methods.get(method_type, source)
    sections["method"] = MethodArgs(type=method_type, params=method.check_params(values, source))
    recipe = Recipe(**sections, source=source)
    if not all(task.strip() for task in recipe.eval.tasks):
        raise UserError(f"{source}: eval.tasks: an empty task name")
    if not recipe.data.path and not recipe.data.dataset:
        raise UserError(
            f"{source}: missing key 'data.path' (a local file) or 'data.dataset' (a Hub dataset id)"
        )
    return recipe


def build_section(cls: type, values: dict[str, Any], where: str) -> Any:
    hints = field_hints(cls)
    for key, value in values.items():
        if key not in hints:
            raise UserError(
                f"{where}.{key}: unknown key{did_you_mean(str(key), hints)}; known keys: {', '.join(hints)}"
            )
        wrong = problem(value, hints[key], field_rule(hints[key]))
        if wrong:
            raise UserError(f"{where}.{key}: {wrong}")
    return cls(**values)
