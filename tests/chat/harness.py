"""The chat REPL in a real pseudo-terminal, and a scriptable engine to put behind the real server app.

``ScriptedEngine`` keeps the Engine contract with a real tokenizer but echoing replies and a hold
point, so streaming and Ctrl-C can be driven deterministically over the real server app; what a
model generates is tested against the real Engine.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pexpect

from adapterhub.runtime.api import AdapterInfo, GenerationRequest, GenerationResult, RequestError

ANSI = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b[()][A-Z0-9]|\r")
TERMINAL = {"TERM": "xterm", "PROMPT_TOOLKIT_NO_CPR": "1", "COLUMNS": "150", "LINES": "50"}
STEP_S = 0.01


def plain(text: str) -> str:
    """Terminal output without colour and cursor escapes."""
    return ANSI.sub("", text)


def chat_args(*args: str) -> list[str]:
    return [sys.executable, "-m", "adapterhub", "chat", *args]


def run_piped(*args: str, stdin: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """``echo STDIN | adapterhub chat ARGS``, standard output and error captured."""
    return subprocess.run(chat_args(*args), input=stdin, capture_output=True, text=True, timeout=timeout)


class ChatTerminal:
    """``adapterhub chat`` under pexpect in an xterm-sized pseudo-terminal."""

    def __init__(self, *args: str, timeout: float = 60) -> None:
        self.child = pexpect.spawn(
            sys.executable,
            ["-m", "adapterhub", "chat", *args],
            env={**os.environ, **TERMINAL},
            dimensions=(50, 150),
            encoding="utf-8",
            timeout=timeout,
        )
        self.raw = ""  # everything read, escapes included
        self.transcript = ""  # the same as plain text

    def expect(self, pattern: str) -> str:
        """Wait for the regex ``pattern``; returns the plain text since the last match, match included."""
        self.child.expect(pattern)
        self.raw += self.child.before + self.child.after
        seen = plain(self.child.before + self.child.after)
        self.transcript += seen
        return seen

    def prompt(self, adapter: str) -> str:
        return self.expect(re.escape(f"{adapter}>"))

    def send(self, line: str) -> None:
        self.child.sendline(line)

    def say(self, line: str, expected: str) -> str:
        """Send ``line`` and wait for the regex ``expected``; returns the plain text seen."""
        self.send(line)
        return self.expect(expected)

    def close(self) -> int:
        """Leave with /quit and return the exit status."""
        self.send("/quit")
        self.child.expect(pexpect.EOF)
        self.child.close()
        return self.child.exitstatus


@contextlib.contextmanager
def chat_terminal(*args: str) -> Iterator[ChatTerminal]:
    terminal = ChatTerminal(*args)
    try:
        yield terminal
    finally:
        if terminal.child.isalive():
            terminal.child.terminate(force=True)


class ScriptedHandle:
    def __init__(self) -> None:
        self.cancelled = threading.Event()
        self.finished = threading.Event()
        self.outcome: GenerationResult | None = None

    @property
    def done(self) -> bool:
        return self.finished.is_set()

    def cancel(self) -> None:
        self.cancelled.set()

    def result(self, timeout: float | None = None) -> GenerationResult:
        if not self.finished.wait(timeout):
            raise TimeoutError
        assert self.outcome is not None
        return self.outcome


class ScriptedEngine:
    """Answers ``[ADAPTER] you said: LAST USER TURN`` word by word.

    After ``hold_after`` words a reply waits until ``release`` is set (or it is cancelled).
    """

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.base_name = "builtin:tiny-llama"
        self.max_context = 512
        self.adapters = {
            name: AdapterInfo(name, method, name, self.base_name)
            for name, method in (("lora-a", "lora"), ("ia3-b", "ia3"))
        }
        self.hold_after: int | None = None
        self.release = threading.Event()
        self.cancelled: list[ScriptedHandle] = []

    def list(self) -> list[AdapterInfo]:
        return list(self.adapters.values())

    def register(self, name: str, spec: str) -> AdapterInfo:
        raise RequestError(f"no adapter '{spec}' to register", "unknown_adapter")

    def unregister(self, name: str) -> None:
        self.adapters.pop(name)

    def start(self) -> None:
        pass

    def stop(self, grace_s: float = 30.0) -> None:
        pass

    def stats(self) -> dict:
        return {
            "queue_depth": 0,
            "running": 0,
            "last_batch_size": 0,
            "adapter_loads": 0,
            "adapter_evictions": 0,
        }

    def submit(self, request: GenerationRequest) -> ScriptedHandle:
        if request.adapter is not None and request.adapter not in self.adapters:
            raise RequestError(f"unknown adapter '{request.adapter}'", "unknown_adapter")
        prompt = request.prompt if isinstance(request.prompt, str) else self.tokenizer.decode(request.prompt)
        said = prompt.rsplit("<|user|>\n", 1)[-1].split("</s>", 1)[0]
        words = f"[{request.adapter or 'base'}] you said: {said}".split(" ")
        handle = ScriptedHandle()
        threading.Thread(target=self._reply, args=(request, words, handle), daemon=True).start()
        return handle

    def _reply(self, request: GenerationRequest, words: list[str], handle: ScriptedHandle) -> None:
        deltas = [word if i == 0 else f" {word}" for i, word in enumerate(words)]
        sent: list[str] = []
        for i, delta in enumerate(deltas):
            if i == self.hold_after:
                while not (self.release.wait(STEP_S) or handle.cancelled.is_set()):
                    pass
            if handle.cancelled.is_set():
                self.cancelled.append(handle)
                break
            sent.append(delta)
            if request.on_token is not None:
                request.on_token(i, delta)
            time.sleep(STEP_S)
        reason = "cancelled" if handle.cancelled.is_set() else "stop"
        text = "".join(sent)
        handle.outcome = GenerationResult(text, list(range(len(sent))), 8, len(sent), reason)
        handle.finished.set()


def wait_until(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


def read_jsonl(path: Path) -> list[dict]:
    import json

    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
