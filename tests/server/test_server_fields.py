"""Every OpenAI request field is honoured or refused by name; logprobs, echo and the vLLM routes and
extras through the official client, against the real engine behind a real uvicorn server."""

from __future__ import annotations

import json
import typing
from pathlib import Path

import httpx
import openai
import pytest
from openai.types import completion_create_params
from openai.types.chat import completion_create_params as chat_create_params
from transformers import AutoModelForCausalLM

from adapterhub.runtime.api import GenerationRequest, GenerationResult, SamplingParams
from adapterhub.runtime.engine import Engine, EngineConfig
from adapterhub.runtime.random_adapters import peft_config, write_random_adapter
from adapterhub.server.app import create_app
from adapterhub.server.background import serve_in_background
from adapterhub.server.loading_policy import LoadingPolicy

SERVED_NAME = "tiny-base"
FAMILIES = ("lora", "ia3", "prompt_tuning", "p_tuning", "prefix_tuning")
PROMPT = "the food was"


@pytest.fixture(scope="module")
def engine(hermes_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Engine:
    """The tool-capable tiny base (so the field table can use tools) with one adapter per family."""
    engine = Engine(EngineConfig(base=str(hermes_base), max_adapters=5, max_batch_size=16))
    root = tmp_path_factory.mktemp("field-adapters")
    for seed, family in enumerate(FAMILIES, start=1):
        model = AutoModelForCausalLM.from_pretrained(hermes_base)
        engine.register(
            family, str(write_random_adapter(model, peft_config(family), root / family, seed=seed))
        )
    engine.start()
    yield engine
    engine.stop(grace_s=5)


@pytest.fixture(scope="module")
def url(engine: Engine) -> str:
    # The vLLM load aliases go through the same loading policy: on, for the adapters' own folder.
    roots = tuple({Path(info.source).resolve().parent for info in engine.list()})
    loading = LoadingPolicy(enabled=True, roots=roots)
    app = create_app(engine, served_model_name=SERVED_NAME, max_tokens_cap=64, loading=loading)
    with serve_in_background(app) as base:
        yield base


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)


def alone(engine: Engine, prompt: str | list[int], adapter: str | None, **params) -> GenerationResult:
    return engine.generate(GenerationRequest(prompt, adapter, SamplingParams(**params)))


# -- logprobs and echo ---------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_completion_logprobs_match_the_engine_streamed_and_not(engine: Engine, url: str, family: str) -> None:
    want = alone(engine, PROMPT, family, max_tokens=6, logprobs=3)
    text = engine.vocabulary.token_text
    done = client(url).completions.create(
        model=family, prompt=PROMPT, max_tokens=6, temperature=0, logprobs=3
    )
    logprobs = done.choices[0].logprobs
    assert logprobs.tokens == [text(token) for token in want.token_ids]
    assert logprobs.token_logprobs == pytest.approx([entry.logprob for entry in want.logprobs], abs=1e-6)
    for top, entry in zip(logprobs.top_logprobs, want.logprobs, strict=True):
        expected = {text(entry.token_id): entry.logprob}
        for token, value in entry.top:  # texts can repeat (partial UTF-8, unused ids): first one wins
            expected.setdefault(text(token), value)
        assert top == pytest.approx(expected, abs=1e-6) and len(top) <= 4
    offsets = [0]
    for token in logprobs.tokens[:-1]:
        offsets.append(offsets[-1] + len(token))
    assert logprobs.text_offset == offsets
    chunks = list(
        client(url).completions.create(
            model=family, prompt=PROMPT, max_tokens=6, temperature=0, logprobs=3, stream=True
        )
    )
    streamed = [c.choices[0].logprobs for c in chunks if c.choices[0].logprobs is not None]
    assert [t for lp in streamed for t in lp.tokens] == logprobs.tokens
    assert [v for lp in streamed for v in lp.token_logprobs] == logprobs.token_logprobs
    assert [o for lp in streamed for o in lp.text_offset] == logprobs.text_offset


def test_echo_with_max_tokens_zero_returns_the_prompt_and_its_logprobs(engine: Engine, url: str) -> None:
    """What lm-eval's ``local-completions`` sends for a loglikelihood, with token-id prompts."""
    ids = engine.tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    want = alone(engine, ids, "prefix_tuning", max_tokens=0, prompt_logprobs=1)
    body = {"model": "prefix_tuning", "prompt": [ids, ids[:2]], "max_tokens": 0, "echo": True, "logprobs": 1}
    done = httpx.post(f"{url}/v1/completions", json={**body, "temperature": 0}, timeout=60).json()
    first, second = (choice["logprobs"] for choice in done["choices"])
    assert done["choices"][0]["text"] == engine.tokenizer.decode(ids)
    assert first["token_logprobs"][0] is None and first["top_logprobs"][0] is None
    assert first["token_logprobs"][1:] == pytest.approx(
        [e.logprob for e in want.prompt_logprobs[1:]], abs=1e-6
    )
    assert len(second["tokens"]) == 2 and done["usage"]["completion_tokens"] == 0
    echoed = client(url).completions.create(
        model="prefix_tuning", prompt=PROMPT, max_tokens=3, temperature=0, echo=True
    )
    assert echoed.choices[0].text == PROMPT + alone(engine, PROMPT, "prefix_tuning", max_tokens=3).text
    chunks = list(
        client(url).completions.create(
            model="prefix_tuning", prompt=ids, max_tokens=2, temperature=0, echo=True, logprobs=1, stream=True
        )
    )
    assert chunks[0].choices[0].text == engine.tokenizer.decode(ids)
    assert chunks[0].choices[0].logprobs.token_logprobs[0] is None


def test_chat_logprobs_in_openai_shape(engine: Engine, url: str) -> None:
    messages = [{"role": "user", "content": "hello there"}]
    chat = client(url).chat.completions.create(
        model="ia3", messages=messages, max_tokens=5, temperature=0, logprobs=True, top_logprobs=2
    )
    content = chat.choices[0].logprobs.content
    prompt = list(engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True)["input_ids"])
    want = alone(engine, prompt, "ia3", max_tokens=5, logprobs=2)
    assert [c.logprob for c in content] == pytest.approx([e.logprob for e in want.logprobs], abs=1e-6)
    assert all(len(c.top_logprobs) == 2 for c in content)
    assert all(bytes(c.bytes).decode("utf-8", errors="replace") == c.token for c in content)
    assert "".join(c.token for c in content) == chat.choices[0].message.content
    streamed = client(url).chat.completions.create(
        model="ia3",
        messages=messages,
        max_tokens=5,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
        stream=True,
    )
    tokens = [
        c.token
        for chunk in streamed
        if chunk.choices and chunk.choices[0].logprobs
        for c in chunk.choices[0].logprobs.content
    ]
    assert tokens == [c.token for c in content]


def test_vllm_extras_reach_the_engine(engine: Engine, url: str) -> None:
    extras = {"top_k": 3, "min_p": 0.1, "repetition_penalty": 1.3, "min_tokens": 2, "stop_token_ids": [7]}
    want = alone(
        engine, PROMPT, "lora", max_tokens=8, temperature=0.8, seed=5, **{**extras, "stop_token_ids": (7,)}
    )
    got = client(url).completions.create(
        model="lora", prompt=PROMPT, max_tokens=8, temperature=0.8, seed=5, extra_body=extras
    )
    assert got.choices[0].text == want.text
    biased = client(url).completions.create(
        model="lora", prompt=PROMPT, max_tokens=4, temperature=0, logit_bias={"9": 100}
    )
    assert biased.choices[0].text == engine.tokenizer.decode([9] * 4)
    ignored = client(url).completions.create(
        model="lora",
        prompt=PROMPT,
        max_tokens=4,
        temperature=0,
        logit_bias={"2": 100},
        extra_body={"ignore_eos": True},
    )
    assert ignored.choices[0].finish_reason == "length" and ignored.usage.completion_tokens == 4


# -- the vLLM routes -----------------------------------------------------------------------------


def test_tokenize_detokenize_version_models_and_lora_aliases(
    engine: Engine, url: str, tmp_path: Path
) -> None:
    tokens = httpx.post(f"{url}/tokenize", json={"prompt": PROMPT, "add_special_tokens": False}).json()
    assert tokens["tokens"] == engine.tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    assert tokens["count"] == len(tokens["tokens"]) and tokens["max_model_len"] == engine.max_context
    chat = httpx.post(f"{url}/tokenize", json={"messages": [{"role": "user", "content": "hi"}]}).json()
    assert chat["tokens"] == list(
        engine.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True)[
            "input_ids"
        ]
    )
    assert httpx.post(f"{url}/detokenize", json={"tokens": tokens["tokens"]}).json() == {"prompt": PROMPT}
    assert httpx.get(f"{url}/version").json()["version"]
    info = httpx.get(f"{url}/tokenizer_info").json()
    assert info["eos_token"] == "</s>" and info["chat_template"] == engine.tokenizer.chat_template
    models = {m.id: m for m in client(url).models.list().data}
    assert models[SERVED_NAME].metadata["kind"] == "base"
    assert {name: (m.parent, m.metadata["method"]) for name, m in models.items() if name != SERVED_NAME} == {
        family: (SERVED_NAME, family) for family in FAMILIES
    }
    base = client(url).completions.create(model=SERVED_NAME, prompt=PROMPT, max_tokens=3, temperature=0)
    assert base.choices[0].text == alone(engine, PROMPT, None, max_tokens=3).text

    source = engine.list()[0].source
    loaded = httpx.post(
        f"{url}/v1/load_lora_adapter", json={"lora_name": "again", "lora_path": source}, timeout=60
    )
    assert loaded.status_code == 200 and loaded.text == "Success: LoRA adapter 'again' added successfully."
    twice = httpx.post(
        f"{url}/v1/load_lora_adapter", json={"lora_name": "again", "lora_path": source}, timeout=60
    )
    assert twice.status_code == 409 and twice.json()["error"]["code"] == "adapter_exists"
    assert (
        client(url)
        .completions.create(model="again", prompt=PROMPT, max_tokens=3, temperature=0)
        .choices[0]
        .text
    )
    unloaded = httpx.post(f"{url}/v1/unload_lora_adapter", json={"lora_name": "again"}, timeout=60)
    assert unloaded.status_code == 200 and "removed" in unloaded.text
    gone = httpx.post(f"{url}/v1/unload_lora_adapter", json={"lora_name": "again"}, timeout=60)
    assert gone.status_code == 404


# -- every OpenAI field: honoured, accepted as having no effect, or a 400 naming it ----------------

TOOL = {
    "type": "function",
    "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}},
}
COMPLETION_FIELDS = {
    "model": ("honoured", "lora"),
    "prompt": ("honoured", PROMPT),
    "best_of": ("unsupported", 2),
    "echo": ("honoured", True),
    "frequency_penalty": ("honoured", 0.5),
    "logit_bias": ("honoured", {"9": 2.0}),
    "logprobs": ("honoured", 2),
    "max_tokens": ("honoured", 3),
    "n": ("honoured", 2),
    "presence_penalty": ("honoured", 0.5),
    "seed": ("honoured", 4),
    "stop": ("honoured", ["x"]),
    "stream": ("honoured", True),
    "stream_options": ("honoured", {"include_usage": True}),
    "suffix": ("unsupported", "!"),
    "temperature": ("honoured", 0.5),
    "top_p": ("honoured", 0.9),
    "user": ("no effect", "someone"),
}
CHAT_FIELDS = {
    "model": ("honoured", "lora"),
    "messages": ("honoured", [{"role": "user", "content": "hi"}]),
    "audio": ("unsupported", {"voice": "alloy", "format": "wav"}),
    "frequency_penalty": ("honoured", 0.5),
    "function_call": ("unsupported", "auto"),
    "functions": ("unsupported", [{"name": "f", "parameters": {}}]),
    "logit_bias": ("honoured", {"9": 2.0}),
    "logprobs": ("honoured", True),
    "max_completion_tokens": ("honoured", 3),
    "max_tokens": ("honoured", 3),
    "metadata": ("no effect", {"team": "a"}),
    "modalities": ("unsupported", ["text", "audio"]),
    "moderation": ("unsupported", {"policy": {"input": {"mode": "block"}}}),
    "n": ("honoured", 2),
    "parallel_tool_calls": ("honoured", False),
    "prediction": ("unsupported", {"type": "content", "content": "hi"}),
    "presence_penalty": ("honoured", 0.5),
    "prompt_cache_key": ("no effect", "k"),
    "prompt_cache_options": ("no effect", {"ttl": "5m"}),
    "prompt_cache_retention": ("no effect", "24h"),
    "reasoning_effort": ("unsupported", "low"),
    "response_format": ("honoured", {"type": "json_object"}),
    "safety_identifier": ("no effect", "user-1"),
    "seed": ("honoured", 4),
    "service_tier": ("no effect", "auto"),
    "stop": ("honoured", ["x"]),
    "store": ("no effect", True),
    "stream": ("honoured", True),
    "stream_options": ("honoured", {"include_usage": True}),
    "temperature": ("honoured", 0.5),
    "tool_choice": ("honoured", "none"),
    "tools": ("honoured", [TOOL]),
    "top_logprobs": ("honoured", 2),
    "top_p": ("honoured", 0.9),
    "user": ("no effect", "someone"),
    "verbosity": ("unsupported", "low"),
    "web_search_options": ("unsupported", {}),
}


def _openai_fields(params: type) -> set[str]:
    return set(typing.get_type_hints(params)) | {"stream"}


def test_the_tables_cover_every_field_of_the_installed_openai_schemas() -> None:
    assert set(COMPLETION_FIELDS) == _openai_fields(completion_create_params.CompletionCreateParamsBase)
    assert set(CHAT_FIELDS) == _openai_fields(chat_create_params.CompletionCreateParamsBase)


def _cases() -> list:
    cases = []
    for route, table, base in (
        ("/v1/completions", COMPLETION_FIELDS, {"model": "lora", "prompt": PROMPT, "max_tokens": 3}),
        (
            "/v1/chat/completions",
            CHAT_FIELDS,
            {"model": "lora", "messages": CHAT_FIELDS["messages"][1], "max_tokens": 3},
        ),
    ):
        for field, (outcome, value) in table.items():
            cases.append(
                pytest.param(route, base, field, outcome, value, id=f"{route.rsplit('/', 1)[1]}-{field}")
            )
    return cases


@pytest.mark.parametrize(("route", "base", "field", "outcome", "value"), _cases())
def test_every_openai_field_is_honoured_or_refused_by_name(
    url: str, route: str, base: dict, field: str, outcome: str, value
) -> None:
    body = {**base, field: value}
    if field == "stream_options":
        body["stream"] = True
    if field == "top_logprobs":
        body["logprobs"] = True
    response = httpx.post(f"{url}{route}", json=body, timeout=60)
    if outcome == "unsupported":
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert (error["code"], error["param"]) == ("unsupported", field) and field in error["message"]
    else:
        assert response.status_code == 200, response.text


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
            "messages.0.content.0",
        ),
        (
            {"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]},
            "messages.0.content.0",
        ),
        ({"messages": [{"role": "user", "content": "hi", "audio": {"id": "a"}}]}, "messages.0.audio"),
        ({"messages": [{"role": "user", "content": "hi"}], "top_k_typo": 3}, "top_k_typo"),
        (
            {
                "messages": [{"role": "user", "content": "hi"}],
                "stream": True,
                "stream_options": {"include_obfuscation": True},
            },
            "stream_options.include_obfuscation",
        ),
    ],
)
def test_unsupported_content_parts_and_nested_fields_are_a_400_naming_them(
    url: str, body: dict, param: str
) -> None:
    response = httpx.post(f"{url}/v1/chat/completions", json={"model": "lora", **body}, timeout=60)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert (error["code"], error["param"]) == ("unsupported", param)
    if "content" in param:
        assert "content part type" in error["message"] and "is not supported" in error["message"]


def test_conflicting_and_invalid_fields_are_a_400(url: str) -> None:
    chat = {"model": "lora", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    cases = [
        ({**chat, "top_logprobs": 2}, "top_logprobs"),
        ({**chat, "response_format": {"type": "json_object"}, "guided_regex": "a+"}, "guided_regex"),
        ({**chat, "tool_choice": "required"}, "tool_choice"),
        (
            {**chat, "tools": [TOOL], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
            "tool_choice",
        ),
        ({**chat, "logit_bias": {"x": 1}}, "logit_bias"),
    ]
    for body, param in cases:
        response = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)
        assert response.status_code == 400 and response.json()["error"]["param"] == param, response.text
    bad_grammar = httpx.post(
        f"{url}/v1/completions", json={"model": "lora", "prompt": "hi", "guided_regex": "a(b"}, timeout=60
    )
    assert bad_grammar.status_code == 400 and "regex" in bad_grammar.json()["error"]["message"]
    echoed = httpx.post(
        f"{url}/v1/completions", json={"model": "lora", "prompt": [-1], "echo": True}, timeout=60
    )
    assert echoed.status_code == 400 and echoed.json()["error"]["param"] == "prompt"
    zero = httpx.post(
        f"{url}/v1/completions", json={"model": "lora", "prompt": "hi", "max_tokens": 0}, timeout=60
    )
    assert zero.status_code == 400 and zero.json()["error"]["param"] == "max_tokens"
    json.dumps(zero.json())
