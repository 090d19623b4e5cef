"""The PEFT fallback: every base the fast runtime has no family for (MT5/T5 and other encoder-decoders,
GPT-2, OPT, ...), served by plain PEFT behind the same ``Engine`` interface.

Requests are grouped by adapter and prompt length, so a group runs as one batched PEFT ``generate``
with no padding (exact by construction: padding is where batched PEFT drifts from batch 1, see
prompt tuning's virtual tokens). A group runs to its end before the next starts; a request that
arrives meanwhile waits (no continuous batching). Each group wraps the base with its adapter through
``PeftModel.from_pretrained`` and unwraps it afterwards, so one PeftModel at a time ever touches the
base. Sampling, logit processing, grammars, logprobs, stop strings and streaming are the fast
engine's own (``Sampler``, ``RequestHandle``): a logits processor inside ``generate`` picks each
row's token and a stopping criterion ends each row when its request is done.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from transformers import GenerationConfig, LogitsProcessor, StoppingCriteria

from adapterhub.contract import BaseModules, plan_for_base, read_adapter
from adapterhub.models import ModelSpec, is_seq2seq, load_config, load_model, load_tokenizer, unwrap_peft
from adapterhub.runtime.api import GenerationRequest, RequestError
from adapterhub.runtime.sampling import prompt_logprobs
from adapterhub.runtime.serving import DEFAULT_MAX_CONTEXT, EngineConfig, RequestHandle, ServingEngine
from adapterhub.runtime.slots import RegisteredAdapter


class FallbackEngine(ServingEngine):
    """Plain PEFT, one adapter per batch, for bases without a fast-runtime family."""

    backend = "PEFT fallback: one adapter per batch"

    def __init__(self, config: EngineConfig) -> None:
        super().__init__(config)
        base_config = load_config(config.base)
        self.seq2seq = is_seq2seq(base_config)
        self.model = load_model(ModelSpec(config.base, self.quantization, config.dtype, device=self.device))
        self.model.eval()
        self.dtype = next(self.model.parameters()).dtype
        positions = getattr(self.model.config, "max_position_embeddings", None) or DEFAULT_MAX_CONTEXT
        self.max_context = min(positions, config.max_context or DEFAULT_MAX_CONTEXT)
        self.modules = BaseModules(self.model.config)
        self._set_vocabulary(load_tokenizer(config.base), self.model, self.model.config.vocab_size)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self._group: list[RequestHandle] = []
        self.loads = 0  # PeftModel wraps, one per group with an adapter

    # -- adapters --------------------------------------------------------------------------------

    def _load(self, folder: Path) -> tuple[Path, str, int | None, int | None]:
        adapter = read_adapter(folder)
        plan_for_base(adapter, self.modules)
        config = adapter.config
        rank = config.get("r") if adapter.method == "lora" else None
        virtual = config.get("num_virtual_tokens") if adapter.method not in ("lora", "ia3") else None
        return folder, adapter.method, rank, virtual

    def _check_request(self, handle: RequestHandle) -> None:
        if self.seq2seq and handle.params.prompt_logprobs is not None:
            raise RequestError(
                f"prompt logprobs (echo) score a decoder's prompt; '{self.base_name}' is an encoder-decoder, "
                "whose prompt is the encoder's input: leave echo out",
                "bad_request",
            )

    def make_resident(self, name: str) -> int:
        raise RequestError(
            f"the {self.backend} holds no adapter resident: each batch loads its own", "bad_request"
        )

    def _active(self) -> list[RequestHandle]:
        return list(self._group)

    def stats(self) -> dict:
        with self._lock:
            return {
                "queue_depth": len(self._waiting),
                "running": len(self._group),
                "last_batch_size": self._last_batch_size,
                "adapter_loads": self.loads,
                "adapter_evictions": 0,
                "merged": None,
            }

    # -- the loop ----------------------------------------------------------------------------------

    def _step(self) -> None:
        with self._step_lock:
            for request in self._take_cancelled():
                request.finish("cancelled")
            group = self._next_group()
            if not group:
                return
            self._group = group
            try:
                self._run(group)
            except Exception as err:  # a failed generate fails its group, not the engine
                for request in group:
                    if not request.done:
                        request.fail(err)
            finally:
                for index in range(len(group)):
                    self.sampler.leave(index)
                self._group = []

    def _next_group(self) -> list[RequestHandle]:
        """The oldest queued request and every queued one with the same adapter and prompt length."""
        with self._lock:
            while self._waiting and self._waiting[0].adapter is not None and self._waiting[0].adapter.removed:
                request = self._waiting.popleft()
                request.fail(
                    RequestError(f"adapter '{request.adapter.info.name}' was unregistered", "unknown_adapter")
                )
            if not self._waiting:
                return []
            first = self._waiting[0]
            group = [
                r
                for r in self._waiting
                if r.adapter is first.adapter and len(r.prompt_ids) == len(first.prompt_ids)
            ][: self.config.max_batch_size]
            for request in group:
                self._waiting.remove(request)
        return group

    def _run(self, group: list[RequestHandle]) -> None:
        adapter = group[0].adapter
        model = self._wrapped(adapter)
        try:
            ids = torch.tensor([r.prompt_ids for r in group], device=self.device)
            mask = torch.ones_like(ids)
            for row, request in enumerate(group):
                request.row = row
                self.sampler.seat(
                    row, request.params, request.prompt_ids, request.matcher is not None, self.eos_ids
                )
            self._last_batch_size = len(group)
            if any(r.params.prompt_logprobs is not None for r in group):
                self._score_prompts(model, ids, mask, group)
            room = (
                self.max_context
                - len(group[0].prompt_ids)
                - ((adapter.info.num_virtual_tokens or 0) if adapter else 0)
            )
            generating = [r for r in group if r.params.max_tokens > 0]
            for request in group:
                if request.params.max_tokens == 0:
                    request.finish("length")
            if not generating:
                return
            steps = max(min(r.params.max_tokens, room) for r in generating)
            picker = _PickTokens(self, group, room)
            settings = GenerationConfig(
                max_new_tokens=steps,
                do_sample=False,
                pad_token_id=self.pad_id,
                eos_token_id=None,
                decoder_start_token_id=getattr(self.model.generation_config, "decoder_start_token_id", None),
            )
            with torch.inference_mode(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model.generate(
                    input_ids=ids,
                    attention_mask=mask,
                    generation_config=settings,
                    logits_processor=[picker],
                    stopping_criteria=[_RowsDone(picker)],
                )
            for request in group:
                if not request.done:  # generate stopped on its step limit: the context is full
                    request.finish("length")
        finally:
            if model is not self.model:
                unwrap_peft(self.model)

    def _wrapped(self, adapter: RegisteredAdapter | None) -> torch.nn.Module:
        """The base wrapped with ``adapter`` by PEFT itself (the base alone for base rows)."""
        if adapter is None:
            return self.model
        from peft import PeftModel

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = PeftModel.from_pretrained(self.model, str(adapter.native)).eval()
        self.loads += 1
        return model

    def _score_prompts(
        self, model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, group: list[RequestHandle]
    ) -> None:
        with torch.inference_mode():
            logits = model(input_ids=ids, attention_mask=mask).logits[:, -ids.shape[1] :].float()
        for row, request in enumerate(group):
            top = request.params.prompt_logprobs
            if top is not None:
                request.prompt_logprobs = prompt_logprobs(logits[row, :-1], request.prompt_ids, top)

    # -- exactness checks ------------------------------------------------------------------------

    def score(self, requests: list[GenerationRequest]) -> torch.Tensor:
        """First-step logits (float32, one row per request), each request's adapter alone."""
        rows = []
        with self._step_lock:
            for request in requests:
                handle = self.submit(request)
                with self._lock:
                    self._waiting.remove(handle)
                model = self._wrapped(handle.adapter)
                try:
                    ids = torch.tensor([handle.prompt_ids], device=self.device)
                    extra = {}
                    if self.seq2seq:
                        start = self.model.generation_config.decoder_start_token_id or 0
                        extra["decoder_input_ids"] = torch.tensor([[start]], device=self.device)
                    with torch.inference_mode():
                        output = model(input_ids=ids, attention_mask=torch.ones_like(ids), **extra)
                    rows.append(output.logits[0, -1].float())
                finally:
                    if model is not self.model:
                        unwrap_peft(self.model)
                handle.finish("cancelled")
        return torch.stack(rows)


class _PickTokens(LogitsProcessor):
    """Inside ``generate``: each row's token by the engine's sampler, handed to its request at once.

    The returned scores keep only that token, so ``generate``'s greedy argmax takes it.
    """

    def __init__(self, engine: FallbackEngine, group: list[RequestHandle], room: int) -> None:
        self.engine, self.group, self.room = engine, group, room
        self.done = torch.zeros(len(group), dtype=torch.bool)

    def __deepcopy__(self, memo: dict) -> _PickTokens:
        return self  # PEFT's seq2seq generate deep-copies its kwargs; this object must stay the one

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        engine = self.engine
        for row, request in enumerate(self.group):
            if not self.done[row] and request.cancelled:
                request.finish("cancelled")
                self.done[row] = True
        live = [row for row in range(len(self.group)) if not self.done[row]]
        forced = torch.full_like(scores, float("-inf"))
        if not live:
            forced[:, engine.pad_id] = 0
            return forced
        tokens, logprobs = engine.sampler.sample(scores[live].float(), [self.group[row] for row in live])
        for row, token, logprob in zip(live, tokens, logprobs, strict=True):
            forced[row, token] = 0
            request = self.group[row]
            try:
                self.done[row] = request.accept(
                    token, logprob, engine._decode_text, engine.eos_ids, self.room
                )
            except Exception as err:  # a failing stream callback or grammar ends its own request only
                request.fail(err)
                self.done[row] = True
        for row in range(len(self.group)):
            if self.done[row] and row not in live:
                forced[row, engine.pad_id] = 0
        return forced


class _RowsDone(StoppingCriteria):
    """Ends each row of ``generate`` as soon as its request has finished."""

    def __init__(self, picker: _PickTokens) -> None:
        self.picker = picker

    def __deepcopy__(self, memo: dict) -> _RowsDone:
        return self

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        return self.picker.done.to(input_ids.device).clone()
