"""The chat REPL in a real pseudo-terminal, and an echoing scripted engine to put behind the real
server app (the scripted engine itself is shared with the server tests: ../scripted_engine.py)."""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pexpect
from scripted_engine import ScriptedEngine

ANSI = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b[()][A-Z0-9]|\r")
TERMINAL = {"TERM": "xterm", "PROMPT_TOOLKIT_NO_CPR": "1", "COLUMNS": "150", "LINES": "50"}


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

    def __init__(self, *args: str, timeout: float = 60, term: str = "xterm") -> None:
        self.child = pexpect.spawn(
            sys.executable,
            ["-m", "adapterhub", "chat", *args],
            env={**os.environ, **TERMINAL, "TERM": term},
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
def chat_terminal(*args: str, term: str = "xterm") -> Iterator[ChatTerminal]:
    terminal = ChatTerminal(*args, term=term)
    try:
        yield terminal
    finally:
        if terminal.child.isalive():
            terminal.child.terminate(force=True)


class EchoEngine(ScriptedEngine):
    """Answers ``[ADAPTER] you said: LAST USER TURN`` and serves ``lora-a`` (LoRA) and ``ia3-b`` (IA3)."""

    def __init__(self, tokenizer) -> None:
        super().__init__(tokenizer)
        self.max_context = 512  # room for a chat prompt and chat's default --max-tokens
        self.register("lora-a", "lora")
        self.register("ia3-b", "ia3")

    def reply_ids(self, adapter: str | None, prompt_ids: list[int], max_tokens: int) -> list[int]:
        said = self.tokenizer.decode(prompt_ids).rsplit("<|user|>\n", 1)[-1].split("</s>", 1)[0]
        reply = f"[{adapter or 'base'}] you said: {said}"
        return self.tokenizer(reply, add_special_tokens=False).input_ids[:max_tokens]


def read_jsonl(path: Path) -> list[dict]:
    import json

    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
