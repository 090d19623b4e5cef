"""What an adapter folder holds, and proof that it loads as a PEFT adapter before it is stored or shared."""

from __future__ import annotations

import contextlib
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


def inspect_adapter(folder: Path, label: str | None = None) -> AdapterSummary:
    """Validate ``folder`` by the adapter contract: on its own, and against its base when that is known
    offline (a builtin, a local folder, a shipped or cached config). ``label`` names it in messages."""
    from adapterhub.contract import BaseModules, plan_for_base, read_adapter
    from adapterhub.models import offline_config

    folder = Path(folder)
    if not (folder / CONFIG_FILE).is_file():
        raise UserError(f"{folder} has no {CONFIG_FILE}: it is not a PEFT adapter")
    adapter = read_adapter(folder, label)
    base_model = adapter.config.get("base_model_name_or_path") or ""
    base_config = offline_config(base_model) if base_model else None
    if base_config is not None:
        plan_for_base(adapter, BaseModules(base_config))
    config = adapter.config
    return AdapterSummary(
        method=adapter.method,
        base_model=base_model,
        rank=config.get("r") if adapter.method == "lora" else None,
        num_virtual_tokens=config.get("num_virtual_tokens") if adapter.method in PROMPT_METHODS else None,
        params=adapter.stored_params,
    )


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
    from adapterhub.contract.files import read_config

    trained_on = read_config(Path(adapter)).get("base_model_name_or_path") or ""
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
