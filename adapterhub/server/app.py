"""The OpenAI-compatible HTTP front end over one ``Engine``: ``create_app(engine, ...)``.

The app never starts or stops the engine: whoever runs it owns the engine's lifetime
(``adapterhub serve`` starts it before uvicorn and stops it after uvicorn's graceful shutdown).
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Annotated, Any

import anyio
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from adapterhub.errors import UserError
from adapterhub.runtime.api import AdapterInfo, GenerationResult, RequestError, SamplingParams
from adapterhub.server.bridge import Finished, Generations, TextDelta
from adapterhub.server.metrics import ServerMetrics
from adapterhub.server.schemas import (
    AdapterLoadRequest,
    ChatCompletionRequest,
    CompletionRequest,
    ErrorBody,
    SamplingFields,
)

if TYPE_CHECKING:
    from adapterhub.runtime.engine import Engine

DEFAULT_MAX_QUEUE = 256
DEFAULT_MAX_TOKENS_CAP = 2048
DEFAULT_MAX_BODY_BYTES = 1 << 20
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions

REQUEST_ERROR_STATUS = {
    "unknown_adapter": 404,
    "prompt_too_long": 400,
    "bad_request": 400,
    "incompatible_adapter": 400,
    "unsupported_adapter": 400,
    "corrupt_adapter": 400,
    "slot_capacity": 503,
    "cancelled": 503,
    "overloaded": 429,
}
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    409: "invalid_request_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
}
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody} for status in (400, 401, 404, 409, 413, 422, 429, 503)
}


# Module level: FastAPI resolves postponed annotations in the module's namespace, not a closure's.
BearerCredentials = Annotated[HTTPAuthorizationCredentials | None, Depends(HTTPBearer(auto_error=False))]


class ApiError(Exception):
    """An error answered with an OpenAI-style body; ``code`` is machine-readable."""

    def __init__(self, status: int, message: str, code: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param


def error_body(status: int, message: str, code: str | None, param: str | None = None) -> dict[str, Any]:
    error_type = ERROR_TYPES.get(status, "server_error")
    return {"error": {"message": message, "type": error_type, "code": code, "param": param}}


def error_response(status: int, message: str, code: str | None, param: str | None = None) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return JSONResponse(error_body(status, message, code, param), status_code=status, headers=headers)


def request_error_status(err: RequestError) -> int:
    return REQUEST_ERROR_STATUS.get(err.code, 500)


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


class BodySizeLimit:
    """Answers 413 to a body over ``max_bytes`` before any route parses it."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(scope, receive, send)
            return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                break
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                await self._refuse(scope, receive, send)
                return
            if not message.get("more_body", False):
                break
        replay: list[Message] = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

        async def replaying_receive() -> Message:
            return replay.pop() if replay else await receive()

        await self.app(scope, replaying_receive, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        message = f"request body is over this server's limit of {self.max_bytes} bytes: send a smaller body"
        await error_response(413, message, "body_too_large")(scope, receive, send)


class RecordRequests:
    """Counts every response by route and status and times it to its last body byte."""

    def __init__(self, app: ASGIApp, metrics: ServerMetrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = [500]

        async def recording_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, recording_send)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            self.metrics.requests.labels(route, str(status[0])).inc()
            self.metrics.latency.labels(route).observe(time.perf_counter() - started)


def create_app(
    engine: Engine,
    *,
    api_key: str | None = None,
    max_queue: int = DEFAULT_MAX_QUEUE,
    max_tokens_cap: int = DEFAULT_MAX_TOKENS_CAP,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
) -> FastAPI:
    """The FastAPI app serving ``engine`` (already started by the caller) over the OpenAI API.

    ``max_queue`` bounds generations in flight (429 beyond), ``max_tokens_cap`` the tokens one
    completion may ask for (400 beyond), ``max_body_bytes`` the request body (413 beyond).
    """
    server = _Server(engine, max_queue=max_queue, max_tokens_cap=max_tokens_cap)
    app = FastAPI(title="adapterhub", summary="OpenAI-compatible multi-adapter server", version="1")
    app.state.server = server
    app.state.metrics = server.metrics

    _add_error_handlers(app)
    _add_v1_routes(app, server, api_key)

    @app.get("/health")
    def health() -> dict[str, Any]:
        return {"status": "ok", "base": engine.base_name, "adapters": len(engine.list())}

    @app.get("/metrics", response_class=Response)
    def metrics() -> Response:
        return Response(generate_latest(server.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    app.add_middleware(RecordRequests, metrics=server.metrics)
    app.add_middleware(BodySizeLimit, max_bytes=max_body_bytes)
    return app


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, err: ApiError) -> JSONResponse:
        return error_response(err.status, err.message, err.code, err.param)

    @app.exception_handler(RequestError)
    async def request_error(request: Request, err: RequestError) -> JSONResponse:
        return error_response(request_error_status(err), str(err), err.code)

    @app.exception_handler(UserError)
    async def user_error(request: Request, err: UserError) -> JSONResponse:
        return error_response(400, str(err), "invalid_request")

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, err: RequestValidationError) -> JSONResponse:
        first = err.errors()[0]
        param = ".".join(str(part) for part in first["loc"] if part != "body")
        message = f"{param or 'body'}: {first['msg']}"
        more = len(err.errors()) - 1
        if more:
            message += f" (and {more} more problem{'s' if more > 1 else ''})"
        return error_response(422, message, "invalid_value", param or None)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        return error_response(err.status_code, str(err.detail), None)


def _add_v1_routes(app: FastAPI, server: _Server, api_key: str | None) -> None:
    def check_key(credentials: BearerCredentials) -> None:
        if api_key is None:
            return
        given = credentials.credentials if credentials is not None else ""
        if not secrets.compare_digest(given.encode(), api_key.encode()):
            message = "missing or wrong API key: send the header 'Authorization: Bearer <key>'"
            raise ApiError(401, message, "invalid_api_key")

    # Routes go on the app itself (no sub-router) so that metrics see their full path templates.
    guarded = {"dependencies": [Depends(check_key)], "responses": ERROR_RESPONSES}
    app.add_api_route("/v1/models", server.list_models, methods=["GET"], **guarded)
    app.add_api_route("/v1/models/{model:path}", server.get_model, methods=["GET"], **guarded)
    app.add_api_route("/v1/completions", server.completions, methods=["POST"], **guarded)
    app.add_api_route("/v1/chat/completions", server.chat_completions, methods=["POST"], **guarded)
    app.add_api_route("/v1/adapters", server.load_adapter, methods=["POST"], status_code=201, **guarded)
    app.add_api_route("/v1/adapters/{name:path}", server.unload_adapter, methods=["DELETE"], **guarded)


class _Server:
    """The routes' state: the engine, the limits, the metrics and the generations in flight."""

    def __init__(self, engine: Engine, *, max_queue: int, max_tokens_cap: int) -> None:
        self.engine = engine
        self.max_queue = max_queue
        self.max_tokens_cap = max_tokens_cap
        self.metrics = ServerMetrics(engine)
        self.in_flight = 0
        self.created = int(time.time())

    async def list_models(self) -> dict[str, Any]:
        adapters = [self._adapter_card(info) for info in self.engine.list()]
        return {"object": "list", "data": [self._base_card(), *adapters]}

    async def get_model(self, model: str) -> dict[str, Any]:
        if model == self.engine.base_name:
            return self._base_card()
        return self._adapter_card(self._find_adapter(model))

    async def load_adapter(self, body: AdapterLoadRequest) -> dict[str, Any]:
        if body.name == self.engine.base_name or any(a.name == body.name for a in self.engine.list()):
            message = (
                f"model '{body.name}' is already served: DELETE /v1/adapters/{body.name} or pick another name"
            )
            raise ApiError(409, message, "adapter_exists", "name")
        try:
            info = await anyio.to_thread.run_sync(self.engine.register, body.name, body.source)
        except RequestError as err:
            if err.code != "unknown_adapter":
                raise
            # The engine cannot find the source; the route exists, so this is a bad input, not a 404.
            raise ApiError(400, str(err), "bad_adapter_source", "source") from err
        return self._adapter_card(info)

    async def unload_adapter(self, name: str) -> dict[str, Any]:
        self._find_adapter(name)
        await anyio.to_thread.run_sync(self.engine.unregister, name)
        return {"id": name, "object": "model", "deleted": True}

    async def completions(self, body: CompletionRequest, request: Request) -> Response:
        _refuse_unsupported(body)
        params = self._sampling_params(body, body.max_tokens, COMPLETIONS_DEFAULT_MAX_TOKENS)
        return await self._respond(request, body, _prompts(body.prompt), params, chat=False)

    async def chat_completions(self, body: ChatCompletionRequest, request: Request) -> Response:
        _refuse_unsupported(body)
        max_tokens = body.max_completion_tokens or body.max_tokens
        params = self._sampling_params(body, max_tokens, self.max_tokens_cap)
        return await self._respond(request, body, [self._chat_prompt(body)], params, chat=True)

    def _sampling_params(self, body: SamplingFields, max_tokens: int | None, default: int) -> SamplingParams:
        max_tokens = max_tokens or default
        if max_tokens > self.max_tokens_cap:
            raise ApiError(
                400,
                f"max_tokens {max_tokens} is above this server's cap of {self.max_tokens_cap}: "
                f"ask for at most {self.max_tokens_cap}",
                "max_tokens_too_large",
                "max_tokens",
            )
        stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=body.temperature,
            top_p=body.top_p,
            seed=body.seed,
            stop=stop,
        )

    def _chat_prompt(self, body: ChatCompletionRequest) -> list[int]:
        tokenizer = self.engine.tokenizer
        if not getattr(tokenizer, "chat_template", None):
            raise ApiError(
                400,
                f"base model '{self.engine.base_name}' has no chat template: use /v1/completions",
                "no_chat_template",
            )
        messages = [{"role": m.role, "content": _message_text(m.content)} for m in body.messages]
        try:
            encoded = tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=True, return_dict=True
            )
        except Exception as err:  # the template itself raises on conversations it does not accept
            message = f"messages rejected by the chat template: {err}"
            raise ApiError(400, message, "bad_messages", "messages") from err
        return list(encoded["input_ids"])

    async def _respond(
        self,
        request: Request,
        body: SamplingFields,
        prompts: list[str | list[int]],
        params: SamplingParams,
        *,
        chat: bool,
    ) -> Response:
        count = len(prompts) * body.n
        if self.in_flight + count > self.max_queue:
            message = f"server queue is full ({self.max_queue} generations in flight): retry shortly"
            raise ApiError(429, message, "overloaded")
        adapter = None if body.model == self.engine.base_name else body.model
        generations = Generations(self.engine)
        for prompt in prompts:
            for choice in range(body.n):
                seed = None if params.seed is None else params.seed + choice
                generations.submit(prompt, adapter, replace(params, seed=seed))
        reply = _Reply(body.model, chat=chat, started=time.perf_counter(), metrics=self.metrics)
        self._track(count)
        if body.stream:
            usage = body.stream_options is not None and body.stream_options.include_usage

            def close() -> None:
                generations.cancel()
                self._track(-count)

            return GenerationStream(_stream(generations, reply, count, usage=usage), close)
        try:
            results = await _collect_cancelling_on_disconnect(request, generations, reply)
        finally:
            self._track(-count)
        return JSONResponse(reply.full(results))

    def _track(self, delta: int) -> None:
        self.in_flight += delta
        self.metrics.in_flight.set(self.in_flight)

    def _find_adapter(self, name: str) -> AdapterInfo:
        for info in self.engine.list():
            if info.name == name:
                return info
        raise ApiError(404, f"model '{name}' is not served: GET /v1/models lists what is", "model_not_found")

    def _base_card(self) -> dict[str, Any]:
        base = self.engine.base_name
        return self._card(base, root=base, parent=None, metadata={"kind": "base"})

    def _adapter_card(self, info: AdapterInfo) -> dict[str, Any]:
        metadata = {
            "kind": "adapter",
            "method": info.method,
            "source": info.source,
            "base_model": info.base_model,
            "rank": info.rank,
            "num_virtual_tokens": info.num_virtual_tokens,
        }
        return self._card(info.name, root=info.source, parent=self.engine.base_name, metadata=metadata)

    def _card(self, model_id: str, *, root: str, parent: str | None, metadata: dict) -> dict[str, Any]:
        return {
            "id": model_id,
            "object": "model",
            "created": self.created,
            "owned_by": "adapterhub",
            "root": root,
            "parent": parent,
            "metadata": metadata,
        }


class _Reply:
    """Builds the OpenAI response bodies of one request and records its tokens and latency."""

    def __init__(self, model: str, *, chat: bool, started: float, metrics: ServerMetrics) -> None:
        self.model, self.chat, self.started, self.metrics = model, chat, started, metrics
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.route = "/v1/chat/completions" if chat else "/v1/completions"
        self.saw_first_token = False

    def first_token(self) -> None:
        if not self.saw_first_token:
            self.saw_first_token = True
            self.metrics.first_token.labels(self.route).observe(time.perf_counter() - self.started)

    def finished(self, event: Finished) -> GenerationResult:
        result = event.result
        assert result is not None
        self.metrics.prompt_tokens.labels(self.model).inc(result.prompt_tokens)
        self.metrics.completion_tokens.labels(self.model).inc(result.completion_tokens)
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
        return {**self._envelope([], stream=True), "usage": _usage(results)}

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
        return {**self._envelope(choices, stream=False), "usage": _usage(results)}

    def _envelope(self, choices: list[dict], *, stream: bool) -> dict:
        kind = "chat.completion" if self.chat else "text_completion"
        return {
            "id": self.id,
            "object": f"{kind}.chunk" if stream and self.chat else kind,
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }


async def _stream(generations: Generations, reply: _Reply, count: int, *, usage: bool) -> AsyncIterator[str]:
    """SSE events: text deltas per choice, each choice's finish, optional usage, then ``[DONE]``."""
    results: list[GenerationResult] = []
    sent = [""] * count
    if reply.chat:
        for index in range(count):
            yield _sse(reply.chunk(index, "", role=True))
    async for event in generations.events_until_finished():
        if isinstance(event, TextDelta):
            reply.first_token()
            sent[event.index] += event.text
            yield _sse(reply.chunk(event.index, event.text))
        elif event.error is not None:
            generations.cancel()
            err = event.error
            yield _sse(error_body(request_error_status(err), str(err), err.code))
            yield "data: [DONE]\n\n"
            return
        else:
            result = reply.finished(event)
            results.append(result)
            already = sent[event.index]
            if len(result.text) > len(already) and result.text.startswith(already):
                # Deltas add up to the text by contract; this covers a last callback that lost the race.
                yield _sse(reply.chunk(event.index, result.text[len(already) :]))
            yield _sse(reply.chunk(event.index, "", finish_reason=result.finish_reason))
    if usage:
        yield _sse(reply.usage_chunk(results))
    yield "data: [DONE]\n\n"


async def _collect_cancelling_on_disconnect(
    request: Request, generations: Generations, reply: _Reply
) -> list[GenerationResult]:
    """All results in submission order; a client that hangs up cancels its generations."""
    watcher = asyncio.create_task(_cancel_on_disconnect(request, generations))
    results: dict[int, GenerationResult] = {}
    try:
        async for event in generations.events_until_finished():
            if isinstance(event, TextDelta):
                reply.first_token()
            elif event.error is not None:
                generations.cancel()
                raise event.error
            else:
                results[event.index] = reply.finished(event)
    finally:
        watcher.cancel()
    return [results[i] for i in sorted(results)]


async def _cancel_on_disconnect(request: Request, generations: Generations) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass
    generations.cancel()


def _refuse_unsupported(body: SamplingFields) -> None:
    for name in body.unsupported_fields():
        raise ApiError(400, f"'{name}' is not supported by this server: leave it out", "unsupported", name)


def _prompts(prompt: str | list[str] | list[int] | list[list[int]]) -> list[str | list[int]]:
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise ApiError(400, "prompt is an empty list: send a string or token ids", "invalid_value", "prompt")
    if all(isinstance(item, int) for item in prompt):
        return [list(prompt)]  # type: ignore[arg-type]
    return list(prompt)  # type: ignore[arg-type]


def _message_text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(part.text for part in content)


def _usage(results: list[GenerationResult]) -> dict[str, int]:
    prompt = sum(r.prompt_tokens for r in results)
    completion = sum(r.completion_tokens for r in results)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload)}\n\n"
