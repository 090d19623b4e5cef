"""Bridges engine requests (threads, callbacks) to asyncio: one event queue per HTTP request.

The engine calls ``on_token`` from its loop thread; a waiter thread per generation blocks on
``handle.result()``. Both hand events to the event loop, so a route handler just awaits them.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

from adapterhub.runtime.api import (
    GenerationRequest,
    GenerationResult,
    RequestError,
    SamplingParams,
    TokenLogprob,
)
from adapterhub.server.errors import internal_error_message

if TYPE_CHECKING:
    from adapterhub.runtime.engine import Engine


@dataclass
class TextDelta:
    index: int
    text: str
    logprob: TokenLogprob | None = None  # the token's, when the request asked for logprobs


@dataclass
class Finished:
    index: int
    result: GenerationResult | None
    error: RequestError | None


class Generations:
    """The engine requests behind one HTTP request (several prompts and/or ``n`` choices).

    Engine-side callbacks queue events and wake the event loop at most once per batch of them,
    so a fast decode loop does not pay one cross-thread wakeup per token. Text deltas are only
    queued when ``stream`` is set; otherwise only ``first_token_at`` is noted.
    """

    def __init__(self, engine: Engine, *, stream: bool) -> None:
        self.engine = engine
        self.stream = stream
        self.loop = asyncio.get_running_loop()
        self.handles: list[Any] = []
        self.first_token_at: float | None = None  # perf_counter() when any generation made a token
        self._pending: deque[TextDelta | Finished] = deque()
        self._lock = threading.Lock()
        self._wakeup_scheduled = False
        self._ready = asyncio.Event()
        self.cancel_reason: str | None = None  # why the server cancelled them, told to the client
        self.told_cancelled = False  # the client heard "cancelled" rather than an answer

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

    def cancel(self, reason: str | None = None) -> None:
        self.cancel_reason = self.cancel_reason or reason
        for handle in self.handles:
            if not handle.done:
                handle.cancel()

    def cancelled_error(self) -> RequestError:
        """What a client hears about a generation that ended cancelled, since OpenAI has no such end."""
        self.told_cancelled = True
        return RequestError(self.cancel_reason or "the request was cancelled: retry it", "cancelled")

    async def events_until_finished(self) -> AsyncIterator[TextDelta | Finished]:
        """Every event in order; text arriving after its generation finished is dropped."""
        unfinished = set(range(len(self.handles)))
        while unfinished:
            await self._ready.wait()
            self._ready.clear()
            with self._lock:
                batch = list(self._pending)
                self._pending.clear()
                self._wakeup_scheduled = False
            for event in batch:
                if event.index not in unfinished:
                    continue
                if isinstance(event, Finished):
                    unfinished.discard(event.index)
                yield event

    def prompt_of(self, index: int) -> tuple[list[int], list | None]:
        """Generation ``index``'s prompt token ids and, when it asked for them, their logprobs
        (known once its prefill ran, so before any of its events)."""
        handle = self.handles[index]
        return list(getattr(handle, "prompt_ids", [])), getattr(handle, "prompt_logprobs", None)

    def _on_token(self, index: int, token_id: int, text: str, logprob: TokenLogprob | None = None) -> None:
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        if self.stream:
            self._post(TextDelta(index, text, logprob))

    def _wait(self, index: int, handle: Any) -> None:
        try:
            finished = Finished(index, handle.result(), None)
        except RequestError as err:
            finished = Finished(index, None, err)
        except Exception as err:  # a failed forward (a bug): the client must hear of it, not wait forever
            finished = Finished(index, None, RequestError(internal_error_message(err), "internal_error"))
        self._post(finished)

    def _post(self, event: TextDelta | Finished) -> None:
        with self._lock:
            self._pending.append(event)
            if self._wakeup_scheduled:
                return
            self._wakeup_scheduled = True
        # A RuntimeError means the event loop is gone (server shut down): nobody is left to tell.
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(self._ready.set)
