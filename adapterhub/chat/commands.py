"""The slash commands: a table of entries (name, arguments, help, handler); ``/help`` is drawn from it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from rich.table import Table

from adapterhub.chat.session import ChatSession
from adapterhub.errors import UserError


@dataclass(frozen=True)
class SlashCommand:
    name: str
    args: str
    help: str
    handler: Callable[[ChatSession, str], None]


def show_help(session: ChatSession, _: str) -> None:
    table = Table("command", "what it does", box=None)
    for command in COMMANDS:
        table.add_row(f"/{command.name} {command.args}".rstrip(), command.help)
    session.view.show(table)


def switch_adapter(session: ChatSession, name: str) -> None:
    if name:
        with session.view.console.status(f"loading {name} …"):
            session.switch(name)
    session.view.note(f"adapter: {session.adapter.name} ({session.adapter.method})")


def list_adapters(session: ChatSession, _: str) -> None:
    session.view.show(session.adapters_table())


def compare(session: ChatSession, names: str) -> None:
    session.compare(names.split())


def set_system(session: ChatSession, text: str) -> None:
    session.transcript.system = text or None
    session.view.note(f"system prompt: {text}" if text else "system prompt cleared")


def set_sampling(session: ChatSession, assignments: str) -> None:
    if assignments:
        session.update_settings(assignments.split())
    session.view.note(session.settings())


def retry(session: ChatSession, _: str) -> None:
    session.view.status(session.retry())


def undo(session: ChatSession, _: str) -> None:
    session.undo()
    session.view.note(f"{len(session.messages)} messages left")


def reset(session: ChatSession, _: str) -> None:
    session.reset()
    session.view.note("conversation cleared")


def save(session: ChatSession, path: str) -> None:
    session.save(Path(required(path, "save")))
    session.view.note(f"saved {len(session.messages)} messages to {path}")


def load(session: ChatSession, path: str) -> None:
    session.load(Path(required(path, "load")))
    session.view.note(f"loaded {len(session.messages)} messages from {path}")


def leave(session: ChatSession, _: str) -> None:
    session.running = False


def required(value: str, command: str) -> str:
    if not value:
        raise UserError(f"/{command} needs a FILE: e.g. /{command} chat.jsonl")
    return value


COMMANDS: tuple[SlashCommand, ...] = (
    SlashCommand("help", "", "list the commands", show_help),
    SlashCommand("adapter", "NAME", "switch adapter (base: no adapter), keeping the history", switch_adapter),
    SlashCommand("adapters", "", "list adapters with their method", list_adapters),
    SlashCommand("compare", "[A B ...]", "answer the last user turn with the base and each adapter", compare),
    SlashCommand("system", "TEXT", "set the system prompt (empty clears it)", set_system),
    SlashCommand(
        "set", "temperature=… top_p=… max_tokens=… seed=…", "change sampling settings", set_sampling
    ),
    SlashCommand("retry", "", "regenerate the last answer", retry),
    SlashCommand("undo", "", "remove the last turn", undo),
    SlashCommand("reset", "", "clear the conversation", reset),
    SlashCommand("save", "FILE", "write the transcript as JSONL", save),
    SlashCommand("load", "FILE", "load a transcript", load),
    SlashCommand("quit", "", "leave", leave),
)
BY_NAME = {command.name: command for command in COMMANDS}


def run_command(session: ChatSession, line: str) -> None:
    """Run one ``/name args`` line; raises ``UserError`` for an unknown command or bad arguments."""
    name, _, arg = line.removeprefix("/").partition(" ")
    command = BY_NAME.get(name)
    if command is None:
        raise UserError(f"unknown command '/{name}': /help lists the commands")
    command.handler(session, arg.strip())
