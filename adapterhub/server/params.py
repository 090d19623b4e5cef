"""OpenAI and vLLM request fields → the engine's ``SamplingParams``: one place that reads them."""

from __future__ import annotations

import json

from adapterhub.runtime.api import GrammarSpec, SamplingParams
from adapterhub.server.errors import ApiError
from adapterhub.server.schemas import ChatCompletionRequest, CompletionRequest, SamplingFields


def sampling_params(
    body: SamplingFields,
    *,
    max_tokens: int,
    logprobs: int | None = None,
    prompt_logprobs: int | None = None,
    grammar: GrammarSpec | None = None,
    skip_special_tokens: bool | None = None,
) -> SamplingParams:
    stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        top_k=body.top_k,
        min_p=body.min_p,
        seed=body.seed,
        stop=stop,
        stop_token_ids=tuple(body.stop_token_ids or ()),
        ignore_eos=body.ignore_eos,
        min_tokens=body.min_tokens,
        logit_bias=_logit_bias(body.logit_bias),
        presence_penalty=body.presence_penalty,
        frequency_penalty=body.frequency_penalty,
        repetition_penalty=body.repetition_penalty,
        logprobs=logprobs,
        prompt_logprobs=prompt_logprobs,
        grammar=grammar,
        skip_special_tokens=body.skip_special_tokens if skip_special_tokens is None else skip_special_tokens,
    )


def _logit_bias(bias: dict[str, float] | None) -> tuple[tuple[int, float], ...]:
    pairs = []
    for key, value in (bias or {}).items():
        try:
            token = int(key)
        except ValueError:
            raise ApiError(
                400,
                f"logit_bias key '{key}' is not a token id: use ids as strings",
                "invalid_value",
                "logit_bias",
            ) from None
        pairs.append((token, float(value)))
    return tuple(pairs)


def output_grammar(body: CompletionRequest | ChatCompletionRequest) -> GrammarSpec | None:
    """The constraint that ``response_format`` or vLLM's ``guided_*`` fields ask for; at most one."""
    found: list[tuple[str, GrammarSpec]] = []
    response_format = body.response_format
    if response_format is not None and response_format.type == "json_object":
        found.append(("response_format", GrammarSpec("json_schema", '{"type": "object"}')))
    if response_format is not None and response_format.type == "json_schema":
        if response_format.json_schema is None:
            message = "response_format type json_schema needs a json_schema object with a schema"
            raise ApiError(400, message, "invalid_value", "response_format.json_schema")
        schema = response_format.json_schema.schema_
        text = json.dumps(schema if schema is not None else {"type": "object"})
        found.append(("response_format", GrammarSpec("json_schema", text)))
    if body.guided_json is not None:
        text = body.guided_json if isinstance(body.guided_json, str) else json.dumps(body.guided_json)
        found.append(("guided_json", GrammarSpec("json_schema", text)))
    if body.guided_regex is not None:
        found.append(("guided_regex", GrammarSpec("regex", body.guided_regex)))
    if body.guided_choice is not None:
        found.append(("guided_choice", GrammarSpec("choice", json.dumps(body.guided_choice))))
    if body.guided_grammar is not None:
        found.append(("guided_grammar", GrammarSpec("gbnf", body.guided_grammar)))
    if len(found) > 1:
        names = " and ".join(name for name, _ in found)
        raise ApiError(400, f"{names} both constrain the output: give one", "invalid_value", found[1][0])
    return found[0][1] if found else None
