"""The read loop: line editing and history on a terminal, one answer for piped input."""

from __future__ import annotations

import sys
from collections.abc import Callable

from rich.console import Console

from adapterhub.chat.backends import Backend, LocalBackend, RemoteBackend
from adapterhub.chat.commands import run_command
from adapterhub.chat.sanitize import terminal_safe
from adapterhub.chat.session import ChatSession
from adapterhub.chat.transcript import Transcript
from adapterhub.chat.view import ChatView
from adapterhub.errors import UserError
from adapterhub.paths import home
from adapterhub.runtime.api import SamplingParams


def open_backend(
    console: Console, base: str | None, adapter: str | None, url: str | None, api_key: str | None
) -> Backend:
    if url is not None:
        if base is not None:
            raise UserError("--base is for local mode: a server at --url serves its own base model")
        return RemoteBackend(url, api_key)
    from adapterhub.runtime.threads import leave_compute_to_the_engine

    leave_compute_to_the_engine()  # the engine's stepping thread computes (runtime/threads.py)
    with console.status(f"loading {base or adapter} …"):
        return LocalBackend.open(base, adapter)


def open_session(
    console: Console, backend: Backend, adapter: str | None, system: str | None, params: SamplingParams
) -> ChatSession:
    session = ChatSession(backend, ChatView(console), params=params, transcript=Transcript(system=system))
    if adapter is not None:
        session.switch(adapter)
    return session


def line_reader() -> Callable[[str], str]:
    """prompt_toolkit's editor with a persistent history on a terminal, plain ``input`` otherwise."""
    if not (sys.stdin.isatty() and sys.stdout.isatty()):
        return input
    from prompt_toolkit import PromptSession
    from prompt_toolkit.history import FileHistory

    history = home() / "chat_history"
    history.parent.mkdir(parents=True, exist_ok=True)
    return PromptSession(history=FileHistory(str(history))).prompt


def run_repl(session: ChatSession) -> None:
    """Read lines until /quit or Ctrl-D; Ctrl-C clears the line (or stops a reply) and carries on."""
    read = line_reader()
    session.view.note(
        f"{session.backend.description} · adapter {session.adapter.name} · /help lists the commands"
    )
    while session.running:
        try:
            line = read(f"{terminal_safe(session.adapter.name)}> ").strip()
        except KeyboardInterrupt:
            continue
        except EOFError:
            break
        if not line:
            continue
        try:
            if line.startswith("/"):
                run_command(session, line)
            else:
                session.view.status(session.ask(line))
        except UserError as err:
            session.view.error(err)
        except KeyboardInterrupt:
            session.view.note("interrupted")


def piped_question() -> str | None:
    """The question piped into standard input, or None when a person is typing at a terminal."""
    if sys.stdin.isatty():
        return None
    question = sys.stdin.read().strip()
    if not question:
        raise UserError("standard input is empty: pipe in a question, e.g. echo hi | adapterhub chat ...")
    return question
