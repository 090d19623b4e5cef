"""One conversation: its turns, system prompt, adapter and sampling settings, and what changes them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from rich.table import Table
from rich.text import Text

from adapterhub.chat.backends import BASE, BASE_ENTRY, AdapterEntry, Backend, ChatRequest
from adapterhub.chat.sanitize import terminal_safe
from adapterhub.chat.transcript import Transcript, load_transcript, save_transcript
from adapterhub.chat.view import ChatView, Reply
from adapterhub.errors import UserError
from adapterhub.runtime.api import SamplingParams

# name: (type, check, what the check wants)
SETTINGS: dict[str, tuple[type, Callable[[float], bool], str]] = {
    "temperature": (float, lambda v: 0 <= v <= 2, "a number from 0 to 2"),
    "top_p": (float, lambda v: 0 < v <= 1, "a number above 0 and at most 1"),
    "max_tokens": (int, lambda v: v >= 1, "a whole number of at least 1"),
    "seed": (int, lambda v: True, "a whole number or none"),
}


@dataclass
class ChatSession:
    backend: Backend
    view: ChatView
    adapter: AdapterEntry = BASE_ENTRY
    params: SamplingParams = field(default_factory=SamplingParams)
    transcript: Transcript = field(default_factory=Transcript)
    running: bool = True

    @property
    def messages(self) -> list[dict[str, str]]:
        return self.transcript.messages

    def prompt_messages(self, turns: list[dict[str, str]]) -> list[dict[str, str]]:
        """What the model sees: the system prompt, then the turns without our bookkeeping keys."""
        system = [{"role": "system", "content": self.transcript.system}] if self.transcript.system else []
        return system + [{"role": m["role"], "content": m["content"]} for m in turns]

    def ask(self, text: str) -> Reply:
        self.messages.append({"role": "user", "content": text})
        return self.answer()

    def answer(self) -> Reply:
        """Answer the last user turn with the current adapter; a stopped reply keeps what streamed."""
        request = ChatRequest(
            self.prompt_messages(self.messages), self.adapter_name(self.adapter), self.params
        )
        [reply] = self.view.stream(self.backend, [(self.adapter, request)])
        if reply.error is not None:
            raise reply.error
        if reply.text or reply.finish_reason != "cancelled":
            self.messages.append({"role": "assistant", "content": reply.text, "adapter": self.adapter.name})
        return reply

    def retry(self) -> Reply:
        if self.messages and self.messages[-1]["role"] == "assistant":
            self.messages.pop()
        if not self.messages:
            raise UserError("nothing to retry: say something first")
        return self.answer()

    def undo(self) -> None:
        """Drop the last exchange: the last reply (if any) and the user turn it answered."""
        if not self.messages:
            raise UserError("nothing to undo: the conversation is empty")
        if self.messages[-1]["role"] == "assistant":
            self.messages.pop()
        if self.messages and self.messages[-1]["role"] == "user":
            self.messages.pop()

    def reset(self) -> None:
        self.messages.clear()

    def switch(self, name: str) -> None:
        self.adapter = self.backend.select(name)

    def compare(self, names: list[str]) -> list[Reply]:
        """Answer the last user turn with the base and each named adapter (all of them by default)."""
        last_user = max((i for i, m in enumerate(self.messages) if m["role"] == "user"), default=None)
        if last_user is None:
            raise UserError("nothing to compare: say something first")
        entries = (
            [BASE_ENTRY, *(self.backend.select(name) for name in names)] if names else self.backend.adapters()
        )
        unique = list(dict.fromkeys(entries))
        history = self.prompt_messages(self.messages[: last_user + 1])
        requests = [(entry, ChatRequest(history, self.adapter_name(entry), self.params)) for entry in unique]
        return self.view.stream(self.backend, requests, side_by_side=True)

    def adapter_name(self, entry: AdapterEntry) -> str | None:
        return None if entry.name == BASE else entry.name

    def update_settings(self, assignments: list[str]) -> None:
        self.params = parse_settings(assignments, self.params)

    def settings(self) -> str:
        return " ".join(f"{name}={getattr(self.params, name)}" for name in SETTINGS)

    def save(self, path: Path) -> None:
        save_transcript(self.transcript, path)

    def load(self, path: Path) -> None:
        self.transcript = load_transcript(path)

    def adapters_table(self) -> Table:
        table = Table("", "adapter", "method")
        for entry in self.backend.adapters():
            current = "*" if entry.name == self.adapter.name else ""
            table.add_row(current, Text(terminal_safe(entry.name)), Text(terminal_safe(entry.method)))
        return table


def parse_settings(assignments: list[str], params: SamplingParams) -> SamplingParams:
    """``["temperature=0.7", "max_tokens=100"]`` applied to ``params``, every value checked."""
    changes: dict[str, float | int | None] = {}
    for assignment in assignments:
        name, sep, value = assignment.partition("=")
        if not sep or name not in SETTINGS:
            raise UserError(
                f"cannot set '{assignment}': write NAME=VALUE with NAME one of {', '.join(SETTINGS)}"
            )
        changes[name] = parse_setting(name, value)
    return replace(params, **changes)


def parse_setting(name: str, value: str) -> float | int | None:
    kind, valid, expected = SETTINGS[name]
    if name == "seed" and value.lower() == "none":
        return None
    try:
        number = kind(value)
    except ValueError:
        number = None
    if number is None or not valid(number):
        raise UserError(f"{name} must be {expected}, not '{value}'")
    return number
