"""Structured output and tool calls through the official openai client and LangChain, on tiny bases
with tool-capable chat templates (Hermes and Llama 3 JSON formats), real engine, real uvicorn."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field
from transformers import AutoModelForCausalLM

from adapterhub.runtime.api import GenerationRequest, SamplingParams
from adapterhub.runtime.engine import Engine, EngineConfig
from adapterhub.runtime.random_adapters import peft_config, write_random_adapter
from adapterhub.server.app import create_app
from adapterhub.server.background import serve_in_background

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"enum": ["Paris", "Oslo"]},
                "days": {"type": "integer", "minimum": 1, "maximum": 7},
            },
            "required": ["city", "days"],
            "additionalProperties": False,
        },
    },
}
CLOCK = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {"type": "object", "properties": {}, "additionalProperties": False},
    },
}
ASK = [{"role": "user", "content": "what is the weather in Paris?"}]


class Verdict(BaseModel):
    answer: bool
    score: int = Field(ge=0, le=9)


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)


def serve(base: Path, root: Path):
    engine = Engine(EngineConfig(base=str(base), max_adapters=4, max_batch_size=8))
    for seed, family in enumerate(("lora", "prefix_tuning"), start=1):
        model = AutoModelForCausalLM.from_pretrained(base)
        engine.register(
            family, str(write_random_adapter(model, peft_config(family), root / family, seed=seed))
        )
    engine.start()
    return engine


@pytest.fixture(scope="module")
def hermes(hermes_base: Path, tmp_path_factory: pytest.TempPathFactory):
    engine = serve(hermes_base, tmp_path_factory.mktemp("hermes-adapters"))
    with serve_in_background(create_app(engine, served_model_name="hermes")) as url:
        yield engine, url
    engine.stop(grace_s=5)


def _arguments(call) -> dict:
    arguments = json.loads(call.function.arguments)
    jsonschema.validate(arguments, WEATHER["function"]["parameters"])
    return arguments


@pytest.mark.parametrize("model", ["hermes", "lora", "prefix_tuning"])
def test_required_tool_call_round_trip_through_the_openai_client(hermes, model: str) -> None:
    engine, url = hermes
    api = client(url)
    first = api.chat.completions.create(
        model=model,
        messages=ASK,
        tools=[WEATHER, CLOCK],
        tool_choice="required",
        parallel_tool_calls=False,  # one call, then the grammar is done (a random model would go on)
        max_tokens=120,
        temperature=0,
    )
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.tool_calls
    call = choice.message.tool_calls[0]
    assert call.type == "function" and call.id.startswith("call_")
    if call.function.name == "get_weather":
        _arguments(call)
    streamed = list(
        api.chat.completions.create(
            model=model,
            messages=ASK,
            tools=[WEATHER, CLOCK],
            tool_choice="required",
            parallel_tool_calls=False,
            max_tokens=120,
            temperature=0,
            stream=True,
        )
    )
    deltas = [tc for chunk in streamed if chunk.choices for tc in (chunk.choices[0].delta.tool_calls or [])]
    assert [(d.function.name, d.function.arguments) for d in deltas] == [
        (c.function.name, c.function.arguments) for c in choice.message.tool_calls
    ]
    assert streamed[-1].choices[0].finish_reason == "tool_calls"

    history = [
        *ASK,
        choice.message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21 C"},
    ]
    second = api.chat.completions.create(model=model, messages=history, max_tokens=8, temperature=0)
    rendered = httpx.post(f"{url}/tokenize", json={"messages": history}).json()["tokens"]
    prompt_text = engine.tokenizer.decode(rendered)
    assert "<tool_response>\nsunny, 21 C\n</tool_response>" in prompt_text
    assert (
        f'<tool_call>\n{{"name": "{call.function.name}", "arguments": {call.function.arguments}}}'
        in prompt_text
    )
    adapter = None if model == "hermes" else model
    want = engine.generate(GenerationRequest(rendered, adapter, SamplingParams(max_tokens=8)))
    assert second.choices[0].message.content == want.text


def test_named_function_and_auto(hermes) -> None:
    _, url = hermes
    named = client(url).chat.completions.create(
        model="lora",
        messages=ASK,
        tools=[WEATHER, CLOCK],
        max_tokens=120,
        temperature=0,
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
    )
    calls = named.choices[0].message.tool_calls
    assert [c.function.name for c in calls] == ["get_weather"] and named.choices[0].finish_reason == "stop"
    _arguments(calls[0])
    auto = client(url).chat.completions.create(
        model="lora", messages=ASK, tools=[WEATHER], max_tokens=6, temperature=0
    )
    assert auto.choices[0].message.tool_calls is None and auto.choices[0].message.content is not None
    single = client(url).chat.completions.create(
        model="lora",
        messages=ASK,
        tools=[WEATHER, CLOCK],
        tool_choice="required",
        parallel_tool_calls=False,
        max_tokens=80,
        temperature=0,
    )
    assert len(single.choices[0].message.tool_calls) == 1


def test_structured_output_validates_for_every_family_in_one_batch(hermes) -> None:
    """json_schema rows of every served model mixed with free rows, sent at once."""
    from concurrent.futures import ThreadPoolExecutor

    _, url = hermes
    schema = {**Verdict.model_json_schema(), "additionalProperties": False}  # closed, as strict mode is

    def ask(job: tuple[str, bool]):
        model, constrained = job
        extra = (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "verdict", "schema": schema, "strict": True},
                }
            }
            if constrained
            else {}
        )
        return client(url).chat.completions.create(
            model=model, messages=ASK, max_tokens=40, temperature=0, **extra
        )

    jobs = [
        (model, constrained) for model in ("hermes", "lora", "prefix_tuning") for constrained in (True, False)
    ]
    with ThreadPoolExecutor(len(jobs)) as pool:
        answers = list(pool.map(ask, jobs))
    for (model, constrained), answer in zip(jobs, answers, strict=True):
        if constrained:
            jsonschema.validate(json.loads(answer.choices[0].message.content), schema)
            assert answer.choices[0].finish_reason == "stop", model
    parsed = client(url).chat.completions.parse(
        model="lora", messages=ASK, response_format=Verdict, max_tokens=40, temperature=0
    )
    assert isinstance(parsed.choices[0].message.parsed, Verdict)
    regex = client(url).completions.create(
        model="prefix_tuning", prompt="code:", max_tokens=10, extra_body={"guided_regex": "[A-Z]{3}-[0-9]{3}"}
    )
    assert len(regex.choices[0].text) == 7 and regex.choices[0].text[3] == "-"
    choice = client(url).completions.create(
        model="hermes", prompt="pick:", max_tokens=10, extra_body={"guided_choice": ["left", "right"]}
    )
    assert choice.choices[0].text in ("left", "right")


def test_langchain_bind_tools_and_structured_output(hermes) -> None:
    from langchain_core.messages import HumanMessage, ToolMessage
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI

    _, url = hermes

    @tool
    def get_weather(city: Literal["Paris", "Oslo"]) -> str:
        """The weather in a city."""
        return f"sunny in {city}"

    chat = ChatOpenAI(
        base_url=f"{url}/v1", api_key="unused", model="lora", temperature=0, max_tokens=120, max_retries=0
    )
    bound = chat.bind_tools([get_weather], tool_choice="get_weather", strict=True)
    question = HumanMessage("weather in Oslo?")
    asked = bound.invoke([question])
    assert [c["name"] for c in asked.tool_calls] == ["get_weather"] and isinstance(
        asked.tool_calls[0]["args"]["city"], str
    )
    result = get_weather.invoke(asked.tool_calls[0]["args"])
    answer = chat.bind_tools([get_weather]).invoke(
        [question, asked, ToolMessage(result, tool_call_id=asked.tool_calls[0]["id"])]
    )
    assert answer.content is not None
    structured = chat.with_structured_output(Verdict, method="json_schema").invoke("is it sunny?")
    assert isinstance(structured, Verdict)


def test_llama3_json_tool_format(llama3_base: Path, tmp_path: Path) -> None:
    engine = Engine(EngineConfig(base=str(llama3_base), max_batch_size=4))
    engine.start()
    try:
        with serve_in_background(create_app(engine, served_model_name="llama3")) as url:
            named = client(url).chat.completions.create(
                model="llama3",
                messages=ASK,
                tools=[WEATHER],
                max_tokens=120,
                temperature=0,
                tool_choice={"type": "function", "function": {"name": "get_weather"}},
            )
            call = named.choices[0].message.tool_calls[0]
            assert call.function.name == "get_weather"
            _arguments(call)
    finally:
        engine.stop(grace_s=5)


def test_a_template_without_tools_is_a_400_naming_the_model(tiny_llama: Path) -> None:
    engine = Engine(EngineConfig(base=str(tiny_llama), max_batch_size=2))
    app = create_app(engine, served_model_name="plain")
    with serve_in_background(app) as url, pytest.raises(openai.BadRequestError) as refused:
        client(url).chat.completions.create(model="plain", messages=ASK, tools=[WEATHER])
    assert refused.value.body["code"] == "tools_unsupported" and "'plain'" in refused.value.body["message"]
