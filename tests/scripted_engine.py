"""A scriptable engine behind the real server app, for transport-level tests of the server and of
remote chat.

``ScriptedEngine`` keeps the Engine contract's surface with a real tokenizer but fixed replies and
a gate, so disconnects, full queues, shutdown, streaming and Ctrl-C can be driven deterministically;
everything about what a model generates is tested against the real ``Engine``
(server/test_server_engine.py, chat/test_local_engine.py).
"""

from __future__ import annotations

import itertools
import json
import threading
import time
from collections.abc import Callable
from pathlib import Path

from adapterhub.runtime.api import AdapterInfo, GenerationRequest, GenerationResult, RequestError
from adapterhub.runtime.vocabulary import Vocabulary

REPLY_WORDS = ("good", "fast", "clean", "happy", "fresh")


def wait_until(condition: Callable[[], object], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


class ScriptedHandle:
    def __init__(self, request: GenerationRequest, reply_ids: list[int]) -> None:
        self.request = request
        self.reply_ids = reply_ids
        self.cancelled = threading.Event()
        self.finished = threading.Event()
        self.outcome: GenerationResult | RequestError | None = None

    @property
    def done(self) -> bool:
        return self.finished.is_set()

    def cancel(self) -> None:
        self.cancelled.set()

    def result(self, timeout: float | None = None) -> GenerationResult:
        if not self.finished.wait(timeout):
            raise TimeoutError
        if isinstance(self.outcome, Exception):
            raise self.outcome
        assert self.outcome is not None
        return self.outcome


class ScriptedEngine:
    """Replies ``"<adapter or base> <words>..."`` (stop strings ignored); from token ``hold_after`` on a
    reply waits while ``gate`` is clear."""

    backend = "scripted engine (tests)"
    seq2seq = False

    def __init__(self, tokenizer, base_name: str = "builtin:tiny-llama") -> None:
        self.tokenizer = tokenizer
        self.base_name = base_name
        self.max_context = 64
        self.vocab_size = len(tokenizer)
        self.vocabulary = Vocabulary(tokenizer, self.vocab_size, {tokenizer.eos_token_id})
        self.max_queue = 1000
        self.gate = threading.Event()
        self.gate.set()
        self.hold_after = 0
        self.adapters: dict[str, AdapterInfo] = {}
        self.handles: list[ScriptedHandle] = []
        self.fail_next: Exception | None = None  # the next generation fails with it (a RequestError or a bug)
        self.adapter_gates: dict[str | None, threading.Event] = {}  # per-adapter gates instead of ``gate``
        self.broken: Exception | None = None  # raised by submit, as a bug would be

    def register(self, name: str, spec: str) -> AdapterInfo:
        """``spec`` is a family name, or a folder whose adapter_config.json names one."""
        config = Path(spec) / "adapter_config.json"
        method = json.loads(config.read_text())["peft_type"].lower() if config.is_file() else spec
        info = AdapterInfo(name=name, method=method, source=spec, base_model=self.base_name, rank=8)
        self.adapters[name] = info
        return info

    def unregister(self, name: str) -> None:
        if self.adapters.pop(name, None) is None:
            raise RequestError(f"unknown adapter '{name}'", "unknown_adapter")

    def list(self) -> list[AdapterInfo]:
        return list(self.adapters.values())

    def stats(self) -> dict:
        running = sum(not h.done for h in self.handles)
        return {
            "queue_depth": 0,
            "running": running,
            "last_batch_size": running,
            "adapter_loads": 3,
            "adapter_evictions": 1,
            "merged": None,
        }

    def reply_ids(self, adapter: str | None, prompt_ids: list[int], max_tokens: int) -> list[int]:
        words = itertools.islice(itertools.cycle(REPLY_WORDS), len(prompt_ids) % 5, None)
        text = " ".join([adapter or "base", *itertools.islice(words, max_tokens)])
        return self.tokenizer(text, add_special_tokens=False).input_ids[:max_tokens]

    def reply_text(self, adapter: str | None, prompt_ids: list[int], max_tokens: int) -> str:
        return self.tokenizer.decode(self.reply_ids(adapter, prompt_ids, max_tokens))

    def submit(self, request: GenerationRequest) -> ScriptedHandle:
        if self.broken is not None:
            raise self.broken
        if request.adapter is not None and request.adapter not in self.adapters:
            raise RequestError(f"unknown adapter '{request.adapter}': list them", "unknown_adapter")
        ids = request.prompt if isinstance(request.prompt, list) else self.tokenizer(request.prompt).input_ids
        if len(ids) + request.params.max_tokens > self.max_context:
            raise RequestError("prompt too long", "prompt_too_long")
        if sum(not h.done for h in self.handles) >= self.max_queue:
            raise RequestError("queue full", "overloaded")
        handle = ScriptedHandle(request, self.reply_ids(request.adapter, ids, request.params.max_tokens))
        self.handles.append(handle)
        threading.Thread(target=self._generate, args=(handle, len(ids)), daemon=True).start()
        return handle

    def _generate(self, handle: ScriptedHandle, prompt_tokens: int) -> None:
        text, ids = "", []
        finish = "length" if len(handle.reply_ids) == handle.request.params.max_tokens else "stop"
        for index, token_id in enumerate(handle.reply_ids):
            if not self._wait_for_gate(handle, index):
                finish = "cancelled"
                break
            if self.fail_next is not None:
                handle.outcome, self.fail_next = self.fail_next, None
                handle.finished.set()
                return
            ids.append(token_id)
            delta = self.tokenizer.decode(ids)[len(text) :]
            text += delta
            if handle.request.on_token is not None:
                handle.request.on_token(token_id, delta)
        handle.outcome = GenerationResult(text, ids, prompt_tokens, len(ids), finish)
        handle.finished.set()

    def _wait_for_gate(self, handle: ScriptedHandle, index: int) -> bool:
        """False once the request is cancelled."""
        gate = self.adapter_gates.get(handle.request.adapter, self.gate)
        while index >= self.hold_after and not gate.wait(0.01):
            if handle.cancelled.is_set():
                return False
        return not handle.cancelled.is_set()
