"""Fixtures of the chat tests; the pseudo-terminal and server helpers are in harness.py."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from .harness import EchoEngine

API_KEY = "sekret"


@pytest.fixture
def scripted(tiny_llama: Path) -> EchoEngine:
    from transformers import AutoTokenizer

    return EchoEngine(AutoTokenizer.from_pretrained(tiny_llama))


@pytest.fixture
def scripted_url(scripted: EchoEngine) -> Iterator[str]:
    """The real server app over the scripted engine, guarded by ``API_KEY``."""
    from adapterhub.server.app import create_app
    from adapterhub.server.background import serve_in_background

    with serve_in_background(create_app(scripted, api_key=API_KEY)) as url:
        yield url


@pytest.fixture(scope="session")
def adapters(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Random, non-trivial adapters of three families on the tiny Llama, named by their folders."""
    from adapterhub.models import ModelSpec, load_model
    from adapterhub.runtime.random_adapters import peft_config, write_random_adapter

    root = tmp_path_factory.mktemp("adapters")
    folders = {}
    for seed, (name, family) in enumerate((("lora", "lora"), ("ia3", "ia3"), ("prompt", "prompt_tuning"))):
        model = load_model(ModelSpec("builtin:tiny-llama"))
        folders[name] = write_random_adapter(model, peft_config(family), root / name, seed=seed + 1)
    return folders
