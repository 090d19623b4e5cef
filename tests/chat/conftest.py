"""Fixtures of the chat tests; the pseudo-terminal and server helpers are in harness.py."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from .harness import ScriptedEngine, running_app

API_KEY = "sekret"


@pytest.fixture
def scripted(tiny_llama: Path) -> ScriptedEngine:
    from transformers import AutoTokenizer

    return ScriptedEngine(AutoTokenizer.from_pretrained(tiny_llama))


@pytest.fixture
def scripted_url(scripted: ScriptedEngine) -> Iterator[str]:
    """The real server app over the scripted engine, guarded by ``API_KEY``."""
    from adapterhub.server.app import create_app

    with running_app(create_app(scripted, api_key=API_KEY)) as url:
        yield url
