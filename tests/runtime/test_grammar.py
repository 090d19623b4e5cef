"""Grammar-constrained rows share a batch with free rows, for every family; every constrained output
parses and validates, and each constrained token is PEFT's argmax over the tokens the grammar allows."""

from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema
import pytest
import torch
from llguidance.torch import allocate_token_bitmask, fill_next_token_bitmask

from adapterhub.runtime.api import GenerationRequest, GrammarSpec, RequestError, SamplingParams
from adapterhub.runtime.engine import Engine

from .references import ADAPTERS, PROMPTS, peft_teacher_forced
from .test_sampling import run_batch

SCHEMA = {
    "type": "object",
    "properties": {
        "answer": {"enum": ["yes", "no", "maybe"]},
        "score": {"type": "integer", "minimum": 0, "maximum": 99},
        "note": {"type": "string", "maxLength": 8},
        "tags": {"type": "array", "items": {"type": "boolean"}, "maxItems": 3},
    },
    "required": ["answer", "score", "note", "tags"],
    "additionalProperties": False,
}
NAMES = [None, *ADAPTERS]


def _allowed(matcher, vocab_size: int) -> torch.Tensor:
    mask = allocate_token_bitmask(1, vocab_size)
    fill_next_token_bitmask(matcher, mask, 0)
    bits = (mask[0].unsqueeze(-1) >> torch.arange(32, dtype=torch.int32)) & 1
    return bits.flatten()[:vocab_size].bool()


def test_json_schema_rows_of_every_family_validate_and_take_the_allowed_argmax(
    engine: Engine, adapter_dirs: dict[str, Path]
) -> None:
    grammar = GrammarSpec("json_schema", json.dumps(SCHEMA))
    constrained = SamplingParams(max_tokens=120, grammar=grammar)
    free = SamplingParams(max_tokens=10)
    requests = []
    for i, name in enumerate(NAMES):
        prompt = PROMPTS[i % len(PROMPTS)]
        requests += [GenerationRequest(prompt, name, constrained), GenerationRequest(prompt, name, free)]
    results = run_batch(engine, requests)
    free_alone, argmax_allowed = {}, 0
    for request, result in zip(requests, results, strict=True):
        name = request.adapter
        folder = None if name is None else str(adapter_dirs[name])
        ids = tuple(result.prompt_token_ids + result.token_ids)
        raw = peft_teacher_forced(folder, ids)[len(result.prompt_token_ids) - 1 : len(ids) - 1]
        if request.params.grammar is None:
            assert result.token_ids == raw.argmax(-1).tolist()
            free_alone[name] = result.token_ids
            continue
        assert result.finish_reason == "stop", (name, result.text)
        jsonschema.validate(json.loads(result.text), SCHEMA)
        replay = engine.grammars.matcher(grammar)
        for step, token in enumerate(result.token_ids):
            allowed = _allowed(replay, engine.vocab_size)
            best = raw[step].argmax().item()
            assert token == raw[step].masked_fill(~allowed, float("-inf")).argmax().item(), (name, step)
            if allowed[best]:
                assert token == best
                argmax_allowed += 1
            assert replay.consume_token(token)
        assert replay.is_stopped()
    assert set(free_alone) == set(NAMES)
    assert argmax_allowed > 0  # the "equal whenever allowed" branch was exercised


@pytest.mark.parametrize(
    ("spec", "accepts"),
    [
        (GrammarSpec("regex", r"[a-c]{3}-[0-9]{2}"), lambda text: re.fullmatch(r"[a-c]{3}-[0-9]{2}", text)),
        (
            GrammarSpec("choice", json.dumps(["red", "green", "blue"])),
            lambda text: text in {"red", "green", "blue"},
        ),
        (
            GrammarSpec("lark", 'start: "x" NUM "y"\nNUM: /[0-9]{1,2}/'),
            lambda text: re.fullmatch(r"x\d{1,2}y", text),
        ),
        (
            GrammarSpec("gbnf", 'root ::= "ab" | "cd" digit\ndigit ::= [0-9]'),
            lambda text: re.fullmatch(r"ab|cd\d", text),
        ),
        (GrammarSpec("json_schema", '{"type": "object"}'), None),
    ],
    ids=["regex", "choice", "lark", "gbnf", "json_object"],
)
def test_every_grammar_kind_constrains_every_family(engine: Engine, spec: GrammarSpec, accepts) -> None:
    bias = ()
    if accepts is None:
        # Any JSON object: a random model would write one endless string. Push it to close strings
        # (most) and objects: the grammar must still open with '{' though the closers outweigh the rest.
        quote, brace = engine.tokenizer('"}', add_special_tokens=False)["input_ids"]
        bias = ((quote, 100.0), (brace, 60.0))
    params = SamplingParams(max_tokens=40, grammar=spec, logit_bias=bias)
    results = run_batch(engine, [GenerationRequest(PROMPTS[1], name, params) for name in NAMES])
    for name, result in zip(NAMES, results, strict=True):
        if accepts is None:
            assert isinstance(json.loads(result.text), dict), (name, result.text)
        else:
            assert accepts(result.text), (name, result.text)
        assert result.finish_reason == "stop"


@pytest.mark.parametrize(
    "spec",
    [
        GrammarSpec("json_schema", '{"type": "nonsense"}'),
        GrammarSpec("json_schema", "{not json"),
        GrammarSpec("regex", "a(b"),
        GrammarSpec("choice", "[]"),
        GrammarSpec("lark", "start: undefined_rule"),
    ],
)
def test_a_grammar_that_does_not_compile_is_refused_at_submit(engine: Engine, spec: GrammarSpec) -> None:
    with pytest.raises(RequestError) as refused:
        engine.submit(GenerationRequest(PROMPTS[0], None, SamplingParams(grammar=spec)))
    assert refused.value.code == "bad_request" and spec.kind in str(refused.value)
    assert "\n" not in str(refused.value)  # one line, whatever the library printed
