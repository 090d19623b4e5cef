"""Runtime fixtures: random adapters of every family written by plain PEFT, and an engine over them."""

from __future__ import annotations

from pathlib import Path

import pytest

from adapterhub.models import ModelSpec, load_model
from adapterhub.runtime.engine import Engine
from adapterhub.runtime.random_adapters import peft_config, write_random_adapter

from .references import ADAPTERS, BASE, make_engine


@pytest.fixture(scope="session")
def adapter_dirs(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Each adapter saved by plain PEFT ``save_pretrained`` with distinct random weights."""
    root = tmp_path_factory.mktemp("adapters")
    base = load_model(ModelSpec(BASE, device="cpu"))
    folders = {}
    for seed, (name, spec) in enumerate(ADAPTERS.items(), start=1):
        spec = dict(spec)
        config = peft_config(spec.pop("family"), **spec)
        folders[name] = write_random_adapter(base, config, root / name, seed=seed)
    return folders


@pytest.fixture(scope="module")
def engine(adapter_dirs: dict[str, Path]) -> Engine:
    """An fp32 engine with every adapter registered, stepped inline (no loop thread)."""
    return make_engine(adapter_dirs)
