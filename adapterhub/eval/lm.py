"""lm-eval's ``LM`` on an adapterhub Engine, in-process: ``EngineLM`` is one adapter (or the base).

Each ``EngineLM`` tokenizes, truncates and scores exactly as lm-eval's own ``hf`` model (``HFLM``)
does, so its numbers are the ones ``lm_eval --model hf --model_args peft=ADAPTER`` reports. The work
goes through a shared ``RequestRunner``: when lm-eval asks one adapter for answers, the runner
computes the same requests for every adapter it holds, interleaved so that each engine batch mixes
them, and keeps the answers; lm-eval's pass over the next adapter then finds them all done.
"""

from __future__ import annotations

import copy
import json
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from lm_eval import utils as lm_eval_utils
from lm_eval.api.model import TemplateLM
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text

from adapterhub.errors import UserError
from adapterhub.runtime.api import GenerationRequest, GenerationResult, RequestError, SamplingParams

if TYPE_CHECKING:
    from lm_eval.api.instance import Instance

    from adapterhub.runtime.serving import ServingEngine

KINDS = ("loglikelihood", "loglikelihood_rolling", "generate_until")
DEFAULT_MAX_GEN_TOKS = 256  # HFLM's max_gen_toks
SAMPLING_SEED = 1234  # lm-eval's default seed; sampled generations are seeded from it, so reruns agree
# Generation kwargs an lm-eval task may set that this model honours (after lm-eval's own
# normalize_gen_kwargs, which folds max_new_tokens & co. into max_gen_toks); any other is refused.
HONOURED_GEN_KWARGS = ("until", "max_gen_toks", "do_sample", "temperature", "top_p", "top_k")
DEFAULT_WINDOW = 128  # engine requests in flight at once: enough to fill batches, within its queue


@dataclass
class Job:
    """Engine requests that answer some lm-eval requests for one adapter, and how to read the results."""

    requests: list[GenerationRequest]
    answer: Callable[[list[GenerationResult]], list]


class EngineLM(TemplateLM):
    """One adapter (``None``: the base) of ``engine`` as an lm-eval model."""

    def __init__(
        self,
        engine: ServingEngine,
        adapter: str | None = None,
        runner: RequestRunner | None = None,
        *,
        add_bos_token: bool | None = None,
    ) -> None:
        super().__init__()
        self.engine = engine
        self.adapter = adapter
        self.runner = runner or RequestRunner(engine)
        self.tokenizer = self.runner.tokenizer
        self.add_bos_token = add_bos_token  # as HFLM's: None keeps the tokenizer's own default
        virtual = 0
        if adapter is not None:
            info = next((a for a in engine.list() if a.name == adapter), None)
            if info is None:
                raise UserError(f"adapter '{adapter}' is not registered with the engine: register it first")
            virtual = info.num_virtual_tokens or 0
        # HFLM scores windows of max_length + 1 tokens; the engine holds a prompt and the adapter's
        # virtual tokens below its context, so the longest window here is one shorter than that room.
        self.max_length = engine.max_context - 2 - virtual
        self.runner.add(self)

    @property
    def name(self) -> str:
        return self.adapter or "base"

    # -- lm-eval's API --------------------------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.eos_token_id

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.name_or_path.replace("/", "__")

    def tok_encode(
        self, string: str, add_special_tokens: bool | None = None, left_truncate_len: int | None = None, **_
    ) -> list[int]:
        """HFLM's ``tok_encode``: the tokenizer's special tokens unless told, none before a literal BOS."""
        if add_special_tokens is not None:
            special = {"add_special_tokens": add_special_tokens}
        elif self.add_bos_token is not None:
            special = {"add_special_tokens": self.add_bos_token}
        else:
            special = {}
        if add_special_tokens is None and string.startswith(self.tokenizer.decode(self.prefix_token_id)):
            special["add_special_tokens"] = False
        encoding = self.tokenizer.encode(string, **special)
        return encoding[-left_truncate_len:] if left_truncate_len else encoding

    def apply_chat_template(
        self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True
    ) -> str:
        """HFLM's: the tokenizer's chat template, continuing the last message when not adding a turn."""
        import jinja2

        def render(history: list[dict[str, str]]) -> str:
            return self.tokenizer.apply_chat_template(
                history,
                tokenize=False,
                add_generation_prompt=add_generation_prompt,
                continue_final_message=not add_generation_prompt,
            )

        try:
            return render(chat_history)
        except jinja2.exceptions.TemplateError:
            # As HFLM does: templates that refuse a system turn get the history without it.
            return render([message for message in chat_history if message["role"] != "system"])

    def loglikelihood(self, requests: list[Instance], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        return self.runner.answer(self, "loglikelihood", requests)

    def loglikelihood_rolling(self, requests: list[Instance], disable_tqdm: bool = False) -> list[float]:
        return self.runner.answer(self, "loglikelihood_rolling", requests)

    def generate_until(self, requests: list[Instance], disable_tqdm: bool = False) -> list[str]:
        return self.runner.answer(self, "generate_until", requests)

    def _loglikelihood_tokens(
        self, requests: list[tuple[tuple[str, str], list[int], list[int]]], **_
    ) -> list[tuple[float, bool]]:
        pairs = [(context, continuation) for _, context, continuation in requests]
        return self.runner.run([self._score(pairs)])[0]

    # -- jobs -----------------------------------------------------------------------------------

    def plan(self, kind: str, requests: Sequence[Instance], occurrences: Sequence[int]) -> Job:
        """The engine requests answering ``requests`` (all of one ``kind``) for this adapter;
        ``occurrences`` counts each request's earlier identical ones (it seeds repeated samples)."""
        if kind == "loglikelihood":
            return self._score([self._encode_request(*request.args) for request in requests])
        if kind == "loglikelihood_rolling":
            return self._rolling([request.args[0] for request in requests])
        return self._generate(requests, occurrences)

    def _encode_request(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """TemplateLM.loglikelihood's split: an empty context becomes the prefix token (BOS or EOS)."""
        if context:
            return self._encode_pair(context, continuation)
        tokens = self.tok_encode(continuation, add_special_tokens=False)
        if self.prefix_token_id != tokens[0]:
            return [self.prefix_token_id], tokens
        return tokens[:1], tokens[1:]

    def _score(self, pairs: list[tuple[list[int], list[int]]]) -> Job:
        """Each continuation's summed logprob after its context, and whether greedy decoding gives it:
        the prompt scored by the engine (no generation), left-truncated as HFLM truncates."""
        requests = []
        for context, continuation in pairs:
            if len(continuation) > self.max_length:
                raise UserError(
                    f"a continuation of {len(continuation)} tokens does not fit {self.name}'s "
                    f"{self.max_length}-token window: use a base with a longer context"
                )
            window = (context + continuation)[-(self.max_length + 1) :]
            params = SamplingParams(max_tokens=0, prompt_logprobs=1)
            requests.append(GenerationRequest(window, adapter=self.adapter, params=params))

        def answer(results: list[GenerationResult]) -> list[tuple[float, bool]]:
            scored = []
            for (_, continuation), result in zip(pairs, results, strict=True):
                positions = result.prompt_logprobs[-len(continuation) :]
                total = sum(position.logprob for position in positions)
                greedy = all(position.top[0][0] == position.token_id for position in positions)
                scored.append((total, greedy))
            return scored

        return Job(requests, answer)

    def _rolling(self, strings: list[str]) -> Job:
        """HFLM's rolling loglikelihood: disjoint windows of the whole text after the prefix token."""
        windows, owners = [], []
        for index, string in enumerate(strings):
            for window in lm_eval_utils.get_rolling_token_windows(
                token_list=self.tok_encode(string),
                prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length,
                context_len=1,
            ):
                windows.append(lm_eval_utils.make_disjoint_window(window))
                owners.append(index)
        scored = self._score(windows)

        def answer(results: list[GenerationResult]) -> list[float]:
            totals = [0.0] * len(strings)
            for owner, (logprob, _) in zip(owners, scored.answer(results), strict=True):
                totals[owner] += logprob
            return totals

        return Job(scored.requests, answer)

    def _generate(self, requests: Sequence[Instance], occurrences: Sequence[int]) -> Job:
        """HFLM's generate_until: the context left-truncated to leave room for max_gen_toks, stopped at
        the first of ``until`` (and EOS), the text cut there."""
        eos = self.tokenizer.decode([self.eot_token_id], skip_special_tokens=False)
        engine_requests, stops = [], []
        for request, occurrence in zip(requests, occurrences, strict=True):
            context, gen_kwargs = request.args
            kwargs = dict(normalize_gen_kwargs(gen_kwargs, DEFAULT_MAX_GEN_TOKS))
            refused = sorted(set(kwargs) - set(HONOURED_GEN_KWARGS))
            if refused:
                raise UserError(
                    f"task {request.task_name}: generation_kwargs '{refused[0]}' is not supported by "
                    f"adapterhub eval (it honours {', '.join(HONOURED_GEN_KWARGS)}): remove it from the task"
                )
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
            max_gen_toks = kwargs["max_gen_toks"]
            if max_gen_toks >= self.max_length:
                raise UserError(
                    f"task {request.task_name}: max_gen_toks {max_gen_toks} leaves no room for a prompt in "
                    f"{self.name}'s {self.max_length}-token window"
                )
            sampled = bool(kwargs["do_sample"]) and float(kwargs.get("temperature", 1.0)) > 0
            params = SamplingParams(
                max_tokens=max_gen_toks,
                temperature=float(kwargs.get("temperature", 1.0)) if sampled else 0.0,
                top_p=float(kwargs.get("top_p", 1.0)) if sampled else 1.0,
                top_k=int(kwargs.get("top_k", 0)) if sampled else 0,
                # Identical sampled requests (a task's repeats) draw different samples, reproducibly.
                seed=SAMPLING_SEED + occurrence if sampled else None,
                **self._stops(until),
            )
            prompt = self._context_ids(context, self.max_length - max_gen_toks)
            engine_requests.append(GenerationRequest(prompt, adapter=self.adapter, params=params))
            stops.append(until)

        def answer(results: list[GenerationResult]) -> list[str]:
            return [
                postprocess_generated_text(result.text, until, None)
                for result, until in zip(results, stops, strict=True)
            ]

        return Job(engine_requests, answer)

    def _context_ids(self, context: str, room: int) -> list[int]:
        """HFLM's ``tok_batch_encode`` of one context: no special tokens before a literal BOS."""
        bos = self.tokenizer.bos_token
        if bos is not None and context.startswith(bos):
            ids = self.tokenizer(context, add_special_tokens=False)["input_ids"]
        elif self.add_bos_token is not None:
            ids = self.tokenizer(context, add_special_tokens=self.add_bos_token)["input_ids"]
        else:
            ids = self.tokenizer(context)["input_ids"]
        return ids[-room:]

    def _stops(self, until: list[str]) -> dict[str, tuple]:
        """Stop strings, except that a special token's text becomes its id: decoded output skips
        special tokens, so their text never appears to stop on (HF's stopping criteria see it)."""
        tokenizer = self.tokenizer
        special = {token.content: i for i, token in tokenizer.added_tokens_decoder.items() if token.special}
        special.update(zip(tokenizer.all_special_tokens, tokenizer.all_special_ids, strict=True))
        texts = tuple(term for term in until if term and term not in special)
        return {"stop": texts, "stop_token_ids": tuple(special[term] for term in until if term in special)}


class RequestRunner:
    """Answers lm-eval requests for several ``EngineLM`` on one engine, mixing adapters in batches.

    Answers are kept per (adapter, kind, request): lm-eval evaluates one model at a time, and the
    first adapter's requests are computed for all adapters at once.
    """

    def __init__(
        self,
        engine: ServingEngine,
        *,
        window: int = DEFAULT_WINDOW,
        on_progress: Callable[[int, int], None] | None = None,
    ) -> None:
        self.engine = engine
        self.window = window
        self.on_progress = on_progress  # (done, total) of the engine requests of the current run
        # The engine decodes with its own tokenizer on its own thread; encoding here uses a copy.
        self.tokenizer = copy.deepcopy(engine.tokenizer)
        self.models: list[EngineLM] = []
        self._answers: dict[tuple[str | None, str], dict[Any, Any]] = {}

    def add(self, model: EngineLM) -> None:
        self.models.append(model)

    def answer(self, model: EngineLM, kind: str, requests: list[Instance]) -> list:
        keys = _request_keys(kind, requests)
        if any(key not in self._answers.get((model.adapter, kind), {}) for key in keys):
            jobs, stores = [], []
            for other in self.models:
                known = self._answers.setdefault((other.adapter, kind), {})
                todo = {key: request for key, request in zip(keys, requests, strict=True) if key not in known}
                if todo:
                    occurrences = [key[1] if kind == "generate_until" else 0 for key in todo]
                    jobs.append(other.plan(kind, list(todo.values()), occurrences))
                    stores.append((known, list(todo)))
            for answers, (known, todo_keys) in zip(self.run(jobs), stores, strict=True):
                known.update(zip(todo_keys, answers, strict=True))
        known = self._answers[(model.adapter, kind)]
        return [known[key] for key in keys]

    def run(self, jobs: list[Job]) -> list[list]:
        """Every job's answers; their requests submitted interleaved, at most ``window`` in flight."""
        order = [
            (job, index)
            for index in range(max((len(job.requests) for job in jobs), default=0))
            for job in range(len(jobs))
            if index < len(jobs[job].requests)
        ]
        results: list[list[GenerationResult | None]] = [[None] * len(job.requests) for job in jobs]
        in_flight: deque = deque()
        done = 0

        def collect() -> None:
            nonlocal done
            job, index, handle = in_flight.popleft()
            results[job][index] = _result(handle, jobs[job].requests[index])
            done += 1
            if self.on_progress is not None:
                self.on_progress(done, len(order))

        for job, index in order:
            while len(in_flight) >= self.window:
                collect()
            while True:
                try:
                    handle = self.engine.submit(jobs[job].requests[index])
                    break
                except RequestError as err:
                    if err.code != "overloaded" or not in_flight:
                        raise _failed(jobs[job].requests[index], err) from err
                    collect()  # the engine's queue is full: make room
            in_flight.append((job, index, handle))
        while in_flight:
            collect()
        return [job.answer(done_results) for job, done_results in zip(jobs, results, strict=True)]


def _request_keys(kind: str, requests: Sequence[Instance]) -> list:
    if kind != "generate_until":
        return [request.args for request in requests]
    # A repeated sampled request is a new sample, so generations are told apart by occurrence.
    seen: Counter[str] = Counter()
    keys = []
    for request in requests:
        key = _key(request.args)
        keys.append((key, seen[key]))
        seen[key] += 1
    return keys


def _key(args: tuple) -> str:
    return json.dumps(args, sort_keys=True, default=str)


def _result(handle: Any, request: GenerationRequest) -> GenerationResult:
    try:
        return handle.result()
    except RequestError as err:
        raise _failed(request, err) from err


def _failed(request: GenerationRequest, err: RequestError) -> UserError:
    return UserError(f"evaluating {request.adapter or 'base'}: the engine refused a request: {err}")
