"""The HTTP layer over a scripted engine: routes, streaming, auth, limits, errors, metrics, cancellation."""

from __future__ import annotations

import json
import socket
import threading
from pathlib import Path

import httpx
import openai
import pytest
from scripted_engine import ScriptedEngine, wait_until

from adapterhub.runtime.api import RequestError
from adapterhub.server.app import create_app
from adapterhub.server.background import serve_in_background
from adapterhub.server.loading_policy import LoadingPolicy


def client(url: str, api_key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=api_key, max_retries=0, timeout=30)


def sse_events(response: httpx.Response) -> list[str]:
    return [line.removeprefix("data: ") for line in response.iter_lines() if line.startswith("data: ")]


def test_models_completions_and_chat(scripted: ScriptedEngine) -> None:
    with serve_in_background(create_app(scripted)) as url:
        api = client(url)
        models = api.models.list().data
        assert [m.id for m in models] == ["builtin:tiny-llama", "lora-a", "ia3-b"]
        assert [m.metadata["method"] for m in models[1:]] == ["lora", "ia3"]
        assert api.models.retrieve("ia3-b").parent == "builtin:tiny-llama"

        done = api.completions.create(model="lora-a", prompt="the food was", max_tokens=4, temperature=0)
        prompt_ids = scripted.tokenizer("the food was").input_ids
        assert done.choices[0].text == scripted.reply_text("lora-a", prompt_ids, 4)
        assert done.choices[0].finish_reason == "length"
        assert done.usage.prompt_tokens == len(prompt_ids)
        assert done.usage.completion_tokens == 4 and done.usage.total_tokens == len(prompt_ids) + 4

        base = api.completions.create(model="builtin:tiny-llama", prompt=[[5, 6, 7], [8, 9]], max_tokens=2)
        assert [c.index for c in base.choices] == [0, 1]
        assert [c.text for c in base.choices] == [
            scripted.reply_text(None, ids, 2) for ids in ([5, 6, 7], [8, 9])
        ]
        assert [h.request.prompt for h in scripted.handles[-2:]] == [[5, 6, 7], [8, 9]]

        messages = [{"role": "system", "content": "be kind"}, {"role": "user", "content": "hello"}]
        chat = api.chat.completions.create(model="ia3-b", messages=messages, max_tokens=3, seed=7)
        template_ids = scripted.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True
        )
        assert scripted.handles[-1].request.prompt == list(template_ids["input_ids"])
        assert scripted.handles[-1].request.params.seed == 7
        assert chat.choices[0].message.role == "assistant"
        assert chat.choices[0].message.content == scripted.reply_text("ia3-b", template_ids["input_ids"], 3)
        assert chat.usage.prompt_tokens == len(template_ids["input_ids"])


def test_sampling_fields_reach_the_engine(scripted: ScriptedEngine) -> None:
    with serve_in_background(create_app(scripted)) as url:
        client(url).completions.create(
            model="lora-a",
            prompt="hi",
            max_tokens=5,
            temperature=0.7,
            top_p=0.9,
            seed=3,
            stop=["x", "yz"],
            n=2,
        )
    first, second = (h.request.params for h in scripted.handles[-2:])
    assert (first.max_tokens, first.temperature, first.top_p, first.seed, first.stop) == (
        5,
        0.7,
        0.9,
        3,
        ("x", "yz"),
    )
    assert second.seed == 4  # each of n choices samples with its own seed


def test_streaming_matches_non_streaming_and_ends_with_done(scripted: ScriptedEngine) -> None:
    with serve_in_background(create_app(scripted)) as url:
        api = client(url)
        whole = api.completions.create(model="lora-a", prompt="the room", max_tokens=6).choices[0].text
        chunks = list(api.completions.create(model="lora-a", prompt="the room", max_tokens=6, stream=True))
        assert "".join(c.choices[0].text for c in chunks) == whole
        assert chunks[-1].choices[0].finish_reason == "length"

        messages = [{"role": "user", "content": "hello"}]
        chat_whole = api.chat.completions.create(model="ia3-b", messages=messages, max_tokens=5)
        stream = api.chat.completions.create(
            model="ia3-b",
            messages=messages,
            max_tokens=5,
            stream=True,
            stream_options={"include_usage": True},
        )
        chat_chunks = list(stream)
        assert chat_chunks[0].choices[0].delta.role == "assistant"
        text = "".join(c.choices[0].delta.content or "" for c in chat_chunks if c.choices)
        assert text == chat_whole.choices[0].message.content
        assert chat_chunks[-1].choices == [] and chat_chunks[-1].usage.completion_tokens == 5

        body = {"model": "lora-a", "prompt": "hi", "max_tokens": 3, "stream": True}
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=30) as response:
            assert response.headers["content-type"].startswith("text/event-stream")
            events = sse_events(response)
        assert events[-1] == "[DONE]"
        assert [json.loads(e)["object"] for e in events[:-1]] == ["text_completion"] * 4


def test_api_key_guards_v1_routes_only(scripted: ScriptedEngine) -> None:
    with serve_in_background(create_app(scripted, api_key="s3cret")) as url:
        with pytest.raises(openai.AuthenticationError) as refused:
            client(url, api_key="wrong").models.list()
        assert refused.value.status_code == 401
        assert refused.value.body["code"] == "invalid_api_key"
        for method, path in (
            ("GET", "/v1/models"),
            ("POST", "/v1/completions"),
            ("DELETE", "/v1/adapters/x"),
        ):
            assert httpx.request(method, f"{url}{path}", json={}).status_code == 401
        assert (
            httpx.post(f"{url}/v1/adapters", json={}, headers={"Authorization": "Bearer s3cret"}).status_code
            == 422
        )
        assert client(url, api_key="s3cret").models.list().data[0].id == "builtin:tiny-llama"
        assert httpx.get(f"{url}/health").json()["status"] == "ok"
        assert httpx.get(f"{url}/metrics").status_code == 200


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ({"model": "nope", "prompt": "hi"}, 404, "unknown_adapter"),
        ({"model": "lora-a", "prompt": "the food " * 40}, 400, "prompt_too_long"),
        ({"model": "lora-a", "prompt": "hi", "temperature": 5}, 422, "invalid_value"),
        ({"model": "lora-a", "prompt": "hi", "max_tokens": 0}, 400, "invalid_value"),
        ({"model": "lora-a"}, 422, "invalid_value"),
        ({"model": "lora-a", "prompt": "hi", "max_tokens": 33}, 400, "max_tokens_too_large"),
        ({"model": "lora-a", "prompt": "hi", "suffix": "!"}, 400, "unsupported"),
        ({"model": "lora-a", "prompt": "hi", "no_such_field": 1}, 400, "unsupported"),
        ({"model": "lora-a", "prompt": []}, 400, "invalid_value"),
    ],
)
def test_error_statuses_and_openai_bodies(
    scripted: ScriptedEngine, body: dict, status: int, code: str
) -> None:
    with serve_in_background(create_app(scripted, max_tokens_cap=32)) as url:
        response = httpx.post(f"{url}/v1/completions", json=body, timeout=30)
    assert response.status_code == status
    error = response.json()["error"]
    assert error["code"] == code and error["type"] and error["message"]
    assert "\n" not in error["message"]


def test_openai_client_raises_the_matching_errors(scripted: ScriptedEngine) -> None:
    with serve_in_background(create_app(scripted)) as url:
        api = client(url)
        with pytest.raises(openai.NotFoundError, match="model 'nope' is not served here"):
            api.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
        with pytest.raises(openai.UnprocessableEntityError, match="temperature"):
            api.completions.create(model="lora-a", prompt="hi", temperature=-1)
        with pytest.raises(openai.UnprocessableEntityError, match="messages"):
            api.chat.completions.create(model="lora-a", messages=[])
        scripted.max_queue = 0
        with pytest.raises(openai.RateLimitError, match="queue full"):
            api.completions.create(model="lora-a", prompt="hi")


def test_body_limit_and_unknown_route(scripted: ScriptedEngine) -> None:
    with serve_in_background(create_app(scripted, max_body_bytes=2000)) as url:
        big = {"model": "lora-a", "prompt": "x" * 5000}
        response = httpx.post(f"{url}/v1/completions", json=big, timeout=30)
        assert response.status_code == 413 and response.json()["error"]["code"] == "body_too_large"

        def chunks():
            yield b'{"model": "lora-a", "prompt": "'
            yield b"y" * 3000
            yield b'"}'

        chunked = httpx.post(f"{url}/v1/completions", content=chunks(), timeout=30)
        assert chunked.status_code == 413
        missing = httpx.get(f"{url}/v1/nothing-here", timeout=30)
        assert missing.status_code == 404 and missing.json()["error"]["message"]


def test_server_queue_limit_answers_429(scripted: ScriptedEngine) -> None:
    scripted.gate.clear()
    with serve_in_background(create_app(scripted, max_queue=2)) as url:
        waiting = [
            threading.Thread(
                target=client(url).completions.create, kwargs={"model": "lora-a", "prompt": "hi"}
            )
            for _ in range(2)
        ]
        for thread in waiting:
            thread.start()
        wait_until(lambda: len(scripted.handles) == 2)
        with pytest.raises(openai.RateLimitError, match="queue is full"):
            client(url).completions.create(model="lora-a", prompt="hi")
        scripted.gate.set()
        for thread in waiting:
            thread.join(30)
        assert client(url).completions.create(model="lora-a", prompt="hi").choices[0].text


@pytest.mark.parametrize("stream", [False, True])
def test_client_disconnect_cancels_generation(scripted: ScriptedEngine, stream: bool) -> None:
    scripted.gate.clear()
    with serve_in_background(create_app(scripted)) as url:
        port = int(url.rsplit(":", 1)[1])
        body = json.dumps({"model": "lora-a", "prompt": "hi", "max_tokens": 8, "stream": stream}).encode()
        head = "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body)
            wait_until(lambda: len(scripted.handles) == 1)
        handle = scripted.handles[0]
        wait_until(handle.cancelled.is_set)
        wait_until(lambda: handle.done)
        assert handle.outcome.finish_reason == "cancelled"
        metrics = httpx.get(f"{url}/metrics").text
        assert "adapterhub_in_flight_generations 0.0" in metrics


def test_failure_mid_stream_is_an_error_event(scripted: ScriptedEngine) -> None:
    with serve_in_background(create_app(scripted)) as url:
        scripted.fail_next = RequestError("adapter 'lora-a' was unloaded", "unknown_adapter")
        body = {"model": "lora-a", "prompt": "hi", "max_tokens": 3, "stream": True}
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=30) as response:
            events = sse_events(response)
        assert json.loads(events[0])["error"]["code"] == "unknown_adapter" and events[-1] == "[DONE]"
        scripted.fail_next = RequestError("adapter 'lora-a' was unloaded", "unknown_adapter")
        with pytest.raises(openai.NotFoundError, match="unloaded"):
            client(url).completions.create(model="lora-a", prompt="hi")


def test_a_bug_is_a_500_with_an_openai_body(scripted: ScriptedEngine) -> None:
    scripted.broken = ValueError("slot table corrupted\nsecond line")
    with serve_in_background(create_app(scripted)) as url:
        response = httpx.post(f"{url}/v1/completions", json={"model": "lora-a", "prompt": "hi"}, timeout=30)
    assert response.status_code == 500
    assert response.json()["error"] == {
        "message": "internal error (ValueError: slot table corrupted)",
        "type": "server_error",
        "code": "internal_error",
        "param": None,
    }


def test_adapter_management_routes(scripted: ScriptedEngine, tmp_path: Path) -> None:
    (tmp_path / "pt").mkdir()
    (tmp_path / "pt" / "adapter_config.json").write_text('{"peft_type": "PROMPT_TUNING"}')
    loading = LoadingPolicy(enabled=True, roots=(tmp_path.resolve(),))
    with serve_in_background(create_app(scripted, loading=loading)) as url:
        loaded = httpx.post(f"{url}/v1/adapters", json={"name": "pt-c", "source": "pt"}, timeout=30)
        assert loaded.status_code == 201 and loaded.json()["metadata"]["method"] == "prompt_tuning"
        assert "pt-c" in [m.id for m in client(url).models.list().data]
        again = httpx.post(f"{url}/v1/adapters", json={"name": "pt-c", "source": "pt"}, timeout=30)
        assert again.status_code == 409 and again.json()["error"]["code"] == "adapter_exists"
        assert httpx.delete(f"{url}/v1/adapters/pt-c", timeout=30).json()["deleted"] is True
        gone = httpx.delete(f"{url}/v1/adapters/pt-c", timeout=30)
        assert gone.status_code == 404 and gone.json()["error"]["code"] == "model_not_found"
        assert "pt-c" not in [m.id for m in client(url).models.list().data]


def test_metrics_cover_requests_tokens_engine_and_latency(scripted: ScriptedEngine) -> None:
    first, second = create_app(scripted), create_app(scripted)  # registries must not collide
    with serve_in_background(first) as url:
        client(url).completions.create(model="lora-a", prompt="hi", max_tokens=4)
        httpx.post(f"{url}/v1/completions", json={"model": "nope", "prompt": "hi"})
        text = httpx.get(f"{url}/metrics").text
    assert 'adapterhub_requests_total{route="/v1/completions",status="200"} 1.0' in text
    assert 'adapterhub_requests_total{route="/v1/completions",status="404"} 1.0' in text
    assert 'adapterhub_completion_tokens_total{model="lora-a"} 4.0' in text
    assert 'adapterhub_prompt_tokens_total{model="lora-a"}' in text
    for name in (
        "queue_depth",
        "running",
        "last_batch_size",
        "adapter_loads_total",
        "adapter_evictions_total",
    ):
        assert f"adapterhub_engine_{name} " in text
    assert 'adapterhub_request_latency_seconds_count{route="/v1/completions"} 2.0' in text
    assert 'adapterhub_time_to_first_token_seconds_count{route="/v1/completions"} 1.0' in text
    assert second.state.metrics.registry is not first.state.metrics.registry


def test_openapi_is_served(scripted: ScriptedEngine) -> None:
    with serve_in_background(create_app(scripted)) as url:
        spec = httpx.get(f"{url}/openapi.json").json()
    assert {"/v1/models", "/v1/completions", "/v1/chat/completions", "/v1/adapters", "/health"} <= set(
        spec["paths"]
    )


def test_graceful_shutdown_finishes_in_flight_requests(scripted: ScriptedEngine) -> None:
    import uvicorn

    scripted.gate.clear()
    server = uvicorn.Server(
        uvicorn.Config(create_app(scripted), host="127.0.0.1", port=0, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_until(lambda: server.started)
    url = f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
    outcome: dict = {}

    def ask() -> None:
        outcome["text"] = (
            client(url).completions.create(model="lora-a", prompt="hi", max_tokens=3).choices[0].text
        )

    asking = threading.Thread(target=ask)
    asking.start()
    wait_until(lambda: len(scripted.handles) == 1)
    server.should_exit = True
    wait_until(lambda: not server.servers or not any(s.is_serving() for s in server.servers))
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{url}/health", timeout=5)
    scripted.gate.set()
    asking.join(30)
    thread.join(30)
    assert outcome["text"] == scripted.reply_text("lora-a", scripted.tokenizer("hi").input_ids, 3)


def test_an_unknown_model_is_explained_in_http_terms(scripted: ScriptedEngine) -> None:
    with serve_in_background(create_app(scripted)) as url:
        response = httpx.post(f"{url}/v1/completions", json={"model": "nope", "prompt": "hi"}, timeout=30)
    error = response.json()["error"]
    assert response.status_code == 404 and error["code"] == "unknown_adapter" and error["param"] == "model"
    assert "GET /v1/models" in error["message"] and "POST /v1/adapters" in error["message"]
    assert "--adapters" in error["message"] and "register it" not in error["message"]
