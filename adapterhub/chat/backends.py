"""Where replies come from: the engine running in this process, or an OpenAI-compatible server.

Both backends run each generation off the main thread and post its events onto a queue that the
view reads, so the main thread stays free to draw and to catch Ctrl-C.
"""

from __future__ import annotations

import contextlib
import json
import queue
import socket
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import httpx

from adapterhub.chat.sanitize import terminal_safe
from adapterhub.errors import UserError
from adapterhub.plain_chat import plain_transcript
from adapterhub.runtime.api import GenerationRequest, RequestError, SamplingParams

if TYPE_CHECKING:
    from adapterhub.runtime.serving import ServingEngine

BASE = "base"  # what the REPL calls the base model without an adapter
CONNECT_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class AdapterEntry:
    """One model the chat can talk to: an adapter and its PEFT family, or the base (name ``base``)."""

    name: str
    method: str


BASE_ENTRY = AdapterEntry(BASE, "base")


@dataclass
class ChatRequest:
    messages: list[dict[str, str]]  # role/content, system first if any
    adapter: str | None  # None: the base model
    params: SamplingParams


@dataclass(frozen=True)
class Delta:
    slot: int
    text: str


@dataclass(frozen=True)
class Done:
    slot: int
    completion_tokens: int | None  # None when the backend did not say: the view counts deltas
    finish_reason: str
    prompt_tokens: int | None = None  # None when the backend did not say


@dataclass(frozen=True)
class Failed:
    slot: int
    error: UserError


Event = Delta | Done | Failed


class Generation(Protocol):
    def cancel(self) -> None: ...


class Backend(Protocol):
    description: str

    def adapters(self) -> list[AdapterEntry]: ...

    def select(self, name: str) -> AdapterEntry: ...

    def start(self, request: ChatRequest, slot: int, events: queue.Queue[Event]) -> Generation: ...

    def close(self) -> None: ...


class LocalBackend:
    """The engine in this process; ``select`` registers adapters it has not seen yet."""

    def __init__(self, engine: ServingEngine) -> None:
        self.engine = engine
        self.description = f"local {engine.base_name} ({engine.backend})"

    @classmethod
    def open(cls, base: str | None, adapter: str | None) -> LocalBackend:
        if base is None and adapter is None:
            raise UserError("no model to chat with: pass --base MODEL, --adapter NAME or --url URL")
        from adapterhub.hub.specs import AdapterSpec, infer_base
        from adapterhub.runtime.backends import open_engine
        from adapterhub.runtime.serving import EngineConfig

        adapters = [] if adapter is None else [AdapterSpec(adapter, adapter)]
        engine = open_engine(EngineConfig(base=infer_base(adapters, base)))
        engine.start()
        return cls(engine)

    def adapters(self) -> list[AdapterEntry]:
        return [BASE_ENTRY] + [AdapterEntry(info.name, info.method) for info in self.engine.list()]

    def select(self, name: str) -> AdapterEntry:
        from adapterhub.hub.specs import default_name

        if name in (BASE, self.engine.base_name):
            return BASE_ENTRY
        for info in self.engine.list():
            if name in (info.name, info.source) or info.name == default_name(name):
                return AdapterEntry(info.name, info.method)
        info = self.engine.register(default_name(name), name)
        return AdapterEntry(info.name, info.method)

    def start(self, request: ChatRequest, slot: int, events: queue.Queue[Event]) -> Generation:
        prompt = chat_prompt(self.engine.tokenizer, request.messages)

        def on_token(_token_id: int, text: str) -> None:
            events.put(Delta(slot, text))

        try:
            handle = self.engine.submit(GenerationRequest(prompt, request.adapter, request.params, on_token))
        except RequestError as err:
            if err.code != "prompt_too_long":
                raise
            raise UserError(f"the conversation no longer fits: {err}; /undo or /reset to shorten it") from err
        threading.Thread(target=_wait_for, args=(handle, slot, events), daemon=True).start()
        return handle

    def close(self) -> None:
        self.engine.stop(grace_s=5.0)


def _wait_for(handle: Any, slot: int, events: queue.Queue[Event]) -> None:
    try:
        result = handle.result()
    except RequestError as err:
        events.put(Failed(slot, err))
    except Exception as err:  # an engine bug must end this reply with a message, not hang the REPL
        events.put(Failed(slot, UserError(f"the engine failed this reply: {type(err).__name__}: {err}")))
    else:
        events.put(Done(slot, result.completion_tokens, result.finish_reason, result.prompt_tokens))


def chat_prompt(tokenizer: Any, messages: list[dict[str, str]]) -> str:
    """The prompt text for a conversation, through the base's chat template."""
    if tokenizer.chat_template is None:
        return plain_transcript(messages)
    from jinja2 import TemplateError

    try:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    except TemplateError:
        if not messages or messages[0]["role"] != "system":
            raise
        # Some templates (Gemma's, Mistral's) refuse a system turn: fold it into the first user turn.
        system, first, *rest = messages
        folded = [{"role": first["role"], "content": f"{system['content']}\n\n{first['content']}"}, *rest]
        return tokenizer.apply_chat_template(folded, add_generation_prompt=True, tokenize=False)


class StreamingReply:
    """One server-side generation read by a thread; cancelling hangs up, so the server stops it too."""

    def __init__(self) -> None:
        self.cancelled = threading.Event()
        self.connection: socket.socket | None = None

    def cancel(self) -> None:
        self.cancelled.set()
        if self.connection is not None:
            # Closing a socket does not wake a thread blocked reading it; shutting it down does.
            with contextlib.suppress(OSError):
                self.connection.shutdown(socket.SHUT_RDWR)

    def attach(self, response: httpx.Response) -> None:
        stream = response.extensions.get("network_stream")
        self.connection = stream.get_extra_info("socket") if stream is not None else None
        if self.cancelled.is_set():
            self.cancel()


class RemoteBackend:
    """Any OpenAI-compatible server: ``GET /v1/models`` lists adapters, ``/v1/chat/completions`` streams."""

    def __init__(self, url: str, api_key: str | None) -> None:
        self.url = openai_base_url(url)
        self.description = f"remote {self.url}"
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        timeout = httpx.Timeout(CONNECT_TIMEOUT_S, read=None)
        self.client = httpx.Client(base_url=self.url, headers=headers, timeout=timeout)
        # Listing the models now makes a wrong --url or --api-key fail at start, in one line.
        models = self.models()
        if not models:
            raise UserError(f"the server at {self.url} lists no models: check --url")
        # OpenAI-style servers (ours, vLLM) give adapters a parent; the base has none.
        self.base_id = next((m["id"] for m in models if m.get("parent") is None), models[0]["id"])

    def models(self) -> list[dict[str, Any]]:
        try:
            response = self.client.get("/models")
        except httpx.HTTPError as err:
            raise self.unreachable(err) from err
        self.check(response)
        try:
            return [m for m in response.json()["data"] if isinstance(m, dict) and "id" in m]
        except (ValueError, KeyError, TypeError) as err:
            raise UserError(f"{self.url}/models did not answer an OpenAI model list: check --url") from err

    def adapters(self) -> list[AdapterEntry]:
        return [BASE_ENTRY] + [
            AdapterEntry(m["id"], model_method(m)) for m in self.models() if m["id"] != self.base_id
        ]

    def select(self, name: str) -> AdapterEntry:
        if name == self.base_id:
            return BASE_ENTRY
        for entry in self.adapters():
            if entry.name == name:
                return entry
        raise UserError(f"unknown adapter '{name}': /adapters lists those {self.url} serves")

    def start(self, request: ChatRequest, slot: int, events: queue.Queue[Event]) -> Generation:
        params = request.params
        body: dict[str, Any] = {
            "model": request.adapter or self.base_id,
            "messages": request.messages,
            "max_tokens": params.max_tokens,
            "temperature": params.temperature,
            "top_p": params.top_p,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if params.seed is not None:
            body["seed"] = params.seed
        reply = StreamingReply()
        threading.Thread(target=self._stream, args=(body, slot, events, reply), daemon=True).start()
        return reply

    def _stream(
        self, body: dict[str, Any], slot: int, events: queue.Queue[Event], reply: StreamingReply
    ) -> None:
        try:
            done = self._read_stream(body, slot, events, reply)
        except httpx.HTTPError as err:
            if reply.cancelled.is_set():
                return
            events.put(Failed(slot, self.unreachable(err)))
        except UserError as err:
            events.put(Failed(slot, err))
        except Exception as err:  # a reply shaped unlike OpenAI's must end with a message, not hang the REPL
            message = f"the server at {self.url} sent a reply this client cannot read: {err!r}"
            events.put(Failed(slot, UserError(message)))
        else:
            events.put(done)

    def _read_stream(
        self, body: dict[str, Any], slot: int, events: queue.Queue[Event], reply: StreamingReply
    ) -> Done:
        completion_tokens, finish_reason, usage = None, "stop", {}
        with self.client.stream("POST", "/chat/completions", json=body) as response:
            reply.attach(response)
            if not response.is_success:
                response.read()
                self.check(response)
            for line in response.iter_lines():
                if reply.cancelled.is_set():
                    return Done(slot, completion_tokens, "cancelled")
                data = line.removeprefix("data:").strip()
                if not line.startswith("data:") or data == "[DONE]":
                    continue
                chunk = parse_chunk(data, self.url)
                usage = chunk.get("usage") or usage
                completion_tokens = usage.get("completion_tokens", completion_tokens)
                for choice in chunk.get("choices") or []:
                    text = (choice.get("delta") or {}).get("content")
                    if text:
                        events.put(Delta(slot, text))
                    finish_reason = choice.get("finish_reason") or finish_reason
        return Done(slot, completion_tokens, finish_reason, usage.get("prompt_tokens"))

    def unreachable(self, err: httpx.HTTPError) -> UserError:
        return UserError(
            f"cannot reach the server at {self.url} ({type(err).__name__}): start it "
            "(adapterhub serve) or fix --url"
        )

    def check(self, response: httpx.Response) -> None:
        """Turn an error answer into one line: a wrong key, an unknown adapter, or the server's message."""
        if response.is_success:
            return
        message = error_message(response)
        if response.status_code in (401, 403):
            raise UserError(
                f"the server at {self.url} refused the API key ({message}): pass the right --api-key"
            )
        raise UserError(f"the server at {self.url} answered {response.status_code}: {message}")

    def close(self) -> None:
        self.client.close()


def openai_base_url(url: str) -> str:
    """Accept a server's root or its ``/v1`` base, as OpenAI clients do."""
    url = url.rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise UserError(f"--url '{url}' is not an http(s) URL: e.g. http://127.0.0.1:8000")
    return url if url.endswith("/v1") else f"{url}/v1"


def model_method(model: dict[str, Any]) -> str:
    """The PEFT family a ``/v1/models`` entry reports; ``-`` for servers that say nothing."""
    for holder in (model, model.get("metadata"), model.get("adapterhub")):
        if isinstance(holder, dict) and isinstance(holder.get("method"), str):
            return holder["method"]
    return "-"


def error_message(response: httpx.Response) -> str:
    """The server's error message, made safe to print (it may end up in a one-line CLI error)."""
    try:
        error = response.json()["error"]
        message = str(error["message"] if isinstance(error, dict) else error)
    except (ValueError, KeyError, TypeError):
        message = response.text.strip()[:200] or response.reason_phrase
    return terminal_safe(message)


def parse_chunk(data: str, url: str) -> dict[str, Any]:
    try:
        chunk = json.loads(data)
    except ValueError as err:
        message = f"the server at {url} sent a malformed stream event: {terminal_safe(data[:80])}"
        raise UserError(message) from err
    if not isinstance(chunk, dict):
        raise UserError(f"the server at {url} sent a malformed stream event: {terminal_safe(data[:80])}")
    if "error" in chunk:
        error = chunk["error"]
        message = error.get("message", error) if isinstance(error, dict) else error
        raise UserError(f"the server at {url} failed the reply: {terminal_safe(str(message))}")
    return chunk
