"""The local backend in-process over the real Engine: Ctrl-C, and a conversation outgrowing the context.

The interrupt is delivered exactly where a user's Ctrl-C lands (while the view draws the first
text), and the engine thread is held on that token until the view has cancelled, so it is exact.
"""

from __future__ import annotations

import io
import queue
import threading
from collections.abc import Iterator

import pytest
from rich.console import Console

from adapterhub.chat.backends import ChatRequest, Delta, Event, Generation, LocalBackend
from adapterhub.chat.session import ChatSession
from adapterhub.chat.view import ChatView
from adapterhub.errors import UserError
from adapterhub.runtime.api import SamplingParams


class InterruptedScreen(io.StringIO):
    """A console file that raises KeyboardInterrupt the first time reply text is drawn on it."""

    def __init__(self) -> None:
        super().__init__()
        self.interrupted = False

    def write(self, text: str) -> int:
        if text and not self.interrupted:
            self.interrupted = True
            raise KeyboardInterrupt
        return super().write(text)


class CancelWatch:
    def __init__(self, handle: Generation, cancelled: threading.Event) -> None:
        self.handle, self.cancelled = handle, cancelled

    def cancel(self) -> None:
        self.handle.cancel()
        self.cancelled.set()


class HeldQueue:
    """Forwards events to the view; holds the engine thread on its first text until the view cancels."""

    def __init__(self, events: queue.Queue[Event], cancelled: threading.Event) -> None:
        self.events, self.cancelled, self.held = events, cancelled, False

    def put(self, event: Event) -> None:
        self.events.put(event)
        if isinstance(event, Delta) and event.text and not self.held:
            self.held = True
            assert self.cancelled.wait(30), "the view never cancelled"


class WatchedBackend(LocalBackend):
    """Holds the engine on each reply's first text until the view cancels, while ``hold`` is on."""

    def __init__(self, engine) -> None:
        super().__init__(engine)
        self.handles: list[Generation] = []
        self.hold = True

    def start(self, request: ChatRequest, slot: int, events: queue.Queue[Event]) -> Generation:
        cancelled = threading.Event()
        handle = super().start(request, slot, HeldQueue(events, cancelled) if self.hold else events)
        self.handles.append(handle)
        return CancelWatch(handle, cancelled)


@pytest.fixture(scope="module")
def engine(tiny_llama) -> Iterator:
    from adapterhub.runtime.engine import Engine, EngineConfig

    engine = Engine(EngineConfig(base="builtin:tiny-llama"))
    engine.start()
    yield engine
    engine.stop(grace_s=5)


def test_ctrl_c_cancels_the_engine_request_and_keeps_the_streamed_text(engine) -> None:
    backend = WatchedBackend(engine)
    screen = InterruptedScreen()
    session = ChatSession(backend, ChatView(Console(file=screen)), params=SamplingParams(max_tokens=50))
    reply = session.ask("hello how are you")
    result = backend.handles[0].result(timeout=30)
    assert reply.finish_reason == "cancelled"
    assert result.finish_reason == "cancelled"
    assert 0 < len(result.token_ids) < 50
    assert reply.text and result.text.startswith(reply.text)
    assert session.messages[-1] == {"role": "assistant", "content": reply.text, "adapter": "base"}
    assert "stopped" in reply.status()
    # The engine is free again: the next question is answered in full.
    screen.interrupted, backend.hold = True, False
    assert session.ask("thank you").finish_reason == "length"


def test_a_conversation_longer_than_the_context_asks_for_undo(engine) -> None:
    session = ChatSession(LocalBackend(engine), ChatView(Console(file=io.StringIO())))
    with pytest.raises(
        UserError, match=r"the conversation no longer fits: .*; /undo or /reset to shorten it"
    ):
        session.ask("hello " * engine.max_context)
    session.undo()
    assert session.messages == []
    assert session.ask("hello").finish_reason in ("stop", "length")


def test_a_reply_cut_by_the_full_context_says_so_not_max_tokens(engine) -> None:
    from adapterhub.chat.backends import chat_prompt

    def prompt_tokens(words: int) -> int:
        prompt = chat_prompt(engine.tokenizer, [{"role": "user", "content": "hello " * words}])
        return len(engine.tokenizer(prompt)["input_ids"])

    words = engine.max_context
    while prompt_tokens(words) > engine.max_context - 4:  # leave room for a few tokens only
        words -= 1
    session = ChatSession(
        LocalBackend(engine), ChatView(Console(file=io.StringIO())), params=SamplingParams(max_tokens=50)
    )
    reply = session.ask("hello " * words)
    assert reply.finish_reason == "length" and reply.tokens < 50
    expected = f"context full ({prompt_tokens(words)} prompt + {reply.tokens} reply tokens)"
    assert expected in reply.status() and "max_tokens" not in reply.status()
