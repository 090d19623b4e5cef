"""Per-row logits processing in one mixed batch: logprobs, echo, logit bias, penalties, filters, limits.

Every expected value comes from plain PEFT's teacher-forced logits for that adapter alone (a fresh
base per PeftModel) and, for the processors, from transformers' own logits processors.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch
from transformers import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from adapterhub.runtime.api import GenerationRequest, GenerationResult, RequestError, SamplingParams
from adapterhub.runtime.engine import Engine

from .references import ADAPTERS, NEW_TOKENS, PROMPTS, peft_teacher_forced

TOLERANCE = 1e-4
NAMES = [None, *ADAPTERS]


def _folder(adapter_dirs: dict[str, Path], name: str | None) -> str | None:
    return None if name is None else str(adapter_dirs[name])


def run_batch(engine: Engine, requests: list[GenerationRequest]) -> list[GenerationResult]:
    """Submit every request before the loop starts, so they are admitted and decoded as one batch."""
    handles = [engine.submit(request) for request in requests]
    engine.start()
    try:
        return [handle.result(timeout=120) for handle in handles]
    finally:
        engine.stop()


def _reference(adapter_dirs: dict[str, Path], name: str | None, result: GenerationResult) -> torch.Tensor:
    """PEFT's raw logits before each generated token of ``result`` (one row per token)."""
    prompt = result.prompt_token_ids
    ids = tuple(prompt + result.token_ids)
    return peft_teacher_forced(_folder(adapter_dirs, name), ids)[len(prompt) - 1 : len(ids) - 1]


def _assert_logprobs(result: GenerationResult, processed: torch.Tensor, top: int) -> None:
    """``result``'s logprobs are the log-softmax of ``processed`` (one row per generated token)."""
    assert result.logprobs is not None and len(result.logprobs) == len(result.token_ids)
    for step, (entry, logits) in enumerate(zip(result.logprobs, processed, strict=True)):
        want = logits.log_softmax(-1)
        assert entry.token_id == result.token_ids[step]
        assert abs(entry.logprob - want[entry.token_id].item()) < TOLERANCE, step
        values, ids = want.topk(top)
        finite = values.isfinite()
        assert [i for i, _ in entry.top][: int(finite.sum())] == ids[finite].tolist(), step
        got = torch.tensor([v for _, v in entry.top])
        assert torch.allclose(got[finite], values[finite], atol=TOLERANCE, rtol=0), step
        assert (got[~finite] == float("-inf")).all()


def test_logprobs_of_every_family_in_one_batch_equal_peft_log_softmax(
    engine: Engine, adapter_dirs: dict[str, Path]
) -> None:
    rows = [(name, PROMPTS[i % len(PROMPTS)]) for i, name in enumerate(NAMES)]
    params = SamplingParams(max_tokens=NEW_TOKENS, logprobs=5)
    results = run_batch(engine, [GenerationRequest(prompt, name, params) for name, prompt in rows])
    for (name, _), result in zip(rows, results, strict=True):
        reference = _reference(adapter_dirs, name, result)
        assert result.token_ids == reference.argmax(-1).tolist(), name
        _assert_logprobs(result, reference, top=5)


def test_echo_scores_the_prompt_as_peft_does_teacher_forced(
    engine: Engine, adapter_dirs: dict[str, Path]
) -> None:
    """``max_tokens=0`` with prompt logprobs: lm-eval's loglikelihood request, for every family at once."""
    rows = [(name, PROMPTS[(i + 1) % len(PROMPTS)]) for i, name in enumerate(NAMES)]
    params = SamplingParams(max_tokens=0, prompt_logprobs=2)
    results = run_batch(engine, [GenerationRequest(prompt, name, params) for name, prompt in rows])
    for (name, _), result in zip(rows, results, strict=True):
        prompt = result.prompt_token_ids
        assert (result.token_ids, result.finish_reason) == ([], "length")
        assert result.prompt_logprobs is not None and result.prompt_logprobs[0] is None
        want = peft_teacher_forced(_folder(adapter_dirs, name), tuple(prompt)).log_softmax(-1)
        for position, entry in enumerate(result.prompt_logprobs[1:]):
            assert entry is not None and entry.token_id == prompt[position + 1]
            assert abs(entry.logprob - want[position, entry.token_id].item()) < TOLERANCE, name
            assert [i for i, _ in entry.top] == want[position].topk(2).indices.tolist()


PENALIZED = {
    "lora": dict(repetition_penalty=1.4),
    "ia3": dict(frequency_penalty=1.5),
    "prompt": dict(presence_penalty=-1.2),
    "ptune": dict(repetition_penalty=0.8, frequency_penalty=0.7, presence_penalty=0.9),
    "prefix": dict(logit_bias=((40, 4.0), (41, -3.0)), repetition_penalty=1.2),
}


def _processed(
    raw: torch.Tensor, prompt: list[int], output: list[int], params: SamplingParams
) -> torch.Tensor:
    """vLLM's order on PEFT's raw logits: logit bias, then repetition (transformers' processor),
    frequency and presence penalties (OpenAI's definitions)."""
    rows = []
    for step, logits in enumerate(raw):
        logits = logits.clone()
        for token, bias in params.logit_bias:
            logits[token] += bias
        seen = torch.tensor([prompt + output[:step]])
        logits = RepetitionPenaltyLogitsProcessor(params.repetition_penalty)(seen, logits[None])[0]
        for token, count in Counter(output[:step]).items():
            logits[token] -= params.frequency_penalty * count + params.presence_penalty
        rows.append(logits)
    return torch.stack(rows)


def test_logit_bias_and_penalties_per_row_match_transformers_processors(
    engine: Engine, adapter_dirs: dict[str, Path]
) -> None:
    rows = [(name, PENALIZED.get(name or "", {})) for name in NAMES]
    requests = [
        GenerationRequest(PROMPTS[0], name, SamplingParams(max_tokens=12, logprobs=3, **extra))
        for name, extra in rows
    ]
    results = run_batch(engine, requests)
    for (name, _), request, result in zip(rows, requests, results, strict=True):
        processed = _processed(
            _reference(adapter_dirs, name, result), result.prompt_token_ids, result.token_ids, request.params
        )
        assert result.token_ids == processed.argmax(-1).tolist(), name
        _assert_logprobs(result, processed, top=3)
    plain = results[0].token_ids
    assert all(result.token_ids != plain for result in results[1:])


FILTERED = {
    "lora": dict(top_k=3),
    "ia3": dict(top_p=0.6),
    "prompt": dict(min_p=0.3),
    "prefix": dict(top_k=5, top_p=0.8, min_p=0.05),
}


def test_sampling_filters_match_transformers_warpers_and_logprobs_are_the_filtered_ones(
    engine: Engine, adapter_dirs: dict[str, Path]
) -> None:
    rows = [(name, FILTERED[name]) for name in FILTERED]
    requests = [
        GenerationRequest(
            PROMPTS[2], name, SamplingParams(max_tokens=6, temperature=0.7, seed=3, logprobs=6, **extra)
        )
        for name, extra in rows
    ]
    results = run_batch(engine, requests)
    for (name, extra), result in zip(rows, results, strict=True):
        warpers = [TemperatureLogitsWarper(0.7)]  # vLLM's order: min_p, then top_k, then top_p
        if "min_p" in extra:
            warpers.append(MinPLogitsWarper(extra["min_p"]))
        if "top_k" in extra:
            warpers.append(TopKLogitsWarper(extra["top_k"]))
        if "top_p" in extra:
            warpers.append(TopPLogitsWarper(extra["top_p"]))
        processed = []
        for logits in _reference(adapter_dirs, name, result):
            scores = logits[None].clone()
            for warper in warpers:
                scores = warper(None, scores)
            processed.append(scores[0])
        processed = torch.stack(processed)
        _assert_logprobs(result, processed, top=6)
        assert all(processed[t, token].isfinite() for t, token in enumerate(result.token_ids)), name


def test_stop_token_ids_min_tokens_and_ignore_eos(engine: Engine) -> None:
    eos = min(engine.eos_ids)
    greedy = engine.generate(GenerationRequest(PROMPTS[1], "lora", SamplingParams(max_tokens=6)))
    stop_id = greedy.token_ids[2]
    stopped = engine.generate(
        GenerationRequest(PROMPTS[1], "lora", SamplingParams(max_tokens=6, stop_token_ids=(stop_id,)))
    )
    assert (stopped.token_ids, stopped.finish_reason) == (greedy.token_ids[:3], "stop")
    assert stopped.text == engine.tokenizer.decode(greedy.token_ids[:2], skip_special_tokens=True)

    forced_eos = dict(max_tokens=6, logit_bias=((eos, 100.0),))
    outcomes = {
        key: engine.generate(GenerationRequest(PROMPTS[1], "ia3", SamplingParams(**forced_eos, **extra)))
        for key, extra in {
            "plain": {},
            "min_tokens": {"min_tokens": 3},
            "ignore_eos": {"ignore_eos": True},
        }.items()
    }
    assert (outcomes["plain"].token_ids, outcomes["plain"].finish_reason) == ([eos], "stop")
    assert outcomes["plain"].text == ""
    held = outcomes["min_tokens"]
    assert len(held.token_ids) == 4 and eos not in held.token_ids[:3] and held.token_ids[3] == eos
    assert outcomes["ignore_eos"].token_ids == [eos] * 6 and outcomes["ignore_eos"].finish_reason == "length"


@pytest.mark.parametrize(
    ("params", "words"),
    [
        (dict(max_tokens=0), "max_tokens 0"),
        (dict(top_k=-2), "top_k"),
        (dict(min_p=1.5), "min_p"),
        (dict(min_tokens=9, max_tokens=4), "min_tokens 9"),
        (dict(presence_penalty=2.5), "presence_penalty"),
        (dict(repetition_penalty=0.0), "repetition_penalty"),
        (dict(logit_bias=((10**6, 1.0),)), "logit_bias"),
        (dict(logit_bias=((5, 101.0),)), "logit_bias"),
        (dict(stop_token_ids=(-1,)), "stop_token_ids"),
        (dict(logprobs=21), "logprobs 21"),
    ],
)
def test_out_of_range_parameters_are_refused_naming_them(engine: Engine, params: dict, words: str) -> None:
    with pytest.raises(RequestError, match=words) as refused:
        engine.submit(GenerationRequest(PROMPTS[0], None, SamplingParams(**params)))
    assert refused.value.code == "bad_request"
