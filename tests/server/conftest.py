"""Fixtures of the server tests; the harness itself is in server_harness.py."""

from __future__ import annotations

from pathlib import Path

import pytest
from server_harness import ScriptedEngine


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_llama: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_llama)


@pytest.fixture
def scripted(tiny_tokenizer) -> ScriptedEngine:
    engine = ScriptedEngine(tiny_tokenizer)
    engine.register("lora-a", "lora")
    engine.register("ia3-b", "ia3")
    return engine
