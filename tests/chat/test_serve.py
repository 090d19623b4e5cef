"""Remote mode against a real ``adapterhub serve`` process running the real Engine."""

from __future__ import annotations

import contextlib
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from scripted_engine import wait_until

from tests.ports import free_port

from .harness import chat_terminal, read_jsonl
from .reference import peft_greedy

KEY = "serve-key"


def answers_health(url: str) -> bool:
    with contextlib.suppress(httpx.HTTPError):
        return httpx.get(f"{url}/health", timeout=2).status_code == 200
    return False


@pytest.fixture
def served(adapters: dict[str, Path]) -> Iterator[str]:
    port = free_port()
    specs = f"lora={adapters['lora']},prompt={adapters['prompt']}"
    command = [sys.executable, "-m", "adapterhub", "serve", "--base", "builtin:tiny-llama"]
    command += ["--adapters", specs, "--port", str(port), "--api-key", KEY]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: server.poll() is not None or answers_health(url), timeout=120)
        assert server.poll() is None, "adapterhub serve exited"
        yield url
    finally:
        server.terminate()
        server.wait(30)


@pytest.mark.slow
def test_chat_through_adapterhub_serve(served: str, adapters: dict[str, Path], tmp_path: Path) -> None:
    saved = tmp_path / "remote.jsonl"
    with chat_terminal("--url", served, "--api-key", KEY, "--max-tokens", "10") as chat:
        chat.prompt("base")
        listing = chat.say("/adapters", r"prompt\s+│?\s*prompt_tuning")
        assert "lora" in listing.split("adapter", 1)[1]
        chat.say("hello how are you", r"base \(base\) · 10 tokens")
        chat.say("/adapter lora", r"adapter: lora \(lora\)")
        chat.say("tell me about the review", r"lora \(lora\) · 10 tokens")
        chat.say(f"/save {saved}", "saved 4 messages")
        assert chat.close() == 0
    messages = read_jsonl(saved)
    assert messages[1]["content"] == peft_greedy(None, messages[:1], 10)
    assert messages[3]["content"] == peft_greedy(adapters["lora"], messages[:3], 10)
