"""The fast engine: many producer threads submit requests; one stepping thread batches them continuously.

Follow one token: ``submit`` (``serving.py``) tokenizes the prompt and queues it; ``_step`` admits
queued requests into free batch rows (loading their adapters into device slots) and prefills them
in one forward beside the running rows' next tokens (``runtime/batch.py`` packs them), or else runs
one decode forward over every running row; ``Sampler.sample`` (``sampling.py``) processes each row's
logits with its own parameters and grammar mask, and picks its next token; ``RequestHandle.accept``
streams it, checks EOS, stop strings and limits; finished rows leave the batch before the next step.
The forward itself is ``SlottedDecoder.forward`` in ``model.py``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from adapterhub.contract import BaseModules
from adapterhub.errors import UserError
from adapterhub.models import ModelSpec, load_config, load_model, load_tokenizer
from adapterhub.runtime.adapters import Capacity, NativeAdapter, load_native
from adapterhub.runtime.api import GenerationRequest, RequestError
from adapterhub.runtime.batch import AttentionGroup, Batch, RowInput
from adapterhub.runtime.families import family_for
from adapterhub.runtime.host_memory import keep_freed_memory
from adapterhub.runtime.model import SlottedDecoder
from adapterhub.runtime.sampling import prompt_logprobs
from adapterhub.runtime.serving import DEFAULT_MAX_CONTEXT, EngineConfig, RequestHandle, ServingEngine
from adapterhub.runtime.slots import RegisteredAdapter, SlotPool

CUDAGraph = torch.cuda.CUDAGraph
__all__ = ["Engine", "EngineConfig", "RequestHandle"]


class Engine(ServingEngine):
    """One base model, many adapters of every PEFT family, one continuously batched decode loop."""

    backend = "fast multi-adapter runtime"

    def __init__(self, config: EngineConfig) -> None:
        super().__init__(config)
        if self.device == "cpu":
            keep_freed_memory()
        family = family_for(load_config(config.base), config.base)
        self.model = load_model(ModelSpec(config.base, self.quantization, config.dtype, device=self.device))
        self.model.eval()
        self.dtype = self.model.model.embed_tokens.weight.dtype
        model_config = self.model.config
        self.max_context = min(
            model_config.max_position_embeddings, config.max_context or DEFAULT_MAX_CONTEXT
        )
        self.decoder = SlottedDecoder(
            self.model,
            family,
            num_slots=config.max_adapters + 1,
            max_rank=config.max_lora_rank,
            max_virtual_tokens=config.max_virtual_tokens,
            max_trainable_tokens=config.max_trainable_tokens,
            max_batch=config.max_batch_size,
            max_context=self.max_context,
            dtype=self.dtype,
            device=self.device,
        )
        self.pool = SlotPool(self.decoder)
        self.modules = BaseModules(model_config)  # PEFT's module plans for adapters on this base
        self._set_vocabulary(load_tokenizer(config.base), self.model, model_config.vocab_size)
        self._rows: list[RequestHandle | None] = [None] * config.max_batch_size
        self._merge_saved: dict | None = None
        if config.static_decode not in ("auto", "on", "off"):
            raise UserError(f"static_decode '{config.static_decode}': use auto, on or off")
        on_cuda = self.device.startswith("cuda")
        self.static_decode = config.static_decode == "on" or (config.static_decode == "auto" and on_cuda)
        self.cuda_graphs = self.static_decode and on_cuda
        self._graphs: dict[tuple, tuple[CUDAGraph, torch.Tensor] | None] = {}
        self._graph_pool = torch.cuda.graph_pool_handle() if self.cuda_graphs else None
        self._static_inputs = torch.zeros(4, config.max_batch_size, dtype=torch.long, device=self.device)
        self._row_ids = torch.arange(config.max_batch_size, device=self.device)

    # -- adapters --------------------------------------------------------------------------------

    def _load(self, folder: Path) -> tuple[NativeAdapter, str, int | None, int | None]:
        capacity = Capacity(
            self.config.max_lora_rank, self.config.max_virtual_tokens, self.config.max_trainable_tokens
        )
        native = load_native(
            folder,
            self.decoder.shape,
            self.modules,
            self.decoder,
            capacity,
            dtype=self.dtype,
            pin=self.device.startswith("cuda"),
        )
        return native, native.method, native.rank, native.num_virtual_tokens

    def _release(self, adapter: RegisteredAdapter) -> None:
        self.pool.release_if_removed(adapter)

    def make_resident(self, name: str) -> int:
        """Load a registered adapter into a device slot now (the bench times this); returns the slot."""
        with self._step_lock:
            slot = self.pool.acquire(self._lookup(name))
        if slot is None:
            raise RequestError("all device slots are busy with running requests: retry later", "overloaded")
        return slot

    def _active(self) -> list[RequestHandle]:
        return [r for r in self._rows if r is not None]

    def cpu_tier_bytes(self) -> int:
        """What the registered adapters' packed CPU-tier buffers hold."""
        with self._lock:
            buffers = [adapter.native.flat for adapter in self._adapters.values()]
        return sum(flat.numel() * flat.element_size() for flat in buffers)

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
                if not adapter.native.mergeable:
                    raise RequestError(
                        f"merge folds LoRA or IA3 on projections only, '{name}' is {adapter.info.method}"
                        " (or adapts the embedding): serve it unmerged",
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

    def _step(self, admit: bool = True) -> None:
        with self._step_lock:
            self._retire_cancelled()
            admitted = self._admit() if admit else []
            try:
                if admitted:
                    self._prefill(admitted)
                elif any(r is not None for r in self._rows):
                    self._decode()
            except Exception as err:  # a failed forward fails its requests, not the engine
                for request in [r for r in self._rows if r is not None]:
                    self._leave(request)
                    request.fail(err)

    def _retire_cancelled(self) -> None:
        for request in self._take_cancelled():
            request.finish("cancelled")
        for request in [r for r in self._rows if r is not None and r.cancelled]:
            self._leave(request)
            request.finish("cancelled")

    def _admit(self, limit: int | None = None) -> list[RequestHandle]:
        admitted: list[RequestHandle] = []
        with self._lock:
            decoding = any(r is not None for r in self._rows)
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
                    if decoding and not self.decoder.loads.ready(slot):
                        break  # its load overlaps the running rows' next step; admitted once landed
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
            self.sampler.leave(request.row)
        if request.adapter is not None and request.slot:
            request.adapter.users -= 1
            self.pool.release_if_removed(request.adapter)

    def _prefill(self, requests: list[RequestHandle]) -> None:
        """One forward over the new rows' prompts and, packed beside them, every running row's next
        token (as vLLM's chunked prefill does), so an arrival costs no forward of its own."""
        decoding = [r for r in self._rows if r is not None and r not in requests]
        for request in requests:
            self.sampler.seat(
                request.row, request.params, request.prompt_ids, request.matcher is not None, self.eos_ids
            )
        logits = self._prefill_logits(requests, decoding)
        self._last_batch_size = len(decoding) + len(requests)
        generating = list(range(len(decoding)))
        for index, request in enumerate(requests, start=len(decoding)):
            if request.params.max_tokens == 0:  # scored, nothing to generate
                self._leave(request)
                request.finish("length")
            else:
                generating.append(index)
        if generating:
            rows = [*decoding, *requests]
            self._advance([rows[i] for i in generating], logits[generating])

    def _prefill_logits(
        self, requests: list[RequestHandle], decoding: list[RequestHandle] | None = None
    ) -> torch.Tensor:
        """One forward over the new rows' prompts (a prompt adapter's K/V copied ahead of them) and
        the ``decoding`` rows' next tokens.

        Returns the last-position logits of each decoding row, then of each new row; new rows that
        asked for prompt logprobs also get them (``request.prompt_logprobs``), from the logits at
        every prompt position.
        """
        decoding = decoding or []
        inputs = [self._next_token(request) for request in decoding]
        for request in requests:
            native = request.adapter.native if request.slot else None
            # Virtual tokens (positions 0..n-1 in PEFT) and a prefix (which PEFT's positions continue
            # after) both sit in the slot's prefix K/V, computed or saved (``SlottedDecoder``).
            offset = (native.num_virtual_tokens or 0) if native is not None else 0
            ids = request.prompt_ids
            # Echo rows: every prompt position (each predicts the next prompt token, the last one
            # the first generated token); other rows: the last position only.
            echo = request.params.prompt_logprobs is not None
            picks = tuple(range(len(ids))) if echo else (len(ids) - 1,)
            inputs.append(RowInput(request.row, request.slot, ids, offset, offset, picks, prefix=offset))
            request.cache_len = request.prompt_end = request.rope_next = offset + len(ids)
        self.decoder.loads.wait(request.slot for request in requests)
        logits = self.decoder.forward(self.decoder.pack(inputs))
        if all(request.params.prompt_logprobs is None for request in requests):
            return logits
        ends, start = list(range(len(decoding))), len(decoding)
        for request in requests:
            end = start + (len(request.prompt_ids) if request.params.prompt_logprobs is not None else 1)
            if request.params.prompt_logprobs is not None:
                top = request.params.prompt_logprobs
                request.prompt_logprobs = prompt_logprobs(logits[start : end - 1], request.prompt_ids, top)
            ends.append(end - 1)
            start = end
        return logits[ends]

    def _next_token(self, request: RequestHandle) -> RowInput:
        """A running row's part of a forward: its last token, at its next cache position."""
        row = RowInput(
            request.row, request.slot, [request.token_ids[-1]], request.cache_len, request.rope_next, (0,)
        )
        request.cache_len += 1
        request.rope_next += 1
        return row

    def _decode(self) -> None:
        """One decode forward over every running row."""
        running = [r for r in self._rows if r is not None]
        self._last_batch_size = len(running)
        if self.static_decode:
            logits = self._static_step(running)
            self._advance(running, logits[[r.row for r in running]])
            return
        logits = self.decoder.forward(self.decoder.pack([self._next_token(r) for r in running]))
        self._advance(running, logits.clone())  # the sampler edits logits in place, outside inference mode

    def _static_step(self, running: list[RequestHandle]) -> torch.Tensor:
        """One decode step over rows 0..highest running row with bucketed shapes: rows and KV length
        rounded up to powers of two; idle rows attend to themselves. On CUDA each shape (and LoRA
        width / IA3 use) is captured once as a CUDA graph and replayed; a capture that fails or
        disagrees with eager execution turns graphs off. Returns logits of every replayed row."""
        span = max(r.row for r in running) + 1
        # Rows of (token, cache position, rotary position, slot): one host-to-device copy per step.
        columns = [[0] * span for _ in range(4)]
        for request in running:
            state = (request.token_ids[-1], request.cache_len, request.rope_next, request.slot)
            for column, value in zip(columns, state, strict=True):
                column[request.row] = value
            request.cache_len += 1
            request.rope_next += 1
        rows = _bucket(span, 8, self.config.max_batch_size)
        kv_len = _bucket(max(columns[1]) + 1, 64, self.max_context)
        for column in columns:
            column.extend([0] * (rows - span))
        self._static_inputs[:, :rows].copy_(torch.tensor(columns), non_blocking=True)
        inputs = self._static_inputs[:, :rows]
        adapters = self.decoder.adapter_rows(columns[3], static_slots=inputs[3])
        key = (rows, kv_len, adapters.key, self.decoder.layout_version)
        group = AttentionGroup(slice(0, rows), rows, 1, None, None, inputs[1].unsqueeze(1), kv_len)
        batch = Batch(
            token_ids=inputs[0],
            token_rows=self._row_ids[:rows],
            cache_pos=inputs[1],
            rope_pos=inputs[2].unsqueeze(0),
            groups=(group,),
            adapters=adapters,
            picks=None,
            pick_adapters=adapters,
        )

        def step() -> torch.Tensor:
            return self.decoder.forward(batch)

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

    def _advance(self, requests: list[RequestHandle], logits: torch.Tensor) -> None:
        tokens, logprobs = self.sampler.sample(logits, requests)
        for request, token, logprob in zip(requests, tokens, logprobs, strict=True):
            room = self.max_context - request.prompt_end + 1
            try:
                finished = request.accept(token, logprob, self._decode_text, self.eos_ids, room)
            except Exception as err:  # a failing stream callback or grammar ends its own request only
                self._leave(request)
                request.fail(err)
                continue
            if finished:
                self._leave(request)


def _bucket(size: int, smallest: int, largest: int) -> int:
    """``size`` rounded up to a power of two (at least ``smallest``), but never above ``largest``."""
    return min(largest, max(smallest, 1 << (size - 1).bit_length()))
