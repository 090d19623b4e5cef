"""OpenAI response bodies of one request: whole, or streamed as server-sent events ending in ``[DONE]``."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable

from fastapi import Request
from fastapi.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from adapterhub.runtime.api import GenerationResult
from adapterhub.server.bridge import Finished, Generations, TextDelta
from adapterhub.server.errors import error_body, internal_error_message, request_error_status
from adapterhub.server.metrics import ServerMetrics

logger = logging.getLogger("adapterhub.server")


class GenerationStream(StreamingResponse):
    """An SSE response that runs ``on_close`` however it ends, even if its body never started."""

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], None]) -> None:
        super().__init__(content, media_type="text/event-stream")
        self.on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


class Reply:
    """Builds the OpenAI response bodies of one request and records its tokens and latency."""

    def __init__(self, model: str, *, chat: bool, started: float, metrics: ServerMetrics) -> None:
        self.model, self.chat, self.started, self.metrics = model, chat, started, metrics
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.route = "/v1/chat/completions" if chat else "/v1/completions"
        self.saw_first_token = False

    def first_token(self, at: float | None) -> None:
        """Record time to first token once, given the ``perf_counter()`` it arrived at."""
        if at is not None and not self.saw_first_token:
            self.saw_first_token = True
            self.metrics.first_token.labels(self.route).observe(at - self.started)

    def finished(self, event: Finished) -> GenerationResult:
        result = event.result
        assert result is not None
        self.metrics.count_tokens(self.model, result.prompt_tokens, result.completion_tokens)
        return result

    def chunk(self, index: int, text: str, *, finish_reason: str | None = None, role: bool = False) -> dict:
        if self.chat:
            delta: dict[str, str] = {"role": "assistant", "content": ""} if role else {}
            if text:
                delta["content"] = text
            choice = {"index": index, "delta": delta, "finish_reason": finish_reason, "logprobs": None}
        else:
            choice = {"index": index, "text": text, "finish_reason": finish_reason, "logprobs": None}
        return self._envelope([choice], stream=True)

    def usage_chunk(self, results: list[GenerationResult]) -> dict:
        return {**self._envelope([], stream=True), "usage": usage_counts(results)}

    def full(self, results: list[GenerationResult]) -> dict:
        if self.chat:
            choices = [
                {
                    "index": i,
                    "message": {"role": "assistant", "content": r.text},
                    "finish_reason": r.finish_reason,
                    "logprobs": None,
                }
                for i, r in enumerate(results)
            ]
        else:
            choices = [
                {"index": i, "text": r.text, "finish_reason": r.finish_reason, "logprobs": None}
                for i, r in enumerate(results)
            ]
        return {**self._envelope(choices, stream=False), "usage": usage_counts(results)}

    def _envelope(self, choices: list[dict], *, stream: bool) -> dict:
        kind = "chat.completion" if self.chat else "text_completion"
        return {
            "id": self.id,
            "object": f"{kind}.chunk" if stream and self.chat else kind,
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }


async def sse_events(generations: Generations, reply: Reply, *, usage: bool) -> AsyncIterator[str]:
    """SSE events: text deltas per choice, each choice's finish, optional usage, then ``[DONE]``.

    A failure, a cancelled generation or a bug ends the stream with an error event, then ``[DONE]``.
    """
    try:
        async for event in _sse_events(generations, reply, usage=usage):
            yield event
    except Exception as err:  # a bug: the client still gets an error event, the log the traceback
        logger.exception("a streamed reply failed")
        generations.cancel()
        yield sse(error_body(500, internal_error_message(err), "internal_error"))
        yield "data: [DONE]\n\n"


async def _sse_events(generations: Generations, reply: Reply, *, usage: bool) -> AsyncIterator[str]:
    results: list[GenerationResult] = []
    count = len(generations.handles)
    sent = [""] * count
    if reply.chat:
        for index in range(count):
            yield sse(reply.chunk(index, "", role=True))
    async for event in generations.events_until_finished():
        if isinstance(event, TextDelta):
            reply.first_token(generations.first_token_at)
            if event.text:  # the engine holds text back (a partial character, a possible stop string)
                sent[event.index] += event.text
                yield sse(reply.chunk(event.index, event.text))
        elif event.error is not None or event.result.finish_reason == "cancelled":
            generations.cancel()
            err = event.error or generations.cancelled_error()
            yield sse(error_body(request_error_status(err), str(err), err.code))
            yield "data: [DONE]\n\n"
            return
        else:
            result = reply.finished(event)
            results.append(result)
            already = sent[event.index]
            if len(result.text) > len(already) and result.text.startswith(already):
                # Deltas add up to the text by contract; this covers a last callback that lost the race.
                yield sse(reply.chunk(event.index, result.text[len(already) :]))
            yield sse(reply.chunk(event.index, "", finish_reason=result.finish_reason))
    if usage:
        yield sse(reply.usage_chunk(results))
    yield "data: [DONE]\n\n"


async def collect_cancelling_on_disconnect(
    request: Request, generations: Generations, reply: Reply
) -> list[GenerationResult]:
    """All results in submission order; a client that hangs up cancels its generations.

    ``generations`` must not stream, so its only events are ``Finished``.
    """
    watcher = asyncio.create_task(cancel_on_disconnect(request, generations))
    results: dict[int, GenerationResult] = {}
    try:
        async for event in generations.events_until_finished():
            assert isinstance(event, Finished)
            if event.error is not None or event.result.finish_reason == "cancelled":
                generations.cancel()
                raise event.error or generations.cancelled_error()
            results[event.index] = reply.finished(event)
        reply.first_token(generations.first_token_at)
    finally:
        watcher.cancel()
    return [results[i] for i in sorted(results)]


async def cancel_on_disconnect(request: Request, generations: Generations) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass
    generations.cancel()


def usage_counts(results: list[GenerationResult]) -> dict[str, int]:
    prompt = sum(r.prompt_tokens for r in results)
    completion = sum(r.completion_tokens for r in results)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def sse(payload: dict) -> str:
    return f"data: {json.dumps(payload)}\n\n"
