"""A reply (or a server's error) full of terminal escape sequences reaches the terminal without them."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from scripted_engine import ScriptedEngine

from adapterhub.chat.sanitize import terminal_safe
from adapterhub.runtime.api import GenerationResult, RequestError

from .harness import chat_terminal, run_piped

# Clear screen, a blinking magenta that rich never uses, window title (OSC 0), clipboard write
# (OSC 52, BEL- and ST-terminated), terminal reset, 8-bit CSI, bell, backspace, a lone CR.
PAYLOAD = (
    "safe \x1b[2Jstart \x1b[5;38;5;201mLOUD\x1b[0m \x1b]0;PWNED-TITLE\x07title "
    "\x1b]52;c;UFdORUQ=\x07clip \x1b]52;c;UFdORUQ=\x1b\\st \x1bcreset \x9b2Jcsi "
    "\x07bell x\x08y over\rwrite end"
)
SEQUENCES = (
    "\x1b[2J",
    "\x1b[5;38;5;201m",
    "\x1b]",
    "\x1bc",
    "\x9b",
    "\x07",
    "\x08",
    "PWNED-TITLE",
    "UFdORUQ",
)


class HostileEngine(ScriptedEngine):
    """A server that sends ``PAYLOAD`` as every reply, three characters per delta so sequences are
    split across them; ``fail_next`` fails the next reply instead."""

    def _generate(self, handle, prompt_tokens: int) -> None:
        chunks = [PAYLOAD[start : start + 3] for start in range(0, len(PAYLOAD), 3)]
        if self.fail_next is None and handle.request.on_token is not None:
            for chunk in chunks:
                handle.request.on_token(0, chunk)
        result = GenerationResult(PAYLOAD, [0] * len(chunks), prompt_tokens, len(chunks), "stop")
        handle.outcome, self.fail_next = self.fail_next or result, None
        handle.finished.set()


@pytest.fixture
def hostile(tiny_llama: Path) -> Iterator[tuple[str, HostileEngine]]:
    """The real server app over ``HostileEngine``: its URL and the engine."""
    from transformers import AutoTokenizer

    from adapterhub.server.app import create_app
    from adapterhub.server.background import serve_in_background

    engine = HostileEngine(AutoTokenizer.from_pretrained(tiny_llama))
    engine.max_context = 512
    with serve_in_background(create_app(engine)) as url:
        yield url, engine


def test_sequences_are_removed_and_other_controls_shown_as_replacement_characters() -> None:
    shown = terminal_safe(PAYLOAD)
    assert shown == ("safe start LOUD title clip st reset csi \ufffdbell x\ufffdy over\ufffdwrite end")
    for end in range(len(PAYLOAD) + 1):  # while streaming, each prefix shows the start of the whole
        assert shown.startswith(terminal_safe(PAYLOAD[:end], final=False))
    assert terminal_safe("cut \x1b]0;never ended") == "cut \ufffd]0;never ended"  # no ESC either way
    assert terminal_safe("line\r\nnext") == "line\nnext"


def test_piped_reply_has_no_escape_byte(hostile: tuple[str, HostileEngine]) -> None:
    done = run_piped("--url", hostile[0], stdin="hi\n")
    assert done.returncode == 0, done.stderr
    assert "safe start LOUD title clip st reset csi" in done.stdout
    for output in (done.stdout, done.stderr):
        assert not any(code in output for code in ("\x1b", *SEQUENCES)), repr(output)


def test_a_servers_error_message_has_no_escape_byte(hostile: tuple[str, HostileEngine]) -> None:
    url, engine = hostile
    engine.fail_next = RequestError("bad \x1b]0;PWNED-TITLE\x07 \x1b[2Jthing", "bad_request")
    done = run_piped("--url", url, stdin="hi\n")
    assert done.returncode == 1 and "failed the reply: bad  thing" in done.stderr
    assert "\x1b" not in done.stderr and "PWNED" not in done.stderr


@pytest.mark.parametrize("term", ["xterm", "dumb"])
def test_terminal_reply_has_none_of_the_sequences(hostile: tuple[str, HostileEngine], term: str) -> None:
    """On a pseudo-terminal: as xterm (a live redraw: only rich's and prompt_toolkit's own escapes)
    and as a dumb terminal (plain text: the reply brings not one ESC byte; prompt_toolkit still
    shows its cursor with one before the prompt)."""
    with chat_terminal("--url", hostile[0], term=term) as chat:
        chat.prompt("base")
        chat.say("hi", r"base \(base\) · \d+ tokens")
        chat.prompt("base")
        assert chat.close() == 0
    assert "LOUD title clip st reset csi" in chat.transcript
    for code in SEQUENCES:
        assert code not in chat.raw, repr(code)
    if term == "dumb":
        reply = chat.raw.split("base> hi", 1)[1].split("base (base)", 1)[0]
        assert "safe start LOUD" in reply and "\x1b" not in reply and "\x9b" not in reply
