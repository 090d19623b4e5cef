"""Fixtures of the server tests; the scripted engine is in ../scripted_engine.py."""

from __future__ import annotations

from pathlib import Path

import pytest
from scripted_engine import ScriptedEngine


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
