"""The engine: many producer threads submit requests; one stepping thread batches them continuously.

Follow one token: ``submit`` tokenizes the prompt and queues it; ``_step`` admits queued requests
into free batch rows (loading their adapters into device slots), prefills them in one forward, and
then runs one decode forward over every running row; ``_sample`` picks each row's next token;
``RequestHandle.accept`` streams it, checks EOS, stop strings and limits; finished rows leave the batch
before the next step. The forward itself is ``SlottedDecoder.forward`` in ``model.py``.
"""

from __future__ import annotations

import threading
import time
import warnings
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from adapterhub.errors import UserError
from adapterhub.models import ModelSpec, load_config, load_model, load_tokenizer, resolve_device
from adapterhub.runtime.adapters import load_native
from adapterhub.runtime.api import (
    AdapterInfo,
    GenerationRequest,
    GenerationResult,
    RequestError,
    SamplingParams,
)
from adapterhub.runtime.model import Batch, SlottedDecoder, check_architecture
from adapterhub.runtime.slots import RegisteredAdapter, SlotPool

DEFAULT_MAX_CONTEXT = 4096
CUDAGraph = torch.cuda.CUDAGraph


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
        self.row = -1
        self.slot = 0
        self.prompt_end = 0  # KV cache positions taken by prefix, virtual and prompt tokens
        self.cache_len = 0  # next KV cache position of this row
        self.rope_next = 0  # rotary position of the next token
        self.token_ids: list[int] = []
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
        )
        self._done.set()

    # -- tokens ----------------------------------------------------------------------------------

    def accept(self, token: int, decode: Callable[[list[int]], str], eos_ids: set[int], room: int) -> bool:
        """Take one generated token, stream its text delta; True when the request is finished."""
        self.token_ids.append(token)
        finished = None
        if token in eos_ids:
            finished = "stop"
        elif len(self.token_ids) >= min(self.params.max_tokens, room):
            finished = "length"
        if self.request.on_token is None and not any(self.params.stop):
            # Nothing streams or stops on text: decode once, at the end.
            if finished is not None:
                self.text = decode(self.token_ids)
                self.finish(finished)
            return finished is not None
        full = self._decoded_so_far(decode)
        stop_at = _first_stop(full, self.params.stop, len(self.text))
        if stop_at is not None:
            full, finished = full[:stop_at], "stop"
        if finished is None:
            # Hold back an incomplete UTF-8 character and anything that may begin a stop string.
            full = full[: len(full) - _held_back(full, self.params.stop)]
        delta = full[len(self.text) :] if full.startswith(self.text) else ""
        self.text += delta
        if self.request.on_token is not None:
            self.request.on_token(token, delta)
        if finished is not None:
            self.finish(finished)
        return finished is not None

    def _decoded_so_far(self, decode: Callable[[list[int]], str]) -> str:
        """All generated text, decoding only the last few tokens (O(1) per token, not O(length))."""
        ids = self.token_ids
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


def _check_params(params: SamplingParams) -> None:
    problems = [
        (params.max_tokens < 1, f"max_tokens {params.max_tokens}: use 1 or more"),
        (params.temperature < 0, f"temperature {params.temperature}: use 0 (greedy) or more"),
        (not 0 < params.top_p <= 1, f"top_p {params.top_p}: use a value in (0, 1]"),
        (params.top_k < 0, f"top_k {params.top_k}: use 0 (off) or more"),
        (
            params.seed is not None and not -(2**63) <= params.seed < 2**64,
            f"seed {params.seed}: use an integer from -2**63 to 2**64 - 1",
        ),
    ]
    for bad, message in problems:
        if bad:
            raise RequestError(f"bad sampling parameter {message}", "bad_request")


class Engine:
    """One base model, many adapters of every PEFT family, one continuously batched decode loop."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.device = resolve_device(config.device)
        quantization = config.quantization
        if quantization == "auto":
            quantization = "nf4" if self.device.startswith("cuda") else "none"
        self.quantization = quantization
        check_architecture(load_config(config.base), config.base)
        self.model = load_model(ModelSpec(config.base, quantization, config.dtype, device=self.device))
        self.model.eval()
        self.tokenizer = load_tokenizer(config.base)
        self.base_name = config.base
        self.dtype = self.model.model.embed_tokens.weight.dtype
        model_config = self.model.config
        limits = [model_config.max_position_embeddings, config.max_context or DEFAULT_MAX_CONTEXT]
        if getattr(model_config, "sliding_window", None) and getattr(
            model_config, "use_sliding_window", True
        ):
            limits.append(model_config.sliding_window)
        self.max_context = min(limits)
        self.decoder = SlottedDecoder(
            self.model,
            num_slots=config.max_adapters + 1,
            max_rank=config.max_lora_rank,
            max_virtual_tokens=config.max_virtual_tokens,
            max_batch=config.max_batch_size,
            max_context=self.max_context,
            dtype=self.dtype,
            device=self.device,
        )
        self.pool = SlotPool(self.decoder)
        eos = (
            model_config.eos_token_id
            if self.model.generation_config.eos_token_id is None
            else (self.model.generation_config.eos_token_id)
        )
        self.eos_ids = {eos} if isinstance(eos, int) else set(eos or [])
        if self.tokenizer.eos_token_id is not None:
            self.eos_ids.add(self.tokenizer.eos_token_id)
        self._adapters: dict[str, RegisteredAdapter] = {}
        self._waiting: deque[RequestHandle] = deque()
        self._rows: list[RequestHandle | None] = [None] * config.max_batch_size
        self._lock = threading.Lock()  # registry, queue, accepting flag
        self._work = threading.Condition(self._lock)
        self._step_lock = threading.RLock()  # one thread runs forwards and touches slots at a time
        self._tokenizer_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._accepting = True
        self._running = False
        self._merged: RegisteredAdapter | None = None
        self._merge_saved: dict | None = None
        self._last_batch_size = 0
        if config.static_decode not in ("auto", "on", "off"):
            raise UserError(f"static_decode '{config.static_decode}': use auto, on or off")
        on_cuda = self.device.startswith("cuda")
        self.static_decode = config.static_decode == "on" or (config.static_decode == "auto" and on_cuda)
        self.cuda_graphs = self.static_decode and on_cuda
        self._graphs: dict[tuple, tuple[CUDAGraph, torch.Tensor] | None] = {}
        self._graph_pool = torch.cuda.graph_pool_handle() if self.cuda_graphs else None
        self._static_inputs = torch.zeros(4, config.max_batch_size, dtype=torch.long, device=self.device)
        self._row_ids = torch.arange(config.max_batch_size, device=self.device)
        self._zeros = torch.zeros(config.max_batch_size, dtype=torch.long, device=self.device)
        self._sampler = torch.Generator(device=self.device)
        self._sampler.seed()

    # -- registry --------------------------------------------------------------------------------

    def register(self, name: str, spec: str) -> AdapterInfo:
        folder = self._resolve(spec)
        native = load_native(
            folder,
            self.decoder.shape,
            max_rank=self.config.max_lora_rank,
            max_virtual_tokens=self.config.max_virtual_tokens,
            dtype=self.dtype,
            pin=self.device.startswith("cuda"),
        )
        self._check_base(folder)
        info = AdapterInfo(
            name=name,
            method=native.method,
            source=spec,
            base_model=self.base_name,
            rank=native.rank,
            num_virtual_tokens=native.num_virtual_tokens,
        )
        with self._lock:
            if name in self._adapters:
                raise RequestError(
                    f"adapter '{name}' is already registered: unregister it first", "bad_request"
                )
            self._adapters[name] = RegisteredAdapter(info, native)
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
            self.pool.release_if_removed(adapter)

    def list(self) -> list[AdapterInfo]:
        with self._lock:
            return [adapter.info for adapter in self._adapters.values()]

    def make_resident(self, name: str) -> int:
        """Load a registered adapter into a device slot now (the bench times this); returns the slot."""
        with self._step_lock:
            slot = self.pool.acquire(self._lookup(name))
        if slot is None:
            raise RequestError("all device slots are busy with running requests: retry later", "overloaded")
        return slot

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
        _check_params(request.params)
        if isinstance(request.prompt, str):
            with self._tokenizer_lock:
                prompt_ids = self.tokenizer(request.prompt)["input_ids"]
        else:
            prompt_ids = [int(token) for token in request.prompt]
            if any(not 0 <= token < self.model.config.vocab_size for token in prompt_ids):
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
                leftover = [*self._waiting, *(r for r in self._rows if r is not None)]
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
            return bool(self._waiting) or any(r is not None for r in self._rows)

    def stats(self) -> dict:
        with self._lock:
            return {
                "queue_depth": len(self._waiting),
                "running": sum(r is not None for r in self._rows),
                "last_batch_size": self._last_batch_size,
                "adapter_loads": self.pool.loads,
                "adapter_evictions": self.pool.evictions,
                "merged": None if self._merged is None else self._merged.info.name,
            }

    def score(self, requests: list[GenerationRequest]) -> torch.Tensor:
        """First-step logits (float32, one row per request) of one mixed batch, generating nothing.

        Exactness checks compare these with PEFT's; the batch must fit the rows that are free now.
        """
        with self._step_lock:
            handles = [self.submit(request) for request in requests]
            with self._lock:
                for handle in reversed(handles):
                    self._waiting.remove(handle)
                    self._waiting.appendleft(handle)
            seated = self._admit(limit=len(handles))
            try:
                if seated != handles:
                    raise RequestError(
                        "score needs free batch rows and slots for every request", "overloaded"
                    )
                return self._prefill_logits(handles)
            finally:
                for handle in seated:
                    self._leave(handle)
                    handle.finish("cancelled")
                for handle in handles:
                    handle.cancel()

    # -- merge -----------------------------------------------------------------------------------

    def merge(self, name: str) -> None:
        """Fold one LoRA/IA3 adapter into the base; waits for running requests to finish first."""
        with self._step_lock:
            with self._lock:
                adapter = self._lookup(name)
                if self._merged is not None:
                    raise RequestError(
                        f"'{self._merged.info.name}' is already merged: unmerge() first", "bad_request"
                    )
                if adapter.info.method not in ("lora", "ia3"):
                    raise RequestError(
                        f"merge folds LoRA or IA3 only, '{name}' is {adapter.info.method}: serve it unmerged",
                        "bad_request",
                    )
            self._drain()
            self._merge_saved = self.decoder.merge(adapter.native)
            self._merged = adapter
            self._graphs.clear()  # 4-bit merges swap in dense weights the captured graphs do not use

    def unmerge(self) -> None:
        with self._step_lock:
            if self._merged is None:
                return
            self._drain()
            self.decoder.unmerge(self._merge_saved)
            self._merged, self._merge_saved = None, None
            self._graphs.clear()

    def _drain(self) -> None:
        while any(r is not None for r in self._rows):
            self._step(admit=False)

    # -- the loop ----------------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._lock:
                while self._running and not self._waiting and all(r is None for r in self._rows):
                    self._work.wait()
                if not self._running:
                    return
            self._step()

    def _step(self, admit: bool = True) -> None:
        with self._step_lock:
            self._retire_cancelled()
            admitted = self._admit() if admit else []
            try:
                if admitted:
                    self._prefill(admitted)
                if any(r is not None for r in self._rows):
                    self._decode()
            except Exception as err:  # a failed forward fails its requests, not the engine
                for request in [r for r in self._rows if r is not None]:
                    self._leave(request)
                    request.fail(err)

    def _retire_cancelled(self) -> None:
        with self._lock:
            waiting = [r for r in self._waiting if r.cancelled]
            for request in waiting:
                self._waiting.remove(request)
        for request in waiting:
            request.finish("cancelled")
        for request in [r for r in self._rows if r is not None and r.cancelled]:
            self._leave(request)
            request.finish("cancelled")

    def _admit(self, limit: int | None = None) -> list[RequestHandle]:
        admitted: list[RequestHandle] = []
        with self._lock:
            free = [row for row, r in enumerate(self._rows) if r is None][:limit]
            while self._waiting and free:
                request = self._waiting[0]
                adapter = request.adapter
                slot = 0
                if adapter is not None and adapter.removed:
                    self._waiting.popleft()
                    request.fail(
                        RequestError(f"adapter '{adapter.info.name}' was unregistered", "unknown_adapter")
                    )
                    continue
                if self._merged is not None and adapter is not self._merged:
                    self._waiting.popleft()
                    request.fail(
                        RequestError(f"engine is merged with '{self._merged.info.name}'", "bad_request")
                    )
                    continue
                if adapter is not None and adapter is not self._merged:
                    slot = self.pool.acquire(adapter)
                    if slot is None:
                        break  # every slot serves running requests; wait for one to finish
                    adapter.users += 1
                self._waiting.popleft()
                request.row = free.pop(0)
                request.slot = slot
                self._rows[request.row] = request
                admitted.append(request)
        return admitted

    def _leave(self, request: RequestHandle) -> None:
        if self._rows[request.row] is request:
            self._rows[request.row] = None
        if request.adapter is not None and request.slot:
            request.adapter.users -= 1
            self.pool.release_if_removed(request.adapter)

    def _prefill(self, requests: list[RequestHandle]) -> None:
        logits = self._prefill_logits(requests)
        self._last_batch_size = len(requests)
        self._advance(requests, logits)

    def _prefill_logits(self, requests: list[RequestHandle]) -> torch.Tensor:
        """One forward over the new rows' prompts: virtual tokens first, prefix K/V copied ahead of them."""
        length = max(len(r.prompt_ids) + self._virtual_count(r) for r in requests)
        token_ids, cache_pos, rope_pos, last = [], [], [], []
        virtual: list[list[int]] = [[], [], [], []]
        prefix: list[list[int]] = [[], [], [], []]
        for index, request in enumerate(requests):
            native = request.adapter.native if request.slot else None
            count = self._virtual_count(request)
            offset = native.prefix_kv.shape[3] if native is not None and native.prefix_kv is not None else 0
            ids = [0] * count + request.prompt_ids
            token_ids.append(ids + [0] * (length - len(ids)))
            # Pad positions write past the row's tokens, which later decode steps overwrite before reading.
            cache_pos.append([min(offset + t, self.max_context - 1) for t in range(length)])
            # PEFT: prefix rows continue positions after the prefix; virtual tokens take positions 0..n-1.
            rope_pos.append([offset + t for t in range(length)])
            last.append(len(ids) - 1)
            for t in range(count):
                for column, value in zip(virtual, (index, t, request.slot, t), strict=True):
                    column.append(value)
            for t in range(offset):
                for column, value in zip(prefix, (request.row, t, request.slot, t), strict=True):
                    column.append(value)
            request.cache_len = request.prompt_end = offset + len(ids)
            request.rope_next = offset + len(ids)
        device = self.device
        rows = torch.tensor([r.row for r in requests], device=device)
        batch = Batch(
            rows=rows,
            row_index=rows.unsqueeze(1),
            cache_pos=torch.tensor(cache_pos, device=device),
            rope_pos=torch.tensor(rope_pos, device=device),
            kv_len=min(max(c[-1] for c in cache_pos) + 1, self.max_context),
            slots=torch.tensor([r.slot for r in requests], device=device),
            lora_rank=self._lora_rank(requests),
            any_ia3=self._any_ia3(requests),
            prefix_write=tuple(torch.tensor(c, device=device) for c in prefix) if prefix[0] else None,
        )
        virtual_index = tuple(torch.tensor(c, device=device) for c in virtual) if virtual[0] else None
        embeds = self.decoder.embed(torch.tensor(token_ids, device=device), virtual_index)
        return self.decoder.forward(embeds, batch, torch.tensor(last, device=device))

    def _decode(self) -> None:
        """One decode forward over rows 0..highest running row; idle rows in between attend to themselves."""
        running = [r for r in self._rows if r is not None]
        span = max(r.row for r in running) + 1
        # Rows of (token, cache position, rotary position, slot): one host-to-device copy per step.
        columns = [[0] * span for _ in range(4)]
        for request in running:
            state = (request.token_ids[-1], request.cache_len, request.rope_next, request.slot)
            for column, value in zip(columns, state, strict=True):
                column[request.row] = value
            request.cache_len += 1
            request.rope_next += 1
        if self.static_decode:
            logits = self._static_step(columns, span, running)
            self._last_batch_size = len(running)
            self._advance(running, logits[[r.row for r in running]])
            return
        tokens, cache_pos, rope_pos, slots = torch.tensor(columns, device=self.device).unbind(0)
        batch = Batch(
            rows=slice(0, span),
            row_index=self._row_ids[:span].unsqueeze(1),
            cache_pos=cache_pos.unsqueeze(1),
            rope_pos=rope_pos.unsqueeze(1),
            kv_len=max(columns[1]) + 1,
            slots=slots,
            lora_rank=self._lora_rank(running),
            any_ia3=self._any_ia3(running),
        )
        embeds = self.decoder.embed(tokens.unsqueeze(1), None)
        logits = self.decoder.forward(embeds, batch, self._zeros[:span])
        self._last_batch_size = len(running)
        self._advance(running, logits[[r.row for r in running]])

    def _static_step(self, columns: list[list[int]], span: int, running: list[RequestHandle]) -> torch.Tensor:
        """One decode step with bucketed shapes: rows and KV length rounded up to powers of two. On
        CUDA each shape (and LoRA width / IA3 use) is captured once as a CUDA graph and replayed; a
        capture that fails or disagrees with eager execution turns graphs off."""
        rows = _bucket(span, 8, self.config.max_batch_size)
        kv_len = _bucket(max(columns[1]) + 1, 64, self.max_context)
        for column in columns:
            column.extend([0] * (rows - span))
        self._static_inputs[:, :rows].copy_(torch.tensor(columns), non_blocking=True)
        lora_rank = self._lora_rank(running)
        any_ia3 = self._any_ia3(running)
        key = (rows, kv_len, lora_rank, any_ia3, self.decoder.layout_version)
        inputs = self._static_inputs[:, :rows]
        batch = Batch(
            rows=slice(0, rows),
            row_index=self._row_ids[:rows].unsqueeze(1),
            cache_pos=inputs[1].unsqueeze(1),
            rope_pos=inputs[2].unsqueeze(1),
            kv_len=kv_len,
            slots=inputs[3],
            lora_rank=lora_rank,
            any_ia3=any_ia3,
        )

        def step() -> torch.Tensor:
            embeds = self.decoder.embed(inputs[0].unsqueeze(1), None)
            return self.decoder.forward(embeds, batch, self._zeros[:rows])

        if not self.cuda_graphs:
            return step()
        if key not in self._graphs:
            self._graphs[key] = self._capture(step)
        captured = self._graphs[key]
        if captured is None:
            return step()
        graph, output = captured
        graph.replay()
        return output

    def _capture(self, step: Callable[[], torch.Tensor]) -> tuple[CUDAGraph, torch.Tensor] | None:
        """Capture one decode step; re-running a step rewrites the same KV entries, so checking the
        replay against eager execution on the same inputs is harmless."""
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                step()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            # thread_local: producer threads may touch CUDA (pinned buffers, generators) meanwhile.
            with torch.cuda.graph(graph, pool=self._graph_pool, capture_error_mode="thread_local"):
                output = step()
            graph.replay()
            replayed = output.clone()
            eager = step()
            agree = torch.equal(replayed.argmax(-1), eager.argmax(-1)) and torch.allclose(
                replayed, eager, atol=1e-2, rtol=1e-2
            )
            if not agree:
                raise RuntimeError("replayed logits differ from eager ones")
        except Exception as err:  # any capture problem: keep serving without graphs
            warnings.warn(
                f"CUDA graphs off, decoding eagerly: {str(err).splitlines()[0][:160]}", stacklevel=2
            )
            self.cuda_graphs = False
            self._graphs.clear()
            return None
        return graph, output

    def _virtual_count(self, request: RequestHandle) -> int:
        native = request.adapter.native if request.slot else None
        return (
            native.virtual_tokens.shape[0] if native is not None and native.virtual_tokens is not None else 0
        )

    @staticmethod
    def _any_ia3(requests: list[RequestHandle]) -> bool:
        return any(r.slot and r.adapter.native.ia3 for r in requests)

    def _lora_rank(self, requests: list[RequestHandle]) -> int:
        return max((self.decoder.slot_rank[r.slot] for r in requests), default=0)

    def _advance(self, requests: list[RequestHandle], logits: torch.Tensor) -> None:
        tokens = _sample(logits, requests, self._sampler)
        for request, token in zip(requests, tokens, strict=True):
            room = self.max_context - request.prompt_end + 1
            try:
                finished = request.accept(token, self._decode_text, self.eos_ids, room)
            except Exception as err:  # a failing stream callback ends its own request only
                self._leave(request)
                request.fail(err)
                continue
            if finished:
                self._leave(request)

    def _decode_text(self, token_ids: list[int]) -> str:
        with self._tokenizer_lock:
            return self.tokenizer.decode(token_ids, skip_special_tokens=True)


def _bucket(size: int, smallest: int, largest: int) -> int:
    """``size`` rounded up to a power of two (at least ``smallest``), but never above ``largest``."""
    return min(largest, max(smallest, 1 << (size - 1).bit_length()))


def _sample(logits: torch.Tensor, requests: list[RequestHandle], shared: torch.Generator) -> list[int]:
    """Greedy rows take the argmax; sampling rows filter by top-k/top-p and race exponential noise.

    Each seeded request draws its noise from its own generator, so its tokens do not depend on
    which other requests share its batch.
    """
    greedy = logits.argmax(dim=-1)
    sampling = [i for i, r in enumerate(requests) if r.params.temperature > 0]
    if not sampling:
        return greedy.tolist()
    picked = logits[sampling]
    device = logits.device
    temperature = torch.tensor([requests[i].params.temperature for i in sampling], device=device)
    top_k = torch.tensor([requests[i].params.top_k or logits.shape[-1] for i in sampling], device=device)
    top_p = torch.tensor([requests[i].params.top_p for i in sampling], device=device)
    scaled = picked / temperature.unsqueeze(1)
    ordered, order = scaled.sort(dim=-1, descending=True)
    rank = torch.arange(ordered.shape[-1], device=device).unsqueeze(0)
    probs = ordered.softmax(dim=-1)
    keep = (rank < top_k.unsqueeze(1)) & (probs.cumsum(dim=-1) - probs < top_p.unsqueeze(1))
    filtered = torch.full_like(scaled, float("-inf")).scatter(
        1, order, ordered.masked_fill(~keep, float("-inf"))
    )
    noise = torch.stack(
        [
            torch.empty(logits.shape[-1], device=device).exponential_(
                generator=requests[i].generator or shared
            )
            for i in sampling
        ]
    )
    choice = (filtered.softmax(dim=-1) / noise).argmax(dim=-1)
    tokens = greedy.clone()
    tokens[sampling] = choice
    return tokens.tolist()
