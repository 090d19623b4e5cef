"""What an adapter folder holds, and proof that it loads as a PEFT adapter before it is stored or shared."""

from __future__ import annotations

import contextlib
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from adapterhub.errors import UserError
from adapterhub.paths import home

CONFIG_FILE = "adapter_config.json"
WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")
# Written by `adapterhub train` beside the PEFT files; shared and pulled along with them.
COMPANION_FILES = ("README.md", "recipe.yaml", "metrics.json", "loss_curve.png")
ADAPTER_FILES = (CONFIG_FILE, *WEIGHT_FILES, *COMPANION_FILES)
PROMPT_METHODS = ("prompt_tuning", "p_tuning", "prefix_tuning")

_stderr = Console(stderr=True)


@dataclass(frozen=True)
class AdapterSummary:
    """The facts the store, ``list`` and the model card need about one adapter."""

    method: str  # PEFT's peft_type in lower case: lora, ia3, prompt_tuning, p_tuning, prefix_tuning, ...
    base_model: str
    rank: int | None
    num_virtual_tokens: int | None
    params: int  # parameters stored in the weights file


def has_adapter(folder: Path) -> bool:
    return (folder / CONFIG_FILE).is_file() and weights_file(folder) is not None


def weights_file(folder: Path) -> Path | None:
    return next((folder / name for name in WEIGHT_FILES if (folder / name).is_file()), None)


def read_config(folder: Path) -> dict:
    """``adapter_config.json`` as a dict, checked to parse into a PEFT config."""
    from peft import PeftConfig

    path = folder / CONFIG_FILE
    try:
        raw = json.loads(path.read_text())
        if not isinstance(raw, dict) or not raw.get("peft_type"):
            raise ValueError("no peft_type")
        PeftConfig.from_pretrained(str(folder))
    except (OSError, ValueError, TypeError, KeyError) as err:
        raise UserError(f"{path} is not a valid PEFT adapter config ({one_line(err)})") from err
    return raw


def inspect_adapter(folder: Path) -> AdapterSummary:
    """Validate ``folder`` as a PEFT adapter: the config parses, the weights load with the expected keys."""
    folder = Path(folder)
    if not (folder / CONFIG_FILE).is_file():
        raise UserError(f"{folder} has no {CONFIG_FILE}: it is not a PEFT adapter")
    weights = weights_file(folder)
    if weights is None:
        raise UserError(f"{folder} has no adapter weights ({' or '.join(WEIGHT_FILES)})")
    config = read_config(folder)
    method = str(config["peft_type"]).lower()
    shapes = _tensor_shapes(weights)
    _check_keys(method, config, shapes, weights)
    return AdapterSummary(
        method=method,
        base_model=config.get("base_model_name_or_path") or "",
        rank=config.get("r") if method == "lora" else None,
        num_virtual_tokens=config.get("num_virtual_tokens") if method in PROMPT_METHODS else None,
        params=sum(math.prod(shape) for shape in shapes.values()),
    )


def _tensor_shapes(weights: Path) -> dict[str, tuple[int, ...]]:
    """Load every tensor (so truncated or garbled files fail here) and return their shapes."""
    import torch
    from safetensors.torch import load_file

    try:
        if weights.suffix == ".safetensors":
            tensors = load_file(str(weights))
        else:
            tensors = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as err:  # safetensors and torch raise assorted types for corrupt bytes
        raise UserError(f"{weights} is corrupt or not a weights file ({one_line(err)})") from err
    if not tensors:
        raise UserError(f"{weights} holds no tensors: re-save the adapter")
    return {key: tuple(tensor.shape) for key, tensor in tensors.items()}


def _check_keys(method: str, config: dict, shapes: dict[str, tuple[int, ...]], weights: Path) -> None:
    problem = None
    if method == "lora":
        problem = _lora_problem(config, shapes)
    elif method == "ia3" and not any(key.rsplit(".", 1)[-1].startswith("ia3_") for key in shapes):
        problem = "no ia3_l vectors"
    elif method in PROMPT_METHODS:
        problem = _prompt_problem(method, config, shapes)
    if problem:
        raise UserError(f"{weights} does not match its {method} config: {problem}; re-save the adapter")


def _lora_problem(config: dict, shapes: dict[str, tuple[int, ...]]) -> str | None:
    a_keys = [key for key in shapes if ".lora_A." in key]
    if not a_keys:
        return "no lora_A/lora_B weights"
    rank = config.get("r")
    for a_key in a_keys:
        b_key = a_key.replace(".lora_A.", ".lora_B.")
        if b_key not in shapes:
            return f"{a_key} has no matching lora_B"
        if shapes[a_key][0] != shapes[b_key][-1]:
            return f"{a_key} and its lora_B disagree on the rank"
        if not config.get("rank_pattern") and shapes[a_key][0] != rank:
            return f"{a_key} has rank {shapes[a_key][0]} but the config says r={rank}"
    return None


def _prompt_problem(method: str, config: dict, shapes: dict[str, tuple[int, ...]]) -> str | None:
    shape = shapes.get("prompt_embeddings")
    if shape is None:
        return "no prompt_embeddings tensor"
    rows = (config.get("num_virtual_tokens") or 0) * (config.get("num_transformer_submodules") or 1)
    if method == "prefix_tuning":
        width = (config.get("num_layers") or 0) * 2 * (config.get("token_dim") or 0)
    else:
        width = config.get("token_dim")
    if shape != (rows, width):
        return f"prompt_embeddings has shape {list(shape)}, expected [{rows}, {width}]"
    return None


def one_line(err: BaseException) -> str:
    """An exception's message squeezed onto one short line, for the end of a ``UserError``."""
    text = " ".join(line.strip() for line in str(err).splitlines() if line.strip())
    return text[:200] or type(err).__name__


def canonical_base(name: str) -> str:
    """One spelling per base model, so ``builtin:tiny-llama`` equals the folder it is built in and a
    GGUF file is known by its content (a renamed copy is the same base; a changed file is not)."""
    from adapterhub import gguf

    if name.startswith("builtin:"):
        return str(home() / "builtin" / name.removeprefix("builtin:"))
    if gguf.is_gguf(name):
        with contextlib.suppress(UserError):  # a file not at hand keeps its spelling
            return f"gguf:sha256:{gguf.source(name).sha256}"
    return name.rstrip("/")


def check_base_model(adapter: Path, base_model: str, *, strict: bool = False) -> None:
    """Warn (or, when ``strict``, refuse) if the adapter at ``adapter`` was trained on another base model."""
    config_path = Path(adapter) / CONFIG_FILE
    trained_on = json.loads(config_path.read_text()).get("base_model_name_or_path") or ""
    if not trained_on or canonical_base(trained_on) == canonical_base(base_model):
        return
    message = f"adapter {adapter} was trained on '{trained_on}', not '{_described(base_model)}'"
    if strict:
        raise UserError(f"{message}: use the matching base model, or drop strict base checking")
    warn(f"{message}; outputs may be meaningless")


def _described(base_model: str) -> str:
    """A GGUF base as adapters record it (file name and hash), so a changed file shows its new hash."""
    from adapterhub import gguf
    from adapterhub.models import base_id

    if gguf.is_gguf(base_model):
        with contextlib.suppress(UserError):
            return base_id(base_model)
    return base_model


def warn(message: str) -> None:
    _stderr.print(f"[yellow]warning:[/] {escape(message)}", highlight=False)


def is_local_path(name: str) -> bool:
    return name.startswith(("/", "./", "../", "~")) or bool(re.match(r"^[A-Za-z]:[\\/]", name))
