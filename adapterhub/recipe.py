"""Training recipes: a typed YAML schema with sections model, method, data, training and output.

A recipe is read from YAML, patched with dotted ``key=value`` overrides (values parsed as YAML),
and checked field by field so that any mistake names the file and the key.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from adapterhub.errors import UserError
from adapterhub.typecheck import describe, field_hints, matches

CompileMode = Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]


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
    validation_fraction: float = 0.1
    split_seed: int = 42
    format: Literal["auto", "prompt_completion", "messages", "text"] = "auto"
    columns: dict[str, str] = field(default_factory=dict)
    label_names: list[str] | None = None
    prompt_template: str = "{prompt}"
    max_length: int = 512
    max_target_length: int = 32
    max_samples: int | None = None


@dataclass
class TrainingArgs:
    max_steps: int = -1
    epochs: float = 1.0
    learning_rate: float = 2e-4
    batch_size: int = 8
    eval_batch_size: int | None = None
    gradient_accumulation_steps: int = 1
    gradient_checkpointing: bool = False
    optim: str = "adamw_torch"
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    # torch.compile the model: fewer, fused kernels for steps bound by per-op launch overhead.
    # Batches are then padded to data.max_length (labels to data.max_target_length) so one shape is traced.
    compile: bool = False
    compile_mode: CompileMode = "default"
    lr_scheduler: str = "linear"
    warmup_steps: float = 0.0  # whole steps, or a fraction of all steps when below 1
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 42
    logging_steps: int = 10
    eval_steps: int | None = None
    save_steps: int = 500
    eval_max_samples: int | None = 256
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
    limit: int | None = None
    num_fewshot: int | None = None
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

    def to_dict(self) -> dict[str, Any]:
        """The resolved recipe as YAML-ready data, method parameters flattened back into ``method``."""
        data = {name: dataclasses.asdict(getattr(self, name)) for name in SECTIONS}
        method = data["method"]
        data["method"] = {"type": method["type"], **method["params"]}
        return data

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


SECTIONS: dict[str, type] = {
    "model": ModelArgs,
    "method": MethodArgs,
    "data": DataArgs,
    "training": TrainingArgs,
    "output": OutputArgs,
    "eval": EvalArgs,
}


def parse_overrides(pairs: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """``["training.max_steps=20", "output.dir=runs/x"]`` -> ``{"training.max_steps": 20, ...}``."""
    overrides = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or "." not in key:
            raise UserError(f"override '{pair}' is not section.key=value (e.g. training.max_steps=20)")
        try:
            overrides[key.strip()] = yaml.safe_load(raw)
        except yaml.YAMLError as err:
            raise UserError(f"override '{pair}': value is not valid YAML ({err.problem})") from err
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


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read, override and validate a recipe file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"recipe file {path} not found: give the path of a YAML recipe (see recipes/)")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise UserError(f"{path}: not valid YAML: {str(err).splitlines()[0]}") from err
    if not isinstance(raw, dict):
        raise UserError(f"{path}: a recipe is a mapping with sections {', '.join(SECTIONS)}")
    return recipe_from_dict(apply_overrides(raw, parse_overrides(overrides)), source=str(path))


def recipe_from_dict(raw: dict[str, Any], source: str = "<recipe>") -> Recipe:
    from adapterhub import methods

    unknown = set(raw) - set(SECTIONS)
    if unknown:
        raise UserError(
            f"{source}: unknown section '{sorted(unknown)[0]}': sections are {', '.join(SECTIONS)}"
        )
    sections = {}
    for name, cls in SECTIONS.items():
        values = raw.get(name) or {}
        if not isinstance(values, dict):
            raise UserError(f"{source}: section '{name}' must be a mapping of keys to values")
        if cls is MethodArgs:
            values = dict(values)
            method_type = values.pop("type", None)
            if method_type is None:
                raise UserError(f"{source}: missing key 'method.type': one of {', '.join(methods.names())}")
            method = methods.get(method_type, source)
            sections[name] = MethodArgs(type=method_type, params=method.check_params(values, source))
        else:
            sections[name] = build_section(cls, values, f"{source}: {name}")
    recipe = Recipe(**sections, source=source)
    for bad, problem in (
        (recipe.eval.limit is not None and recipe.eval.limit < 1, "eval.limit: use 1 or more"),
        ((recipe.eval.num_fewshot or 0) < 0, "eval.num_fewshot: use 0 or more"),
        (not all(task.strip() for task in recipe.eval.tasks), "eval.tasks: an empty task name"),
    ):
        if bad:
            raise UserError(f"{source}: {problem}")
    if not recipe.data.path and not recipe.data.dataset:
        raise UserError(
            f"{source}: missing key 'data.path' (a local file) or 'data.dataset' (a Hub dataset id)"
        )
    return recipe


def build_section(cls: type, values: dict[str, Any], where: str) -> Any:
    hints = field_hints(cls)
    for key, value in values.items():
        if key not in hints:
            raise UserError(f"{where}.{key}: unknown key; known keys: {', '.join(hints)}")
        if not matches(value, hints[key]):
            raise UserError(f"{where}.{key}: expected {describe(hints[key])}, got {value!r}")
    return cls(**values)
