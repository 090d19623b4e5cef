"""What every serving backend shares: the request handle, the adapter registry, the request queue and
the stepping thread. ``Engine`` (``engine.py``, the fast multi-adapter runtime) and ``FallbackEngine``
(``fallback.py``, plain PEFT for every other base) build on it and only say how a step runs.

Many producer threads call ``submit``; it tokenizes and checks the request and queues a
``RequestHandle``. One stepping thread (``start``) or the caller (``generate`` without a thread) runs
``_step`` until the queue and the running rows are empty.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch

from adapterhub.errors import UserError
from adapterhub.models import resolve_device
from adapterhub.runtime.api import (
    AdapterInfo,
    GenerationRequest,
    GenerationResult,
    RequestError,
    TokenLogprob,
)
from adapterhub.runtime.grammar import Grammars
from adapterhub.runtime.sampling import Sampler, check_params
from adapterhub.runtime.slots import RegisteredAdapter
from adapterhub.runtime.threads import take_compute_threads
from adapterhub.runtime.vocabulary import Vocabulary

DEFAULT_MAX_CONTEXT = 4096


@dataclass
class EngineConfig:
    base: str = "builtin:tiny-llama"
    quantization: str = "auto"  # auto: nf4 on CUDA, none on CPU
    dtype: str = "auto"
    device: str = "auto"
    max_adapters: int = 8  # device slots; registered adapters beyond them wait in the CPU tier
    max_lora_rank: int = 64
    max_batch_size: int = 32
    max_queue: int = 256
    max_context: int | None = None  # prompt + virtual tokens + generation; default: the base's, up to 4096
    max_virtual_tokens: int = 64  # prompt/P-tuning/prefix slot capacity
    max_trainable_tokens: int = 64  # embedding rows one adapter's trainable_token_indices may replace
    # Decode with bucketed static shapes (rows and KV length rounded up to powers of two), replayed
    # as CUDA graphs on CUDA. "auto": on for CUDA, off (dynamic shapes) on CPU.
    static_decode: str = "auto"
    # An adapter recorded for another base model: a warning by default, an error when strict.
    strict_base: bool = False


class RequestHandle:
    """A submitted request and its handle: row state while it runs, the result once it is done."""

    def __init__(
        self, request: GenerationRequest, prompt_ids: list[int], adapter: RegisteredAdapter | None
    ) -> None:
        self.request = request
        self.params = request.params
        self.prompt_ids = prompt_ids
        self.adapter = adapter
        self.generator: torch.Generator | None = None
        self.matcher = None  # the grammar's llguidance matcher, when the request is constrained
        self.row = -1
        self.slot = 0
        self.prompt_end = 0  # KV cache positions taken by prefix, virtual and prompt tokens
        self.cache_len = 0  # next KV cache position of this row
        self.rope_next = 0  # rotary position of the next token
        self.token_ids: list[int] = []
        self.logprobs: list[TokenLogprob] | None = None if self.params.logprobs is None else []
        self.prompt_logprobs: list[TokenLogprob | None] | None = None
        self.text = ""  # streamed so far
        # Incremental detokenization: text of token_ids[:read_offset] is settled in ``decoded``;
        # decoding from prefix_offset keeps the context a tokenizer needs (e.g. leading spaces).
        self.decoded = ""
        self.prefix_offset = self.read_offset = 0
        self.finish_reason: str | None = None
        self.cancelled = False
        self._done = threading.Event()
        self._result: GenerationResult | None = None
        self._error: BaseException | None = None

    # -- handle ----------------------------------------------------------------------------------

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def cancel(self) -> None:
        self.cancelled = True

    def result(self, timeout: float | None = None) -> GenerationResult:
        if not self._done.wait(timeout):
            raise TimeoutError(f"request not finished after {timeout} s")
        if self._error is not None:
            raise self._error
        assert self._result is not None
        return self._result

    def fail(self, error: BaseException) -> None:
        self._error = error
        self._done.set()

    def finish(self, reason: str) -> None:
        self.finish_reason = reason
        self._result = GenerationResult(
            text=self.text,
            token_ids=list(self.token_ids),
            prompt_tokens=len(self.prompt_ids),
            completion_tokens=len(self.token_ids),
            finish_reason=reason,
            prompt_token_ids=self.prompt_ids,
            logprobs=self.logprobs,
            prompt_logprobs=self.prompt_logprobs,
        )
        self._done.set()

    # -- tokens ----------------------------------------------------------------------------------

    def accept(
        self,
        token: int,
        logprob: TokenLogprob | None,
        decode: Callable[..., str],
        eos_ids: set[int],
        room: int,
    ) -> bool:
        """Take one generated token, stream its text delta; True when the request is finished.

        A stop token (EOS unless ``ignore_eos``, or one of ``stop_token_ids``) ends the request and
        adds no text, as in vLLM; so does the token that completes the request's grammar.
        """
        params = self.params
        self.token_ids.append(token)
        if self.logprobs is not None and logprob is not None:
            self.logprobs.append(logprob)
        shown = self.token_ids
        finished = None
        if self.matcher is not None and not self.matcher.consume_token(token):
            reason = (self.matcher.get_error().splitlines() or ["no reason given"])[0][:300]
            raise RequestError(f"grammar refused token {token}: {reason}", "bad_request")
        if (token in eos_ids and not params.ignore_eos) or token in params.stop_token_ids:
            finished, shown = "stop", self.token_ids[:-1]
        elif self.matcher is not None and self.matcher.is_stopped():
            finished = "stop"
        elif len(self.token_ids) >= min(params.max_tokens, room):
            finished = "length"
        # vLLM looks for stop strings only once min_tokens tokens are out.
        stops = params.stop if len(self.token_ids) > params.min_tokens else ()
        text_of = partial(decode, skip_special_tokens=params.skip_special_tokens)
        if self.request.on_token is None and not any(params.stop):
            # Nothing streams or stops on text: decode once, at the end.
            if finished is not None:
                self.text = text_of(shown)
                self.finish(finished)
            return finished is not None
        full = self._decoded_so_far(text_of, shown)
        stop_at = _first_stop(full, stops, len(self.text))
        if stop_at is not None:
            full, finished = full[:stop_at], "stop"
        if finished is None:
            # Hold back an incomplete UTF-8 character and anything that may begin a stop string.
            full = full[: len(full) - _held_back(full, stops)]
        delta = full[len(self.text) :] if full.startswith(self.text) else ""
        self.text += delta
        if self.request.on_token is not None:
            if params.logprobs is None:
                self.request.on_token(token, delta)
            else:
                self.request.on_token(token, delta, logprob)
        if finished is not None:
            self.finish(finished)
        return finished is not None

    def _decoded_so_far(self, decode: Callable[[list[int]], str], ids: list[int]) -> str:
        """The text of ``ids`` (the generated tokens, less a final stop token), decoding only the
        last few tokens (O(1) per token, not O(length))."""
        settled = decode(ids[self.prefix_offset : self.read_offset])
        tail = decode(ids[self.prefix_offset :])[len(settled) :]
        if tail and not tail.endswith("\ufffd"):
            self.decoded += tail
            self.prefix_offset, self.read_offset = self.read_offset, len(ids)
            return self.decoded
        return self.decoded + tail


def _first_stop(text: str, stops: tuple[str, ...], streamed: int) -> int | None:
    longest = max((len(s) for s in stops), default=0)
    start = max(0, streamed - longest)
    found = [at for at in (text.find(stop, start) for stop in stops if stop) if at >= 0]
    return min(found) if found else None


def _held_back(text: str, stops: tuple[str, ...]) -> int:
    if text.endswith("\ufffd"):
        return len(text) - len(text.rstrip("\ufffd"))
    for size in range(min(len(text), max((len(s) for s in stops), default=0)), 0, -1):
        if any(stop.startswith(text[-size:]) for stop in stops if stop):
            return size
    return 0


class ServingEngine:
    """The registry, queue and thread of an engine; subclasses load adapters and run steps."""

    backend = ""  # how serve, chat and /v1/models describe it
    seq2seq = False  # an encoder-decoder base: its prompt is the encoder's input

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.device = resolve_device(config.device)
        quantization = config.quantization
        if quantization == "auto":
            quantization = "nf4" if self.device.startswith("cuda") else "none"
        self.quantization = quantization
        self.base_name = config.base
        self._adapters: dict[str, RegisteredAdapter] = {}
        self._waiting: deque[RequestHandle] = deque()
        self._lock = threading.Lock()  # registry, queue, accepting flag
        self._work = threading.Condition(self._lock)
        self._step_lock = threading.RLock()  # one thread runs forwards and touches adapters at a time
        self._tokenizer_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._accepting = True
        self._running = False
        self._merged: RegisteredAdapter | None = None
        self._last_batch_size = 0

    def _set_vocabulary(self, tokenizer: Any, model: torch.nn.Module, vocab_size: int) -> None:
        """EOS ids, the grammar vocabulary and the per-row sampler, once model and tokenizer are loaded."""
        self.tokenizer = tokenizer
        eos = model.config.eos_token_id
        if model.generation_config.eos_token_id is not None:
            eos = model.generation_config.eos_token_id
        self.eos_ids = {eos} if isinstance(eos, int) else set(eos or [])
        if tokenizer.eos_token_id is not None:
            self.eos_ids.add(tokenizer.eos_token_id)
        self.vocab_size = vocab_size
        self.vocabulary = Vocabulary(tokenizer, vocab_size, self.eos_ids)
        self.grammars = Grammars(self.vocabulary)
        noise = torch.Generator(device=self.device)
        noise.seed()
        self.sampler = Sampler(self.config.max_batch_size, vocab_size, self.device, noise)

    # -- what a backend provides -----------------------------------------------------------------

    def _load(self, folder: Path) -> tuple[Any, str, int | None, int | None]:
        """Check and read an adapter folder: (what the backend keeps, method, rank, virtual tokens)."""
        raise NotImplementedError

    def _step(self) -> None:
        """Run one step of work: admit what can start, advance what runs, finish what is done."""
        raise NotImplementedError

    def _active(self) -> list[RequestHandle]:
        """The requests that hold batch rows now."""
        raise NotImplementedError

    def _release(self, adapter: RegisteredAdapter) -> None:
        """An unregistered adapter's resources, once no running request needs them."""

    def _check_request(self, handle: RequestHandle) -> None:
        """Backend-specific refusals of a request at submit (its adapter looked up)."""

    # -- registry --------------------------------------------------------------------------------

    def register(self, name: str, spec: str) -> AdapterInfo:
        folder = self._resolve(spec)
        payload, method, rank, virtual = self._load(folder)
        self._check_base(folder)
        info = AdapterInfo(
            name=name,
            method=method,
            source=spec,
            base_model=self.base_name,
            rank=rank,
            num_virtual_tokens=virtual,
        )
        with self._lock:
            if name in self._adapters:
                raise RequestError(
                    f"adapter '{name}' is already registered: unregister it first", "bad_request"
                )
            self._adapters[name] = RegisteredAdapter(info, payload)
        return info

    @staticmethod
    def _resolve(spec: str) -> Path:
        if Path(spec).is_dir():
            return Path(spec)
        from adapterhub.hub.resolve import resolve

        try:
            return Path(resolve(spec))
        except UserError as err:
            raise RequestError(str(err), "unknown_adapter") from err

    def _check_base(self, folder: Path) -> None:
        from adapterhub.hub.adapter import check_base_model
        from adapterhub.models import split_random

        try:
            check_base_model(folder, split_random(self.base_name)[0], strict=self.config.strict_base)
        except UserError as err:
            raise RequestError(str(err), "incompatible_adapter") from err

    def unregister(self, name: str) -> None:
        with self._lock:
            adapter = self._adapters.pop(name, None)
            if adapter is None:
                raise RequestError(f"adapter '{name}' is not registered: see list()", "unknown_adapter")
            adapter.removed = True
        with self._step_lock:
            self._release(adapter)

    def list(self) -> list[AdapterInfo]:
        with self._lock:
            return [adapter.info for adapter in self._adapters.values()]

    def _lookup(self, name: str) -> RegisteredAdapter:
        adapter = self._adapters.get(name)
        if adapter is None:
            known = ", ".join(sorted(self._adapters)) or "none registered"
            raise RequestError(
                f"unknown adapter '{name}': register it first (known: {known})", "unknown_adapter"
            )
        return adapter

    # -- requests --------------------------------------------------------------------------------

    def submit(self, request: GenerationRequest) -> RequestHandle:
        check_params(request.params, self.vocab_size)
        matcher = None if request.params.grammar is None else self.grammars.matcher(request.params.grammar)
        if isinstance(request.prompt, str):
            with self._tokenizer_lock:
                prompt_ids = self.tokenizer(request.prompt)["input_ids"]
        else:
            prompt_ids = [int(token) for token in request.prompt]
            if any(not 0 <= token < self.vocab_size for token in prompt_ids):
                raise RequestError(
                    "prompt has token ids outside the vocabulary: tokenize with engine.tokenizer",
                    "bad_request",
                )
        if not prompt_ids:
            raise RequestError("prompt is empty: give at least one token", "bad_request")
        with self._lock:
            adapter = None if request.adapter is None else self._lookup(request.adapter)
            self._check_merged(adapter)
            virtual = (adapter.info.num_virtual_tokens or 0) if adapter is not None else 0
            if len(prompt_ids) + virtual >= self.max_context:
                raise RequestError(
                    f"prompt has {len(prompt_ids)} tokens (+{virtual} virtual) but the context holds "
                    f"{self.max_context}: shorten the prompt",
                    "prompt_too_long",
                )
            if not self._accepting:
                raise RequestError("engine is stopping: retry on another replica", "overloaded")
            if len(self._waiting) >= self.config.max_queue:
                raise RequestError(
                    f"queue is full ({self.config.max_queue} waiting): retry later", "overloaded"
                )
            handle = RequestHandle(request, prompt_ids, adapter)
            handle.matcher = matcher
            self._check_request(handle)
            if request.params.seed is not None and request.params.temperature > 0:
                handle.generator = torch.Generator(device=self.device).manual_seed(request.params.seed)
            self._waiting.append(handle)
            self._work.notify()
        return handle

    def _check_merged(self, adapter: RegisteredAdapter | None) -> None:
        if self._merged is not None and adapter is not self._merged:
            raise RequestError(
                f"engine is merged with '{self._merged.info.name}' and serves only it: call unmerge() first",
                "bad_request",
            )

    def generate(self, request: GenerationRequest) -> GenerationResult:
        handle = self.submit(request)
        if self._thread is None:
            while not handle.done:
                self._step()
        return handle.result()

    def start(self) -> None:
        if self._thread is not None:
            return
        self._running = True
        self._thread = threading.Thread(target=self._loop, name="adapterhub-engine", daemon=True)
        self._thread.start()

    def stop(self, grace_s: float = 30.0) -> None:
        with self._lock:
            self._accepting = False
            self._work.notify()
        deadline = time.monotonic() + grace_s
        while self._busy() and time.monotonic() < deadline:
            if self._thread is None:
                self._step()
            else:
                time.sleep(0.01)
        with self._step_lock:
            with self._lock:
                leftover = [*self._waiting, *self._active()]
            for request in leftover:
                request.cancel()
            self._step()
        with self._lock:
            self._running = False
            self._work.notify()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        with self._lock:
            self._accepting = True  # stopped, not closed: generate() and start() work again

    def _busy(self) -> bool:
        with self._lock:
            return bool(self._waiting) or bool(self._active())

    def _loop(self) -> None:
        take_compute_threads()  # see runtime/threads.py: this thread does the engine's computing
        while True:
            with self._lock:
                while self._running and not self._waiting and not self._active():
                    self._work.wait()
                if not self._running:
                    return
            self._step()

    def _take_cancelled(self) -> list[RequestHandle]:
        """Queued requests that were cancelled, out of the queue."""
        with self._lock:
            cancelled = [r for r in self._waiting if r.cancelled]
            for request in cancelled:
                self._waiting.remove(request)
        return cancelled

    def _decode_text(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        with self._tokenizer_lock:
            return self.tokenizer.decode(token_ids, skip_special_tokens=skip_special_tokens)
