"""Drawing the chat: replies stream in as they arrive, then settle as Markdown; ``/compare`` side by side.

On a terminal that can move its cursor the reply is redrawn live; in a pipe or a dumb terminal the
text is written as it arrives and left plain. Either way, what the model or a server said passes
through ``terminal_safe`` first: no escape sequence of theirs reaches the terminal.
"""

from __future__ import annotations

import queue
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from rich.console import Console, RenderableType
from rich.live import Live
from rich.markdown import Markdown
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from adapterhub.chat.backends import AdapterEntry, Backend, ChatRequest, Delta, Done, Event, Generation
from adapterhub.chat.sanitize import terminal_safe
from adapterhub.errors import UserError

REFRESH_S = 0.05  # redraw at most this often while tokens stream in
PANEL_WIDTH = 40  # the narrowest /compare panel: more adapters than fit wrap onto further rows


@dataclass
class Reply:
    """One adapter's answer as it streams in, and how it ended."""

    adapter: AdapterEntry
    text: str = ""
    deltas: int = 0
    completion_tokens: int | None = None
    prompt_tokens: int | None = None
    max_tokens: int | None = None  # what was asked for, to tell a full context from the max_tokens limit
    finish_reason: str | None = None  # None while streaming
    error: UserError | None = None
    started: float = field(default_factory=time.perf_counter)
    seconds: float = 0.0

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None or self.error is not None

    @property
    def tokens(self) -> int:
        return self.completion_tokens if self.completion_tokens is not None else self.deltas

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    def apply(self, event: Event) -> None:
        if isinstance(event, Delta):
            self.text += event.text
            self.deltas += 1
            return
        if isinstance(event, Done):
            self.completion_tokens = event.completion_tokens
            self.prompt_tokens = event.prompt_tokens
            self.finish_reason = event.finish_reason
        else:
            self.error = event.error
        self.seconds = time.perf_counter() - self.started

    def stop(self) -> None:
        self.finish_reason = "cancelled"
        self.seconds = time.perf_counter() - self.started

    def speed(self) -> str:
        parts = [f"{self.tokens} tokens", f"{self.tokens_per_second:.1f} tok/s"]
        if self.finish_reason == "cancelled":
            parts.append("stopped")
        elif self.finish_reason == "length":
            parts.append(self._length_reason())
        return " · ".join(parts)

    def _length_reason(self) -> str:
        """A "length" stop is the max_tokens limit, or the model's context filling up before it."""
        if self.max_tokens is None or self.tokens >= self.max_tokens:
            return "hit max_tokens" if self.max_tokens is None else f"hit max_tokens ({self.max_tokens})"
        if self.prompt_tokens is None:
            return "context full: /undo or /reset to make room"
        used = f"{self.prompt_tokens} prompt + {self.tokens} reply tokens"
        return f"context full ({used}): /undo or /reset to make room"

    def status(self) -> str:
        return terminal_safe(f"{self.adapter.name} ({self.adapter.method}) · {self.speed()}")


class ChatView:
    def __init__(self, console: Console) -> None:
        self.console = console
        self.live = console.is_terminal and not console.is_dumb_terminal

    def stream(
        self, backend: Backend, requests: list[tuple[AdapterEntry, ChatRequest]], side_by_side: bool = False
    ) -> list[Reply]:
        """Run the requests at once, drawing their text as it arrives; Ctrl-C stops them all."""
        events: queue.Queue[Event] = queue.Queue()
        replies = [Reply(entry, max_tokens=request.params.max_tokens) for entry, request in requests]
        generations: list[Generation] = []
        try:
            for slot, (_, request) in enumerate(requests):
                generations.append(backend.start(request, slot, events))
        except BaseException:  # a refused request or a Ctrl-C must not leave the others running
            for generation in generations:
                generation.cancel()
            raise
        with self._drawing(replies, side_by_side) as redraw:
            try:
                self._collect(events, replies, redraw)
            except KeyboardInterrupt:
                for generation, reply in zip(generations, replies, strict=True):
                    if not reply.finished:
                        generation.cancel()
                        reply.stop()
            redraw(final=True)
        return replies

    def _collect(self, events: queue.Queue[Event], replies: list[Reply], redraw: Callable[..., None]) -> None:
        last_drawn = 0.0
        while not all(reply.finished for reply in replies):
            try:
                event = events.get(timeout=REFRESH_S)
            except queue.Empty:
                redraw()
                continue
            replies[event.slot].apply(event)
            if isinstance(event, Delta) and time.perf_counter() - last_drawn < REFRESH_S:
                continue
            redraw()
            last_drawn = time.perf_counter()

    @contextmanager
    def _drawing(self, replies: list[Reply], side_by_side: bool) -> Iterator[Callable[..., None]]:
        if self.live:
            with Live(
                console=self.console, auto_refresh=False, vertical_overflow="visible", transient=False
            ) as live:
                yield lambda final=False: live.update(
                    render(replies, side_by_side, final, self.panels_per_row()), refresh=True
                )
        elif side_by_side:
            yield self._panels_when_final(replies)
        else:
            yield self._plain_writer(replies[0])

    def _panels_when_final(self, replies: list[Reply]) -> Callable[..., None]:
        def draw(final: bool = False) -> None:
            if final:
                self.console.print(render(replies, True, True, self.panels_per_row()))

        return draw

    def _plain_writer(self, reply: Reply) -> Callable[..., None]:
        written = 0

        def write(final: bool = False) -> None:
            nonlocal written
            shown = terminal_safe(reply.text, final=final)
            self.console.file.write(shown[written:])
            written = len(shown)
            if final:
                self.console.file.write("\n")
            self.console.file.flush()

        return write

    def panels_per_row(self) -> int:
        return max(1, self.console.width // PANEL_WIDTH)

    def status(self, reply: Reply) -> None:
        self.console.print(Text(reply.status(), style="dim"))

    def error(self, err: UserError) -> None:
        self.console.print(Text(terminal_safe(f"error: {err}"), style="red"))

    def note(self, text: str) -> None:
        self.console.print(Text(terminal_safe(text), style="dim"))

    def show(self, renderable: RenderableType) -> None:
        self.console.print(renderable)


def render(replies: list[Reply], side_by_side: bool, final: bool, per_row: int = 1) -> RenderableType:
    """The reply as text while it streams and as Markdown once final; ``/compare`` as rows of panels."""

    def body(reply: Reply) -> RenderableType:
        if reply.error is not None:
            # A lone reply's error is raised to the caller, which prints it once.
            return Text(terminal_safe(f"error: {reply.error}"), style="red") if side_by_side else Text("")
        text = terminal_safe(reply.text, final=final)
        # No hyperlinks: a link's target would be hidden from the reader (an OSC 8 escape).
        return Markdown(text, hyperlinks=False) if final else Text(text)

    if not side_by_side:
        return body(replies[0])
    panels: list[RenderableType] = [
        Panel(
            body(reply),
            title=Text(terminal_safe(f"{reply.adapter.name} ({reply.adapter.method})")),
            subtitle=reply.speed() if reply.finished else None,
        )
        for reply in replies
    ]
    columns = min(per_row, len(panels))
    grid = Table.grid(expand=True, padding=(0, 1))
    for _ in range(columns):
        grid.add_column(ratio=1)
    for start in range(0, len(panels), columns):
        row = panels[start : start + columns]
        grid.add_row(*row, *[""] * (columns - len(row)))
    return grid
