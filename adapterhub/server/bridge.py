"""Bridges engine requests (threads, callbacks) to asyncio: one event queue per HTTP request.

The engine calls ``on_token`` from its loop thread; a waiter thread per generation blocks on
``handle.result()``. Both post onto the event loop, so a route handler just awaits events.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

from adapterhub.runtime.api import GenerationRequest, GenerationResult, RequestError, SamplingParams

if TYPE_CHECKING:
    from adapterhub.runtime.engine import Engine


@dataclass
class TextDelta:
    index: int
    text: str


@dataclass
class Finished:
    index: int
    result: GenerationResult | None
    error: RequestError | None


class Generations:
    """The engine requests behind one HTTP request (several prompts and/or ``n`` choices)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.loop = asyncio.get_running_loop()
        self.events: asyncio.Queue[TextDelta | Finished] = asyncio.Queue()
        self.handles: list[Any] = []

    def submit(self, prompt: str | list[int], adapter: str | None, params: SamplingParams) -> None:
        """Submit one more generation; if the engine refuses (``RequestError``) the others are cancelled."""
        index = len(self.handles)
        on_token = partial(self._on_token, index)
        request = GenerationRequest(prompt, adapter=adapter, params=params, on_token=on_token)
        try:
            handle = self.engine.submit(request)
        except RequestError:
            self.cancel()
            raise
        self.handles.append(handle)
        threading.Thread(target=self._wait, args=(index, handle), daemon=True, name="adapterhub-wait").start()

    def cancel(self) -> None:
        for handle in self.handles:
            if not handle.done:
                handle.cancel()

    async def events_until_finished(self) -> AsyncIterator[TextDelta | Finished]:
        """Every event in order; text arriving after its generation finished is dropped."""
        pending = set(range(len(self.handles)))
        while pending:
            event = await self.events.get()
            if event.index not in pending:
                continue
            if isinstance(event, Finished):
                pending.discard(event.index)
            yield event

    def _on_token(self, index: int, token_id: int, text: str) -> None:
        self._post(TextDelta(index, text))

    def _wait(self, index: int, handle: Any) -> None:
        try:
            finished = Finished(index, handle.result(), None)
        except RequestError as err:
            finished = Finished(index, None, err)
        self._post(finished)

    def _post(self, event: TextDelta | Finished) -> None:
        # A RuntimeError means the event loop is gone (server shut down): nobody is left to tell.
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
