"""Shared fixtures: an isolated adapterhub home, offline Hugging Face, and the tiny models."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

# Set before anything imports huggingface_hub: it reads these at import time.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ["ADAPTERHUB_HOME"] = tempfile.mkdtemp(prefix="adapterhub-test-home-")

import pytest


@pytest.fixture(scope="session")
def tiny_llama() -> Path:
    """Path of the builtin tiny Llama (random weights, local tokenizer), built once per session."""
    from adapterhub.tiny import builtin_path

    return builtin_path("builtin:tiny-llama")


@pytest.fixture(scope="session")
def tiny_mt5() -> Path:
    from adapterhub.tiny import builtin_path

    return builtin_path("builtin:tiny-mt5")
