"""Remote mode over the real server app and a scripted engine: streaming, Ctrl-C and connection errors."""

from __future__ import annotations

import re
import socket

from scripted_engine import wait_until

from adapterhub.chat.commands import BY_NAME

from .conftest import API_KEY
from .harness import EchoEngine, chat_terminal, run_piped


def test_reply_appears_while_it_streams(scripted: EchoEngine, scripted_url: str) -> None:
    scripted.hold_after = len(scripted.tokenizer("[lora-a] you said:", add_special_tokens=False).input_ids)
    scripted.gate.clear()
    with chat_terminal("--url", scripted_url, "--api-key", API_KEY, "--adapter", "lora-a") as chat:
        chat.prompt("lora-a")
        chat.send("tell me **loud** news")
        # The reply is held after three words: they must be on screen before it can finish.
        chat.expect(r"\[lora-a\] you said:")
        assert "tokens" not in chat.transcript.split("tell me **loud** news")[-1]
        scripted.gate.set()
        streamed = chat.expect(r"\*\*loud\*\* news")
        status = chat.expect(r"lora-a \(lora\) · \d+ tokens · [\d.]+ tok/s")
        assert "tell me **loud** news" in streamed
        # Once finished the reply is redrawn as Markdown: the asterisks become bold.
        assert "you said: tell me loud news" in status
        assert re.search(r"\x1b\[1m(?:\x1b\[[\d;]*m)*loud", chat.raw)
        chat.prompt("lora-a")
        assert chat.close() == 0


def test_ctrl_c_stops_the_reply_and_the_session_goes_on(scripted: EchoEngine, scripted_url: str) -> None:
    scripted.hold_after = len(scripted.tokenizer("[base] you", add_special_tokens=False).input_ids)
    scripted.gate.clear()
    with chat_terminal("--url", scripted_url, "--api-key", API_KEY) as chat:
        chat.prompt("base")
        chat.say("hello how are you", r"\[base\] you")
        chat.child.sendintr()
        chat.expect(r"base \(base\) · \d+ tokens · [\d.]+ tok/s · stopped")
        wait_until(lambda: scripted.handles[0].done)
        assert scripted.handles[0].outcome.finish_reason == "cancelled"
        scripted.gate.set()
        chat.prompt("base")
        chat.say("thank you", r"\[base\] you said: thank you")
        chat.expect(r"base \(base\) · \d+ tokens")
        assert chat.close() == 0


def test_switch_list_and_unknown_names_keep_the_session(scripted_url: str) -> None:
    with chat_terminal("--url", scripted_url, "--api-key", API_KEY) as chat:
        chat.prompt("base")
        listing = chat.say("/help", r"/quit\s+leave")
        assert [name for name in BY_NAME if f"/{name}" not in listing] == []
        listing = chat.say("/adapters", r"ia3-b\s+│?\s*ia3")
        assert "lora-a" in listing and "lora" in listing
        chat.say("/adapter nope", r"unknown adapter 'nope': /adapters lists those")
        chat.say("/frobnicate", r"unknown command '/frobnicate': /help lists the commands")
        chat.say("/adapter ia3-b", r"adapter: ia3-b \(ia3\)")
        chat.prompt("ia3-b")
        chat.say("hello", r"\[ia3-b\] you said: hello")
        assert chat.close() == 0


def test_piped_question_is_answered_once(scripted_url: str) -> None:
    done = run_piped(
        "--url", scripted_url, "--api-key", API_KEY, "--adapter", "lora-a", stdin="hello there\n"
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == "[lora-a] you said: hello there\n"


def test_wrong_key_is_one_line(scripted_url: str) -> None:
    done = run_piped("--url", scripted_url, "--api-key", "wrong", stdin="hi\n")
    assert done.returncode == 1
    assert done.stderr.count("\n") == 1, done.stderr
    assert f"the server at {scripted_url}/v1 refused the API key" in done.stderr
    assert done.stderr.rstrip().endswith("pass the right --api-key")


def test_unreachable_server_is_one_line() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    done = run_piped("--url", f"http://127.0.0.1:{port}", stdin="hi\n", timeout=60)
    assert done.returncode == 1
    assert done.stderr.count("\n") == 1
    assert f"cannot reach the server at http://127.0.0.1:{port}/v1" in done.stderr
