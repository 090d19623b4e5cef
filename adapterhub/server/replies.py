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

from adapterhub.runtime.api import GenerationResult, TokenLogprob
from adapterhub.runtime.vocabulary import Vocabulary
from adapterhub.server.bridge import Finished, Generations, TextDelta
from adapterhub.server.errors import error_body, internal_error_message, request_error_status
from adapterhub.server.logprobs import CompletionLogprobs, chat_logprobs
from adapterhub.server.metrics import ServerMetrics
from adapterhub.server.tools import ToolCallStream, ToolPlan

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
    """Builds the OpenAI response bodies of one request and records its tokens and latency.

    ``echo`` holds each prompt's text when a completion echoes its prompt; ``logprobs`` says whether
    the client asked for logprobs; ``tools`` is how a chat request may call tools (None: it may not).
    Choices are numbered prompt-major: prompt ``p``'s choice ``c`` of ``n`` is choice ``p * n + c``.
    """

    def __init__(
        self,
        model: str,
        *,
        chat: bool,
        started: float,
        metrics: ServerMetrics,
        vocabulary: Vocabulary | None = None,
        n: int = 1,
        echo: list[str] | None = None,
        logprobs: bool = False,
        tools: ToolPlan | None = None,
    ) -> None:
        self.model, self.chat, self.started, self.metrics = model, chat, started, metrics
        self.vocabulary, self.n, self.echo, self.logprobs, self.tools = vocabulary, n, echo, logprobs, tools
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.route = "/v1/chat/completions" if chat else "/v1/completions"
        self.saw_first_token = False
        self._offsets: dict[int, CompletionLogprobs] = {}

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

    # -- streamed --------------------------------------------------------------------------------

    def chunk(
        self,
        index: int,
        text: str,
        *,
        finish_reason: str | None = None,
        role: bool = False,
        logprobs: list[TokenLogprob] | None = None,
        tool_calls: list[dict] | None = None,
    ) -> dict:
        if self.chat:
            delta: dict = {"role": "assistant", "content": ""} if role else {}
            if text:
                delta["content"] = text
            if tool_calls:
                delta["tool_calls"] = tool_calls
            choice = {"index": index, "delta": delta, "finish_reason": finish_reason, "logprobs": None}
            if logprobs and self.logprobs:
                choice["logprobs"] = {"content": chat_logprobs(self._vocabulary(), logprobs), "refusal": None}
        else:
            choice = {"index": index, "text": text, "finish_reason": finish_reason, "logprobs": None}
            if logprobs and self.logprobs:
                ids = [entry.token_id for entry in logprobs]
                choice["logprobs"] = self._completion_logprobs(index).render(ids, logprobs)
        return self._envelope([choice], stream=True)

    def echo_chunk(self, index: int, prompt_ids: list[int], prompt_logprobs: list | None) -> dict | None:
        """A streamed completion's first chunk when it echoes its prompt: the prompt and its logprobs."""
        if self.echo is None:
            return None
        choice = {"index": index, "text": self.echo[index // self.n], "finish_reason": None, "logprobs": None}
        if self.logprobs and prompt_logprobs is not None:
            choice["logprobs"] = self._completion_logprobs(index).render(prompt_ids, prompt_logprobs)
        return self._envelope([choice], stream=True)

    def usage_chunk(self, results: list[GenerationResult]) -> dict:
        return {**self._envelope([], stream=True), "usage": usage_counts(results)}

    # -- whole -----------------------------------------------------------------------------------

    def full(self, results: list[GenerationResult]) -> dict:
        build = self._chat_choice if self.chat else self._completion_choice
        choices = [build(index, result) for index, result in enumerate(results)]
        return {**self._envelope(choices, stream=False), "usage": usage_counts(results)}

    def _completion_choice(self, index: int, result: GenerationResult) -> dict:
        text, ids, entries = result.text, list(result.token_ids), list(result.logprobs or [])
        if self.echo is not None:
            text = self.echo[index // self.n] + text
            ids = result.prompt_token_ids + ids
            prompt_entries = result.prompt_logprobs or [None] * len(result.prompt_token_ids)
            entries = list(prompt_entries) + entries
        logprobs = CompletionLogprobs(self._vocabulary()).render(ids, entries) if self.logprobs else None
        return {"index": index, "text": text, "finish_reason": result.finish_reason, "logprobs": logprobs}

    def _chat_choice(self, index: int, result: GenerationResult) -> dict:
        message: dict = {"role": "assistant", "content": result.text}
        finish_reason = result.finish_reason
        if self.tools is not None:
            content, calls = self.tools.format.parse(result.text)
            message["content"] = content
            if calls:
                message["tool_calls"] = [call.as_openai() for call in calls]
                finish_reason = "stop" if self.tools.named else "tool_calls"
        logprobs = None
        if self.logprobs:
            content_logprobs = chat_logprobs(self._vocabulary(), result.logprobs or [])
            logprobs = {"content": content_logprobs, "refusal": None}
        return {"index": index, "message": message, "finish_reason": finish_reason, "logprobs": logprobs}

    def _completion_logprobs(self, index: int) -> CompletionLogprobs:
        if index not in self._offsets:
            self._offsets[index] = CompletionLogprobs(self._vocabulary())
        return self._offsets[index]

    def _vocabulary(self) -> Vocabulary:
        assert self.vocabulary is not None, "logprobs need the engine's vocabulary"
        return self.vocabulary

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
    """SSE events: text deltas per choice (with their tokens' logprobs), tool calls once a choice's
    generation has ended, each choice's finish, optional usage, then ``[DONE]``.

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
    sent = [""] * count  # generated text that events carried, per choice
    pending: list[list[TokenLogprob]] = [[] for _ in range(count)]  # logprobs whose text is held back
    begun = [False] * count
    tool_streams = [None if reply.tools is None else ToolCallStream(reply.tools) for _ in range(count)]
    if reply.chat:
        for index in range(count):
            yield sse(reply.chunk(index, "", role=True))
    async for event in generations.events_until_finished():
        index = event.index
        failed = isinstance(event, Finished) and event.error is not None
        if not begun[index] and not failed:
            begun[index] = True
            echoed = reply.echo_chunk(index, *generations.prompt_of(index))
            if echoed is not None:
                yield sse(echoed)
        if isinstance(event, TextDelta):
            reply.first_token(generations.first_token_at)
            if event.logprob is not None:
                pending[index].append(event.logprob)
            sent[index] += event.text
            stream = tool_streams[index]
            text = event.text if stream is None else stream.feed(event.text)
            if text:  # the engine holds text back (a partial character, a possible stop string)
                yield sse(reply.chunk(index, text, logprobs=pending[index]))
                pending[index] = []
        elif event.error is not None or event.result.finish_reason == "cancelled":
            generations.cancel()
            err = event.error or generations.cancelled_error()
            yield sse(error_body(request_error_status(err), str(err), err.code))
            yield "data: [DONE]\n\n"
            return
        else:
            result = reply.finished(event)
            results.append(result)
            stream = tool_streams[index]
            finish_reason, calls = result.finish_reason, []
            if stream is not None:
                rest, calls = stream.finish(result.text)
                if calls:
                    finish_reason = "stop" if stream.plan.named else "tool_calls"
            else:
                already = sent[index]
                # Deltas add up to the text by contract; this covers a last callback that lost the race.
                rest = result.text[len(already) :] if result.text.startswith(already) else ""
            if rest or pending[index]:
                yield sse(reply.chunk(index, rest, logprobs=pending[index]))
            if calls:
                tool_calls = [call.as_openai(position) for position, call in enumerate(calls)]
                yield sse(reply.chunk(index, "", tool_calls=tool_calls))
            yield sse(reply.chunk(index, "", finish_reason=finish_reason))
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
