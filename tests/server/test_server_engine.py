"""The server over the real Engine: exactness across PEFT families, load, adapter management, SIGTERM."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
from http_helpers import KeepAlive
from scripted_engine import wait_until
from transformers import AutoModelForCausalLM

from adapterhub.runtime.api import GenerationRequest, GenerationResult, SamplingParams
from adapterhub.runtime.engine import Engine, EngineConfig
from adapterhub.runtime.random_adapters import peft_config, write_random_adapter
from adapterhub.server.app import create_app
from adapterhub.server.background import serve_in_background
from adapterhub.server.loading_policy import LoadingPolicy
from tests.hub.fake_hub import marker_pickle
from tests.ports import free_port

FAMILIES = ("lora", "ia3", "prompt_tuning", "prefix_tuning")
PROMPTS = ("the food was", "Review: the room was very clean\nSentiment:")
BASE = "builtin:tiny-llama"


@pytest.fixture(scope="module")
def adapter_folders(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One adapter per family, written by plain PEFT with distinct non-trivial weights."""
    root = tmp_path_factory.mktemp("adapters")
    made = {family: family for family in FAMILIES} | {"lora-spare": "lora"}
    folders = {}
    for seed, (name, family) in enumerate(made.items(), start=1):
        model = AutoModelForCausalLM.from_pretrained(tiny_llama)
        folders[name] = write_random_adapter(model, peft_config(family), root / name, seed=seed)
    return folders


@pytest.fixture(scope="module")
def engine(adapter_folders: dict[str, Path]) -> Engine:
    engine = Engine(EngineConfig(base=BASE, max_adapters=4, max_batch_size=16))
    for family in FAMILIES:
        engine.register(family, str(adapter_folders[family]))
    engine.start()
    yield engine
    engine.stop(grace_s=5)


@pytest.fixture(scope="module")
def url(engine: Engine, adapter_folders: dict[str, Path]) -> str:
    root = adapter_folders["lora"].parent.resolve()
    app = create_app(engine, loading=LoadingPolicy(enabled=True, roots=(root,)))
    with serve_in_background(app) as base_url:
        yield base_url


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)


def alone(engine: Engine, prompt: str | list[int], adapter: str | None, **params) -> GenerationResult:
    """What the engine generates for this request with nothing else in flight."""
    return engine.generate(GenerationRequest(prompt, adapter, SamplingParams(**params)))


def model_name(adapter: str | None) -> str:
    return adapter or BASE


def references(engine: Engine, max_tokens: int) -> dict[tuple[str | None, str], GenerationResult]:
    refs = {
        (adapter, prompt): alone(engine, prompt, adapter, max_tokens=max_tokens)
        for adapter in (None, *FAMILIES)
        for prompt in PROMPTS
    }
    for prompt in PROMPTS:  # a row served the wrong adapter must show
        texts = [refs[adapter, prompt].text for adapter in (None, *FAMILIES)]
        assert len(set(texts)) == len(texts)
    return refs


def complete(api: openai.OpenAI, adapter: str | None, prompt: str, max_tokens: int, stream: bool) -> tuple:
    """(text, finish_reason, completion tokens or None when streamed)."""
    kwargs = {"model": model_name(adapter), "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
    if not stream:
        choice = (done := api.completions.create(**kwargs)).choices[0]
        return choice.text, choice.finish_reason, done.usage.completion_tokens
    chunks = list(api.completions.create(stream=True, **kwargs))
    assert all(c.choices[0].text for c in chunks[:-1])  # no empty deltas; only the finish chunk is empty
    return "".join(c.choices[0].text for c in chunks), chunks[-1].choices[0].finish_reason, None


def test_concurrent_greedy_requests_across_families_equal_each_alone(engine: Engine, url: str) -> None:
    refs = references(engine, max_tokens=12)
    jobs = [(adapter, prompt, stream) for (adapter, prompt) in refs for stream in (False, True)]
    with ThreadPoolExecutor(len(jobs)) as pool:
        answers = list(pool.map(lambda job: complete(client(url), job[0], job[1], 12, job[2]), jobs))
    for (adapter, prompt, stream), (text, finish, tokens) in zip(jobs, answers, strict=True):
        ref = refs[adapter, prompt]
        assert (text, finish) == (ref.text, ref.finish_reason), (adapter, prompt, stream)
        assert stream or tokens == ref.completion_tokens


def test_requests_queued_together_run_as_one_mixed_family_batch(adapter_folders: dict[str, Path]) -> None:
    """Held in the queue until the loop starts, five requests (base and four families) are admitted
    in one step, so they decode as one batch; each still gets exactly its own output."""
    engine = Engine(EngineConfig(base=BASE, max_adapters=4, max_batch_size=16))
    for family in FAMILIES:
        engine.register(family, str(adapter_folders[family]))
    refs = {adapter: alone(engine, PROMPTS[1], adapter, max_tokens=10) for adapter in (None, *FAMILIES)}
    try:
        with serve_in_background(create_app(engine)) as url, ThreadPoolExecutor(len(refs)) as pool:
            answers = {
                adapter: pool.submit(complete, client(url), adapter, PROMPTS[1], 10, stream=i % 2 == 1)
                for i, adapter in enumerate(refs)
            }
            wait_until(lambda: engine.stats()["queue_depth"] == len(refs))
            engine.start()
            for adapter, answer in answers.items():
                text, finish, _ = answer.result()
                assert (text, finish) == (refs[adapter].text, refs[adapter].finish_reason), adapter
    finally:
        engine.stop(grace_s=5)


def test_chat_stop_seed_and_models_through_the_engine(engine: Engine, url: str) -> None:
    api = client(url)
    listed = {m.id: m.metadata for m in api.models.list().data}
    assert listed[BASE]["kind"] == "base"
    assert {name: listed[name]["method"] for name in FAMILIES} == {f: f for f in FAMILIES}
    assert listed["lora"]["rank"] == 8 and listed["prompt_tuning"]["num_virtual_tokens"] == 4

    messages = [{"role": "user", "content": "tell me about the review"}]
    prompt_ids = list(engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True)["input_ids"])
    chat = api.chat.completions.create(model="ia3", messages=messages, max_tokens=10, temperature=0)
    ref = alone(engine, prompt_ids, "ia3", max_tokens=10)
    assert chat.choices[0].message.content == ref.text
    assert chat.usage.prompt_tokens == len(prompt_ids) == ref.prompt_tokens

    full = alone(engine, PROMPTS[0], "lora", max_tokens=20).text
    stop = full[8:11]
    stopped = api.completions.create(
        model="lora", prompt=PROMPTS[0], max_tokens=20, temperature=0, stop=[stop]
    )
    assert stopped.choices[0].text == full[: full.index(stop)] and stopped.choices[0].finish_reason == "stop"

    sampled = {"max_tokens": 10, "temperature": 0.9, "top_p": 0.8, "seed": 11}
    first, second = (
        api.completions.create(model="prefix_tuning", prompt=PROMPTS[1], **sampled) for _ in "ab"
    )
    assert (
        first.choices[0].text
        == second.choices[0].text
        == alone(engine, PROMPTS[1], "prefix_tuning", **sampled).text
    )
    other_seed = api.completions.create(model="prefix_tuning", prompt=PROMPTS[1], **{**sampled, "seed": 12})
    assert other_seed.choices[0].text != first.choices[0].text

    too_long = httpx.post(f"{url}/v1/completions", json={"model": "lora", "prompt": "the food was " * 200})
    assert too_long.status_code == 400 and too_long.json()["error"]["code"] == "prompt_too_long"


@pytest.mark.slow
def test_load_200_requests_from_16_clients(engine: Engine, url: str) -> None:
    refs = references(engine, max_tokens=6)
    messages = [{"role": "user", "content": "hello how are you"}]
    chat_ids = list(engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True)["input_ids"])
    chat_refs = {
        adapter: alone(engine, chat_ids, adapter, max_tokens=6).text for adapter in (None, *FAMILIES)
    }
    keys = list(refs)
    clients = threading.local()

    def run(i: int) -> tuple[str, str]:
        """(expected, answered) for request ``i``: a chat, a streamed or a plain completion."""
        if not hasattr(clients, "api"):
            clients.api = client(url)
        adapter, prompt = keys[i % len(keys)]
        if i % 5 == 0:
            chat = clients.api.chat.completions.create(
                model=model_name(adapter), messages=messages, max_tokens=6, temperature=0
            )
            return chat_refs[adapter], chat.choices[0].message.content
        return refs[adapter, prompt].text, complete(clients.api, adapter, prompt, 6, stream=i % 3 == 0)[0]

    started = time.monotonic()
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(run, range(200)))
    assert time.monotonic() - started < 300
    assert [expected for expected, _ in answers] == [answered for _, answered in answers]
    metrics = httpx.get(f"{url}/metrics").text
    assert "adapterhub_in_flight_generations 0.0" in metrics


def test_adapters_load_and_unload_while_requests_arrive(
    engine: Engine, url: str, adapter_folders: dict[str, Path]
) -> None:
    source = str(adapter_folders["lora-spare"])
    bad = httpx.post(f"{url}/v1/adapters", json={"name": "x", "source": "/no/such/adapter"}, timeout=60)
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "bad_adapter_source"
    loaded = httpx.post(f"{url}/v1/adapters", json={"name": "spare", "source": source}, timeout=60)
    assert loaded.status_code == 201 and loaded.json()["metadata"]["method"] == "lora"
    ref = alone(engine, PROMPTS[0], "spare", max_tokens=6)
    assert ref.text != alone(engine, PROMPTS[0], "lora", max_tokens=6).text
    assert complete(client(url), "spare", PROMPTS[0], 6, stream=False)[0] == ref.text

    long_ref = alone(engine, PROMPTS[1], "spare", max_tokens=60)
    long_body = {"model": "spare", "prompt": PROMPTS[1], "max_tokens": 60, "temperature": 0, "stream": True}
    body = {"model": "spare", "prompt": PROMPTS[0], "max_tokens": 6, "temperature": 0}
    outcomes: list[list[tuple[int, str]]] = [[] for _ in range(6)]
    stop = threading.Event()

    def keep_asking(mine: list[tuple[int, str]]) -> None:
        with httpx.Client(timeout=120) as http:
            while not stop.is_set():
                response = http.post(f"{url}/v1/completions", json=body)
                payload = response.json()
                answer = payload["choices"][0]["text"] if response.is_success else payload["error"]["code"]
                mine.append((response.status_code, answer))

    askers = [threading.Thread(target=keep_asking, args=(mine,)) for mine in outcomes]
    with httpx.stream("POST", f"{url}/v1/completions", json=long_body, timeout=120) as in_flight:
        events = in_flight.iter_lines()
        streamed = [next(line for line in events if line.startswith("data: "))]
        for asker in askers:
            asker.start()
        wait_until(lambda: all(outcomes))
        unloaded = httpx.delete(f"{url}/v1/adapters/spare", timeout=60)
        wait_until(lambda: all((404, "unknown_adapter") in mine for mine in outcomes))
        stop.set()
        streamed += [line for line in events if line.startswith("data: ")]
    for asker in askers:
        asker.join(120)
    assert unloaded.status_code == 200 and unloaded.json()["deleted"] is True
    for mine in outcomes:  # served correctly until the unload, refused from then on
        refused_from = mine.index((404, "unknown_adapter"))
        assert set(mine[:refused_from]) <= {(200, ref.text)}
        assert set(mine[refused_from:]) == {(404, "unknown_adapter")}
    assert streamed[-1] == "data: [DONE]"
    chunks = [json.loads(line.removeprefix("data: ")) for line in streamed[:-1]]
    if "error" in chunks[-1]:  # the contract lets a running request fail cleanly instead
        assert chunks[-1]["error"]["code"]
    else:
        assert "".join(c["choices"][0]["text"] for c in chunks) == long_ref.text
    assert "spare" not in [m.id for m in client(url).models.list().data]
    again = httpx.post(f"{url}/v1/adapters", json={"name": "spare", "source": source}, timeout=60)
    assert again.status_code == 201
    assert complete(client(url), "spare", PROMPTS[0], 6, stream=True)[0] == ref.text
    assert httpx.delete(f"{url}/v1/adapters/spare", timeout=60).status_code == 200


def test_inputs_that_once_crashed_the_server_are_refused_on_a_live_connection(
    url: str, adapter_folders: dict[str, Path]
) -> None:
    """Each gets a 4xx with an OpenAI body, no pickle runs, and the same keep-alive connection then
    serves the next request."""
    root = adapter_folders["lora"].parent
    marker = root / "unpickled"
    pickled = root / "pickled"
    pickled.mkdir(exist_ok=True)
    shutil.copy(adapter_folders["lora"] / "adapter_config.json", pickled)
    (pickled / "adapter_model.bin").write_bytes(marker_pickle(marker))
    nested = root / "nested"
    nested.mkdir(exist_ok=True)
    (nested / "adapter_config.json").write_text("[" * 100_000 + "]" * 100_000)
    completion = '{"model": "%s", "prompt": %s, "max_tokens": 2, "temperature": 1, "seed": %d}'
    chat = '{"model": "lora", "messages": [{"role": "user", "content": "%s"}]}'
    bad_inputs = [
        ("/v1/completions", completion % (BASE, '"hi"', 2**63), 422, "invalid_value"),
        ("/v1/completions", completion % (BASE, '"hi"', -(2**63) - 1), 422, "invalid_value"),
        ("/v1/completions", completion % (BASE, '"\\ud800"', 1), 422, "invalid_value"),
        ("/v1/completions", completion % ("\\udfff", '"hi"', 1), 422, "invalid_value"),
        ("/v1/chat/completions", chat % "a\\ud83d", 422, "invalid_value"),
        ("/v1/adapters", '{"name": "p", "source": "pickled"}', 400, "corrupt_adapter"),
        ("/v1/adapters", '{"name": "n", "source": "nested"}', 400, "corrupt_adapter"),
    ]
    connection = KeepAlive(url)
    for path, body, status, code in bad_inputs:
        answered, _, answer = connection.send("POST", path, body)
        assert (answered, answer["error"]["code"]) == (status, code), (path, body, answer)
        assert "\n" not in answer["error"]["message"]
        assert connection.send("GET", "/v1/models")[0] == 200
    top_seed = completion % (BASE, '"hi"', 2**63 - 1)
    assert connection.send("POST", "/v1/completions", top_seed)[0] == 200
    connection.close()
    assert not marker.exists()


def refuses_connections(url: str, within_s: float = 10.0) -> bool:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            httpx.get(f"{url}/health", timeout=1)
        except httpx.TransportError:
            return True
        time.sleep(0.05)
    return False


def start_serve(*args: str) -> tuple[subprocess.Popen, str]:
    """A real ``adapterhub serve`` on a free port, once it answers /health."""
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "adapterhub", "serve", "--port", str(port), *args],
        env=os.environ.copy(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        assert server.poll() is None, server.stdout.read()
        assert time.monotonic() < deadline
        try:
            if httpx.get(f"{url}/health").status_code == 200:
                return server, url
        except httpx.TransportError:
            time.sleep(0.2)


@pytest.mark.slow
def test_sigterm_finishes_the_request_in_flight_then_exits(
    engine: Engine, adapter_folders: dict[str, Path]
) -> None:
    expected = alone(engine, "hello", "prompt_tuning", max_tokens=150)
    assert expected.finish_reason == "length"
    server, url = start_serve("--adapters", f"pt={adapter_folders['prompt_tuning']}", "--grace", "60")
    try:
        body = {"model": "pt", "prompt": "hello", "max_tokens": 150, "temperature": 0, "stream": True}
        events = []
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=120) as response:
            lines = response.iter_lines()
            for line in lines:
                if line.startswith("data: "):
                    events.append(line.removeprefix("data: "))
                    break
            server.send_signal(signal.SIGTERM)
            assert refuses_connections(url)
            events += [line.removeprefix("data: ") for line in lines if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        choices = [json.loads(event)["choices"][0] for event in events[:-1]]
        assert (
            "".join(c["text"] for c in choices) == expected.text and choices[-1]["finish_reason"] == "length"
        )
        assert server.wait(60) == 0
        assert "SIGTERM: 1 in-flight request(s) finished; stopping" in server.stdout.read()
    finally:
        if server.poll() is None:
            server.kill()


@pytest.mark.slow
def test_sigterm_past_a_short_grace_gives_every_client_an_answer_or_an_error(
    engine: Engine, adapter_folders: dict[str, Path]
) -> None:
    """Long requests outlive a 0.5 s grace: each client gets its whole answer, or a 503 body / an SSE
    error event and [DONE]; the log counts both truthfully."""
    server, url = start_serve("--adapters", f"pt={adapter_folders['prompt_tuning']}", "--grace", "0.5")
    body = {"model": "pt", "prompt": "hello", "max_tokens": 500, "temperature": 0}  # most of the context
    outcomes: list[str] = []
    first_token = threading.Event()

    def stream() -> None:
        with httpx.stream(
            "POST", f"{url}/v1/completions", json={**body, "stream": True}, timeout=120
        ) as answer:
            events = []
            for line in answer.iter_lines():
                if line.startswith("data: "):
                    events.append(line.removeprefix("data: "))
                    first_token.set()
        assert events[-1] == "[DONE]"
        last = json.loads(events[-2])
        outcomes.append("cancelled" if last.get("error", {}).get("code") == "cancelled" else "finished")
        assert "error" in last or last["choices"][0]["finish_reason"] == "length"

    def whole() -> None:
        answer = httpx.post(f"{url}/v1/completions", json=body, timeout=120)
        if answer.status_code == 503:
            assert answer.json()["error"]["code"] == "cancelled"
            outcomes.append("cancelled")
        else:
            assert answer.status_code == 200 and answer.json()["choices"][0]["finish_reason"] == "length"
            outcomes.append("finished")

    clients = [threading.Thread(target=stream), threading.Thread(target=whole)]
    try:
        for client in clients:
            client.start()
        assert first_token.wait(120)
        server.send_signal(signal.SIGTERM)
        for client in clients:
            client.join(120)
        assert server.wait(60) == 0
        log = server.stdout.read()
    finally:
        if server.poll() is None:
            server.kill()
    assert len(outcomes) == 2
    finished, cancelled = outcomes.count("finished"), outcomes.count("cancelled")
    summary = f"SIGTERM: {finished} in-flight request(s) finished"
    if cancelled:
        summary += f", {cancelled} cancelled after the 0.5 s grace"
    assert f"{summary}; stopping" in log, log[-2000:]
