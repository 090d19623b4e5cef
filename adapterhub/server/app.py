"""The OpenAI-compatible HTTP front end over one ``Engine``: ``create_app(engine, ...)``.

The app never starts or stops the engine: whoever runs it owns the engine's lifetime
(``adapterhub serve`` starts it before uvicorn and stops it after uvicorn's graceful shutdown).
"""

from __future__ import annotations

import asyncio
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from functools import partial
from typing import TYPE_CHECKING, Annotated, Any

import anyio
from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from adapterhub import __version__
from adapterhub.errors import UserError
from adapterhub.hub.transfer import PullCancelled
from adapterhub.runtime.api import AdapterInfo, RequestError, SamplingParams
from adapterhub.server.bridge import Generations
from adapterhub.server.defaults import (
    DEFAULT_MAX_BODY_BYTES,
    DEFAULT_MAX_QUEUE,
    DEFAULT_MAX_TOKENS_CAP,
    DEFAULT_READ_TIMEOUT_S,
)
from adapterhub.server.errors import ERROR_RESPONSES, ApiError, add_error_handlers
from adapterhub.server.http_server import SHUTDOWN_MESSAGE, Drain
from adapterhub.server.loading_policy import LoadingPolicy
from adapterhub.server.metrics import ServerMetrics
from adapterhub.server.middleware import AllowedHosts, BodySizeLimit, CatchBugs, RecordRequests
from adapterhub.server.params import output_grammar, sampling_params
from adapterhub.server.replies import GenerationStream, Reply, collect_cancelling_on_disconnect, sse_events
from adapterhub.server.schemas import (
    AdapterLoadRequest,
    Body,
    ChatCompletion,
    ChatCompletionRequest,
    ChatMessage,
    Completion,
    CompletionRequest,
    DeletedModel,
    DetokenizeRequest,
    DetokenizeResponse,
    LoraLoadRequest,
    LoraUnloadRequest,
    ModelCard,
    ModelList,
    SamplingFields,
    TokenizeRequest,
    TokenizeResponse,
)
from adapterhub.server.tools import ToolPlan, plan_tools, render

if TYPE_CHECKING:
    from adapterhub.runtime.engine import Engine

COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


# Module level: FastAPI resolves postponed annotations in the module's namespace, not a closure's.
BearerCredentials = Annotated[HTTPAuthorizationCredentials | None, Depends(HTTPBearer(auto_error=False))]


def create_app(
    engine: Engine,
    *,
    api_key: str | None = None,
    max_queue: int = DEFAULT_MAX_QUEUE,
    max_tokens_cap: int = DEFAULT_MAX_TOKENS_CAP,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    served_model_name: str | None = None,
    loading: LoadingPolicy | None = None,
    allowed_hosts: tuple[str, ...] = (),
    read_timeout_s: float = DEFAULT_READ_TIMEOUT_S,
) -> FastAPI:
    """The FastAPI app serving ``engine`` (already started by the caller) over the OpenAI API.

    ``max_queue`` bounds generations in flight (429 beyond), ``max_tokens_cap`` the tokens one
    completion may ask for (400 beyond), ``max_body_bytes`` the request body (413 beyond, 408 when it
    takes over ``read_timeout_s``). ``served_model_name`` is the base model's id for clients (default:
    ``engine.base_name``). ``loading`` says whether and from where clients may load adapters (off by
    default); ``allowed_hosts``, when given, are the only ``Host`` names answered.
    """
    server = _Server(
        engine,
        max_queue=max_queue,
        max_tokens_cap=max_tokens_cap,
        served_model_name=served_model_name,
        api_key=api_key,
        loading=loading,
    )
    app = FastAPI(title="adapterhub", summary="OpenAI-compatible multi-adapter server", version="1")
    app.state.metrics = server.metrics
    app.state.drain = server.drain  # what a shutdown has to finish or cancel (see http_server.py)

    add_error_handlers(app)
    _add_v1_routes(app, server, api_key)

    @app.get("/health")
    def health() -> dict[str, Any]:
        return {"status": "ok", "base": server.model_name, "adapters": len(engine.list())}

    @app.get("/version")
    def version() -> dict[str, str]:
        return {"version": __version__}

    @app.get("/metrics", response_class=Response)
    def metrics() -> Response:
        return Response(generate_latest(server.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    app.add_middleware(RecordRequests, metrics=server.metrics)
    app.add_middleware(BodySizeLimit, max_bytes=max_body_bytes, timeout_s=read_timeout_s)
    if allowed_hosts:
        app.add_middleware(AllowedHosts, hosts=allowed_hosts)
    app.add_middleware(CatchBugs)
    return app


def _add_v1_routes(app: FastAPI, server: _Server, api_key: str | None) -> None:
    def check_key(credentials: BearerCredentials) -> None:
        given = credentials.credentials if credentials is not None else ""
        if not secrets.compare_digest(given.encode(), (api_key or "").encode()):
            message = "missing or wrong API key: send the header 'Authorization: Bearer <key>'"
            raise ApiError(401, message, "invalid_api_key")

    # Routes go on the app itself (no sub-router) so that metrics see their full path templates.
    # Without a key the OpenAPI document must not claim Bearer auth, so the check is left out entirely.
    dependencies = [Depends(check_key)] if api_key else []
    # Loading and unloading check their own key (the admin key, if set) in the server's methods,
    # whichever route calls them; the dependency only declares Bearer auth in the OpenAPI document.
    admin_key = server.loading.admin_api_key or api_key
    admin_dependencies = [Depends(HTTPBearer(auto_error=False))] if admin_key else []

    def route(
        path: str, endpoint: Callable, method: str, model: type, *, admin: bool = False, **extra: Any
    ) -> None:
        app.add_api_route(
            path,
            endpoint,
            methods=[method],
            response_model=model,
            dependencies=admin_dependencies if admin else dependencies,
            responses={**ERROR_RESPONSES, **extra.pop("responses", {})},
            **extra,
        )

    streamed = {"responses": {200: {"content": {"text/event-stream": {"schema": {"type": "string"}}}}}}
    route("/v1/models", server.list_models, "GET", ModelList)
    route("/v1/models/{model:path}", server.get_model, "GET", ModelCard)
    route("/v1/completions", server.completions, "POST", Completion, **streamed)
    route("/v1/chat/completions", server.chat_completions, "POST", ChatCompletion, **streamed)
    route("/v1/adapters", server.load_adapter, "POST", ModelCard, admin=True, status_code=201)
    route("/v1/adapters/{name:path}", server.unload_adapter, "DELETE", DeletedModel, admin=True)
    # vLLM's names for the same operations, through the same methods (and so the same policy).
    text = {"responses": {200: {"content": {"text/plain": {"schema": {"type": "string"}}}}}}
    route("/v1/load_lora_adapter", server.load_lora_adapter, "POST", None, admin=True, **text)
    route("/v1/unload_lora_adapter", server.unload_lora_adapter, "POST", None, admin=True, **text)
    route("/tokenize", server.tokenize, "POST", TokenizeResponse)
    route("/detokenize", server.detokenize, "POST", DetokenizeResponse)
    route("/tokenizer_info", server.tokenizer_info, "GET", None)


class _Server:
    """The routes' state: the engine, the limits, the metrics and the generations in flight."""

    def __init__(
        self,
        engine: Engine,
        *,
        max_queue: int,
        max_tokens_cap: int,
        served_model_name: str | None,
        api_key: str | None,
        loading: LoadingPolicy | None,
    ) -> None:
        self.engine = engine
        self.model_name = served_model_name or engine.base_name
        # An encoder-decoder without a chat template reads conversations as plain_chat's transcript.
        self.plain_chat = engine.seq2seq
        self.max_queue = max_queue
        self.max_tokens_cap = max_tokens_cap
        self.api_key = api_key
        self.loading = loading or LoadingPolicy()
        self.metrics = ServerMetrics(engine, served=self.is_served)
        self.drain = Drain()
        self.in_flight = 0
        self.created = int(time.time())

    def is_served(self, model: str) -> bool:
        return model == self.model_name or any(info.name == model for info in self.engine.list())

    async def list_models(self) -> dict[str, Any]:
        adapters = [self._adapter_card(info) for info in self.engine.list()]
        return {"object": "list", "data": [self._base_card(), *adapters]}

    async def get_model(self, model: str) -> dict[str, Any]:
        if model == self.model_name:
            return self._base_card()
        return self._adapter_card(self._find_adapter(model))

    async def load_adapter(self, body: AdapterLoadRequest, request: Request) -> dict[str, Any]:
        """Load an adapter while serving, as far as ``self.loading`` allows (every route to it ends here)."""
        self.loading.authorize(request.headers.get("authorization"), self.api_key)
        if self.is_served(body.name):
            message = (
                f"model '{body.name}' is already served: DELETE /v1/adapters/{body.name} or pick another name"
            )
            raise ApiError(409, message, "adapter_exists", "name")
        source = self.loading.resolve(body.source)
        folder = source.folder or await self._pull(source.hub_spec, request)
        try:
            info = await anyio.to_thread.run_sync(self.engine.register, body.name, str(folder))
        except RequestError as err:
            if err.code != "unknown_adapter":
                raise
            # The engine cannot find the source; the route exists, so this is a bad input, not a 404.
            raise ApiError(400, str(err), "bad_adapter_source", "source") from err
        return self._adapter_card(info)

    async def _pull(self, spec: str, request: Request) -> str:
        """The store folder of Hub adapter ``spec``, pulled within the policy's limits if need be; a
        client that hangs up, or a shutdown past its grace, stops the pull."""
        from adapterhub.hub.resolve import from_hub

        cancel = threading.Event()
        self.drain.pulls.add(cancel)
        watcher = asyncio.create_task(_set_on_disconnect(request, cancel))
        cancelled = False
        try:
            pull = partial(from_hub, spec, limits=self.loading.pull_limits, cancel=cancel)
            return str(await anyio.to_thread.run_sync(pull))
        except PullCancelled as err:
            cancelled = True
            message = SHUTDOWN_MESSAGE if self.drain.draining else f"{err}: retry the request"
            raise ApiError(503, message, "cancelled") from err
        except UserError as err:
            raise ApiError(400, str(err), "bad_adapter_source", "source") from err
        finally:
            watcher.cancel()
            self.drain.pulls.discard(cancel)
            self.drain.ended(cancelled=cancelled)

    async def unload_adapter(self, name: str, request: Request) -> dict[str, Any]:
        self.loading.authorize(request.headers.get("authorization"), self.api_key)
        self._find_adapter(name)
        await anyio.to_thread.run_sync(self.engine.unregister, name)
        self.metrics.forget(name)
        return {"id": name, "object": "model", "deleted": True}

    async def load_lora_adapter(self, body: LoraLoadRequest, request: Request) -> PlainTextResponse:
        """vLLM's route: the same load as ``POST /v1/adapters``, answered as vLLM answers."""
        if body.load_inplace:
            message = "'load_inplace' is not supported: unload the adapter first, then load it"
            raise ApiError(400, message, "unsupported", "load_inplace")
        await self.load_adapter(AdapterLoadRequest(name=body.lora_name, source=body.lora_path), request)
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")

    async def unload_lora_adapter(self, body: LoraUnloadRequest, request: Request) -> PlainTextResponse:
        await self.unload_adapter(body.lora_name, request)
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")

    # -- vLLM's tokenizer routes (lm-eval's remote tokenizer uses them) -----------------------------

    async def tokenize(self, body: TokenizeRequest) -> dict[str, Any]:
        _refuse_unsupported(body)
        self._check_model(body.model)
        tokenizer = self.engine.tokenizer
        if (body.prompt is None) == (body.messages is None):
            raise ApiError(400, "send a prompt or messages, not both", "invalid_value", "prompt")
        if body.messages is not None:
            if not body.add_generation_prompt:
                raise ApiError(
                    400,
                    "add_generation_prompt false is not supported",
                    "unsupported",
                    "add_generation_prompt",
                )
            tokens = render(tokenizer, body.messages, None, self.model_name, plain=self.plain_chat)
            if body.add_special_tokens:
                raise ApiError(
                    400,
                    "add_special_tokens with messages is not supported",
                    "unsupported",
                    "add_special_tokens",
                )
        else:
            special = True if body.add_special_tokens is None else body.add_special_tokens
            tokens = list(tokenizer(body.prompt, add_special_tokens=special)["input_ids"])
        strings = tokenizer.convert_ids_to_tokens(tokens) if body.return_token_strs else None
        return {
            "count": len(tokens),
            "max_model_len": self.engine.max_context,
            "tokens": tokens,
            "token_strs": strings,
        }

    async def detokenize(self, body: DetokenizeRequest) -> dict[str, Any]:
        _refuse_unsupported(body)
        self._check_model(body.model)
        vocab = self.engine.vocab_size
        if any(not 0 <= token < vocab for token in body.tokens):
            raise ApiError(400, f"tokens must be ids in 0..{vocab - 1}", "invalid_value", "tokens")
        return {"prompt": self.engine.tokenizer.decode(body.tokens)}

    async def tokenizer_info(self) -> dict[str, Any]:
        tokenizer = self.engine.tokenizer
        return {
            "tokenizer_class": type(tokenizer).__name__,
            "eos_token": tokenizer.eos_token,
            "bos_token": tokenizer.bos_token,
            "pad_token": tokenizer.pad_token,
            "unk_token": tokenizer.unk_token,
            "chat_template": getattr(tokenizer, "chat_template", None),
            "model_max_length": self.engine.max_context,
            "vocab_size": self.engine.vocab_size,
        }

    # -- generation ------------------------------------------------------------------------------

    async def completions(self, body: CompletionRequest, request: Request) -> Response:
        _refuse_unsupported(body)
        max_tokens = COMPLETIONS_DEFAULT_MAX_TOKENS if body.max_tokens is None else body.max_tokens
        if max_tokens == 0 and not body.echo:
            message = "max_tokens 0 generates nothing: send echo true with it to score the prompt"
            raise ApiError(400, message, "invalid_value", "max_tokens")
        self._check_cap(max_tokens)
        prompts = _prompts(body.prompt)
        prompt_logprobs = None
        if body.echo:  # with max_tokens 0 the engine scores the prompt whether or not logprobs are shown
            prompt_logprobs = body.logprobs if body.logprobs is not None else (0 if max_tokens == 0 else None)
        params = sampling_params(
            body,
            max_tokens=max_tokens,
            logprobs=body.logprobs,
            prompt_logprobs=prompt_logprobs,
            grammar=output_grammar(body),
        )
        echo = [self._prompt_text(prompt) for prompt in prompts] if body.echo else None
        reply = self._reply(body, chat=False, echo=echo, logprobs=body.logprobs is not None)
        return await self._respond(request, body, prompts, params, reply)

    async def chat_completions(self, body: ChatCompletionRequest, request: Request) -> Response:
        _refuse_unsupported(body)
        if body.top_logprobs and not body.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs: true", "invalid_value", "top_logprobs")
        max_tokens = body.max_completion_tokens or body.max_tokens or self.max_tokens_cap
        self._check_cap(max_tokens)
        tokenizer = self.engine.tokenizer
        plan = plan_tools(body, tokenizer, body.model)
        grammar = output_grammar(body)
        if plan is not None and plan.grammar is not None and grammar is not None:
            message = (
                f"tool_choice {_choice_name(plan)} and an output format both constrain the output: give one"
            )
            raise ApiError(400, message, "invalid_value", "tool_choice")
        tools = (
            None
            if plan is None or body.tools is None
            else [t.model_dump(exclude_none=True) for t in body.tools]
        )
        prompt = render(tokenizer, body.messages, tools, body.model, plain=self.plain_chat)
        params = sampling_params(
            body,
            max_tokens=max_tokens,
            logprobs=(body.top_logprobs or 0) if body.logprobs else None,
            grammar=grammar if plan is None or plan.grammar is None else plan.grammar,
            # Some templates mark their tool-call tags special; the parser must see them (as vLLM does).
            skip_special_tokens=False if plan is not None else None,
        )
        reply = self._reply(body, chat=True, logprobs=bool(body.logprobs), tools=plan)
        return await self._respond(request, body, [prompt], params, reply)

    def _prompt_text(self, prompt: str | list[int]) -> str:
        """What an echoed prompt shows: the string as sent, or the text of its token ids."""
        if isinstance(prompt, str):
            return prompt
        vocab = self.engine.vocab_size
        if any(not 0 <= token < vocab for token in prompt):
            message = f"prompt has token ids outside the vocabulary (0..{vocab - 1})"
            raise ApiError(400, message, "invalid_value", "prompt")
        return self.engine.tokenizer.decode(prompt, skip_special_tokens=True)

    def _reply(self, body: SamplingFields, *, chat: bool, **options: Any) -> Reply:
        return Reply(
            body.model,
            chat=chat,
            started=time.perf_counter(),
            metrics=self.metrics,
            vocabulary=getattr(self.engine, "vocabulary", None),
            n=body.n,
            **options,
        )

    def _check_cap(self, max_tokens: int) -> None:
        if max_tokens > self.max_tokens_cap:
            raise ApiError(
                400,
                f"max_tokens {max_tokens} is above this server's cap of {self.max_tokens_cap}: "
                f"ask for at most {self.max_tokens_cap}",
                "max_tokens_too_large",
                "max_tokens",
            )

    async def _respond(
        self,
        request: Request,
        body: SamplingFields,
        prompts: list[str | list[int]],
        params: SamplingParams,
        reply: Reply,
    ) -> Response:
        count = len(prompts) * body.n
        if self.in_flight + count > self.max_queue:
            message = f"server queue is full ({self.max_queue} generations in flight): retry shortly"
            raise ApiError(429, message, "overloaded")
        adapter = None if body.model == self.model_name else body.model
        generations = Generations(self.engine, stream=body.stream)
        try:
            for prompt in prompts:
                for choice in range(body.n):
                    seed = None if params.seed is None else params.seed + choice
                    generations.submit(prompt, adapter, replace(params, seed=seed))
        except RequestError as err:
            if err.code != "unknown_adapter":
                raise
            # The engine's words ("register it first") name a Python call; an HTTP client needs routes.
            message = (
                f"model '{body.model}' is not served here: GET /v1/models lists what is; serve it with "
                "`adapterhub serve --adapters NAME=SPEC`, or load it with POST /v1/adapters"
            )
            raise ApiError(404, message, "unknown_adapter", "model") from err
        self._track(count)
        self.drain.generations.add(generations)

        def done() -> None:
            generations.cancel()
            self.drain.generations.discard(generations)
            self.drain.ended(cancelled=generations.told_cancelled)
            self._track(-count)

        if body.stream:
            usage = body.stream_options is not None and body.stream_options.include_usage
            return GenerationStream(sse_events(generations, reply, usage=usage), done)
        try:
            results = await collect_cancelling_on_disconnect(request, generations, reply)
        finally:
            done()
        return JSONResponse(reply.full(results))

    def _track(self, delta: int) -> None:
        self.in_flight += delta
        self.metrics.in_flight.set(self.in_flight)

    def _check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            self._find_adapter(model)

    def _find_adapter(self, name: str) -> AdapterInfo:
        for info in self.engine.list():
            if info.name == name:
                return info
        raise ApiError(404, f"model '{name}' is not served: GET /v1/models lists what is", "model_not_found")

    def _base_card(self) -> dict[str, Any]:
        base = self.engine.base_name
        metadata = {"kind": "base", "backend": self.engine.backend}
        return self._card(self.model_name, root=base, parent=None, metadata=metadata)

    def _adapter_card(self, info: AdapterInfo) -> dict[str, Any]:
        metadata = {
            "kind": "adapter",
            "method": info.method,
            "source": info.source,
            "base_model": info.base_model,
            "rank": info.rank,
            "num_virtual_tokens": info.num_virtual_tokens,
        }
        return self._card(info.name, root=info.source, parent=self.model_name, metadata=metadata)

    def _card(self, model_id: str, *, root: str, parent: str | None, metadata: dict) -> dict[str, Any]:
        return {
            "id": model_id,
            "object": "model",
            "created": self.created,
            "owned_by": "adapterhub",
            "root": root,
            "parent": parent,
            "max_model_len": self.engine.max_context,
            "metadata": metadata,
        }


async def _set_on_disconnect(request: Request, event: threading.Event) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass
    event.set()


def _choice_name(plan: ToolPlan) -> str:
    return "(a named function)" if plan.named else "required"


def _refuse_unsupported(body: Body) -> None:
    """One 400 naming the first field this server does not honour, content parts first."""
    for index, message in enumerate(getattr(body, "messages", None) or []):
        _refuse_content_parts(message, f"messages.{index}")
    unsupported = body.unsupported_fields()
    if unsupported:
        name = unsupported[0]
        raise ApiError(400, f"'{name}' is not supported by this server: leave it out", "unsupported", name)


def _refuse_content_parts(message: ChatMessage, where: str) -> None:
    if isinstance(message.content, list):
        for index, part in enumerate(message.content):
            if part.type != "text" or part.text is None:
                param = f"{where}.content.{index}"
                text = (
                    f"content part type '{part.type}' is not supported: "
                    "this server serves text models, send text parts"
                )
                raise ApiError(400, text, "unsupported", param)


def _prompts(prompt: str | list[str] | list[int] | list[list[int]]) -> list[str | list[int]]:
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise ApiError(400, "prompt is an empty list: send a string or token ids", "invalid_value", "prompt")
    if all(isinstance(item, int) for item in prompt):
        return [list(prompt)]  # type: ignore[arg-type]
    return list(prompt)  # type: ignore[arg-type]
