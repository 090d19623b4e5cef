"""The server against hostile or unlucky clients: runtime loading policy, keys, bugs on keep-alive
connections, Host checks, slow clients, 429s, metrics of unloaded adapters, and shutdown."""

from __future__ import annotations

import json
import socket
import threading
from pathlib import Path

import httpx
import pytest
import uvicorn
from http_helpers import KeepAlive
from scripted_engine import ScriptedEngine, wait_until

from adapterhub.errors import UserError
from adapterhub.hub import store
from adapterhub.server.app import create_app
from adapterhub.server.background import serve_in_background
from adapterhub.server.http_server import AdapterServer, header_timeout_protocol
from adapterhub.server.loading_policy import LoadingPolicy


def adapter_folder(path: Path, peft_type: str = "LORA") -> Path:
    path.mkdir(parents=True)
    (path / "adapter_config.json").write_text(json.dumps({"peft_type": peft_type}))
    return path


def load(url: str, name: str, source: str, key: str | None = None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(
        f"{url}/v1/adapters", json={"name": name, "source": source}, headers=headers, timeout=30
    )


def test_loading_is_off_by_default_and_the_refusal_names_the_flag(
    scripted: ScriptedEngine, tmp_path: Path
) -> None:
    folder = adapter_folder(tmp_path / "a")
    with serve_in_background(create_app(scripted)) as url:
        refused = load(url, "a", str(folder))
        unload = httpx.delete(f"{url}/v1/adapters/lora-a", timeout=30)
    for response in (refused, unload):
        assert response.status_code == 403
        error = response.json()["error"]
        assert error["code"] == "runtime_loading_disabled" and "--allow-runtime-loading" in error["message"]
    assert [info.name for info in scripted.list()] == ["lora-a", "ia3-b"]


def test_sources_outside_the_roots_and_missing_ones_get_one_refusal(
    scripted: ScriptedEngine, tmp_path: Path
) -> None:
    root = tmp_path / "root"
    adapter_folder(root / "team" / "sql")
    outside = adapter_folder(tmp_path / "outside")
    (root / "link").symlink_to(outside)
    sneaky = root / "sneaky"
    sneaky.mkdir()
    (sneaky / "adapter_config.json").symlink_to(outside / "adapter_config.json")
    loading = LoadingPolicy(enabled=True, roots=(root.resolve(),))
    refused_sources = [
        str(outside),  # exists, outside the roots
        str(tmp_path / "no-such-folder"),  # does not exist
        "/etc",  # exists, not an adapter, outside
        str(root / "link"),  # a symlink under the root to a folder outside it
        "link",
        "../outside",  # climbs out of the root
        "sneaky",  # inside, but its config is a symlink to a file outside
        "missing-name",
    ]
    with serve_in_background(create_app(scripted, loading=loading)) as url:
        answers = [load(url, f"n{index}", source) for index, source in enumerate(refused_sources)]
        by_path = load(url, "sql", str(root / "team" / "sql"))
        by_relative_path = load(url, "sql2", "team/sql")
        hub = load(url, "hub", "alice/some-adapter@v1")
    bodies = {
        json.dumps(answer.json()).replace(source, "SOURCE")
        for answer, source in zip(answers, refused_sources, strict=True)
    }
    assert {answer.status_code for answer in answers} == {400} and len(bodies) == 1
    assert "is not a store name or an adapter folder under this server's --adapter-root" in bodies.pop()
    assert by_path.status_code == by_relative_path.status_code == 201
    assert scripted.adapters["sql2"].source == str((root / "team" / "sql").resolve())
    assert hub.status_code == 403 and hub.json()["error"]["code"] == "hub_pulls_disabled"
    assert "--allow-hub-pulls" in hub.json()["error"]["message"]


def test_store_names_load_when_loading_is_on(scripted: ScriptedEngine) -> None:
    entry = adapter_folder(store.root() / "stored-ia3", "IA3")
    (entry / "manifest.json").write_text("{}")
    try:
        with serve_in_background(create_app(scripted, loading=LoadingPolicy(enabled=True))) as url:
            loaded = load(url, "mine", "stored-ia3")
        assert loaded.status_code == 201 and loaded.json()["metadata"]["method"] == "ia3"
    finally:
        store.remove("stored-ia3")


def test_loading_takes_its_own_admin_key(scripted: ScriptedEngine, tmp_path: Path) -> None:
    folder = adapter_folder(tmp_path / "a")
    loading = LoadingPolicy(enabled=True, roots=(tmp_path.resolve(),), admin_api_key="admin-key")
    with serve_in_background(create_app(scripted, api_key="user-key", loading=loading)) as url:
        assert load(url, "a", str(folder)).status_code == 401
        with_user_key = load(url, "a", str(folder), key="user-key")
        assert with_user_key.status_code == 401 and "admin key" in with_user_key.json()["error"]["message"]
        assert load(url, "a", str(folder), key="admin-key").status_code == 201
        user = {"Authorization": "Bearer user-key"}
        admin = {"Authorization": "Bearer admin-key"}
        assert httpx.get(f"{url}/v1/models", headers=user, timeout=30).status_code == 200
        assert httpx.delete(f"{url}/v1/adapters/a", headers=user, timeout=30).status_code == 401
        assert httpx.delete(f"{url}/v1/adapters/a", headers=admin, timeout=30).status_code == 200


def test_policy_flags_need_runtime_loading_and_real_roots(tmp_path: Path) -> None:
    with pytest.raises(
        UserError, match="--adapter-root only applies to runtime loading: add --allow-runtime-loading"
    ):
        LoadingPolicy.from_options(False, (str(tmp_path),), False, None)
    with pytest.raises(UserError, match="--allow-hub-pulls only applies"):
        LoadingPolicy.from_options(False, (), True, None)
    with pytest.raises(UserError, match=r"--adapter-root .*nope is not a folder"):
        LoadingPolicy.from_options(True, (str(tmp_path / "nope"),), False, None)
    policy = LoadingPolicy.from_options(True, (str(tmp_path),), True, "k")
    assert policy.describe().startswith("runtime loading: on (store names; folders under: ")
    assert "Hub pulls: on" in policy.describe() and "--admin-api-key" in policy.describe()
    assert LoadingPolicy().describe().startswith("runtime loading: off")


def test_bugs_are_500_bodies_and_the_connection_stays_usable(scripted: ScriptedEngine) -> None:
    with serve_in_background(create_app(scripted)) as url:
        connection = KeepAlive(url)
        body = json.dumps({"model": "lora-a", "prompt": "hi", "max_tokens": 2})
        scripted.broken = ValueError("slot table corrupted")  # raised by engine.submit
        status, _, answer = connection.send("POST", "/v1/completions", body)
        assert status == 500 and answer["error"]["code"] == "internal_error"
        scripted.broken = None
        scripted.fail_next = RuntimeError("forward failed\nsecond line")  # a generation that fails
        status, _, answer = connection.send("POST", "/v1/completions", body)
        assert (status, answer["error"]["message"]) == (500, "internal error (RuntimeError: forward failed)")
        scripted.fail_next = RuntimeError("forward failed")
        stream = json.dumps({"model": "lora-a", "prompt": "hi", "max_tokens": 2, "stream": True})
        status, _, events = connection.send("POST", "/v1/completions", stream)
        data = [line.removeprefix("data: ") for line in events.splitlines() if line.startswith("data: ")]
        assert (
            status == 200
            and json.loads(data[-2])["error"]["code"] == "internal_error"
            and data[-1] == "[DONE]"
        )
        status, _, answer = connection.send("POST", "/v1/completions", body)
        assert status == 200 and answer["choices"][0]["text"]
        connection.close()


def test_429s_say_when_to_retry(scripted: ScriptedEngine) -> None:
    with serve_in_background(create_app(scripted)) as url:
        scripted.max_queue = 0  # the engine's own queue is full
        full = httpx.post(f"{url}/v1/completions", json={"model": "lora-a", "prompt": "hi"}, timeout=30)
    with serve_in_background(create_app(scripted, max_queue=1)) as url:
        too_many = httpx.post(
            f"{url}/v1/completions", json={"model": "lora-a", "prompt": ["a", "b"]}, timeout=30
        )
    for response in (full, too_many):
        assert response.status_code == 429 and response.headers["retry-after"] == "1"


def test_only_allowed_host_names_are_answered(scripted: ScriptedEngine) -> None:
    app = create_app(scripted, allowed_hosts=("localhost", "127.0.0.1", "*.example.com"))
    with serve_in_background(app) as url:
        port = url.rsplit(":", 1)[1]

        def health(host: str) -> httpx.Response:
            return httpx.get(f"{url}/health", headers={"Host": host}, timeout=30)

        rebound = health(f"attacker.test:{port}")
        assert rebound.status_code == 400 and rebound.json()["error"]["code"] == "invalid_host"
        assert "--allowed-hosts" in rebound.json()["error"]["message"]
        assert health("evil-example.com").status_code == 400
        for host in (f"localhost:{port}", "127.0.0.1", "api.example.com"):
            assert health(host).status_code == 200, host


def test_slow_clients_are_timed_out(scripted: ScriptedEngine) -> None:
    app = create_app(scripted, read_timeout_s=0.5)
    with serve_in_background(app, http=header_timeout_protocol(0.5)) as url:
        address = ("127.0.0.1", int(url.rsplit(":", 1)[1]))
        with socket.create_connection(address, timeout=30) as slow_headers:
            slow_headers.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")  # and never the blank line
            answer = read_until_closed(slow_headers)
        assert answer.startswith(b"HTTP/1.1 408 ") and b'"code": "timeout"' in answer
        with socket.create_connection(address, timeout=30) as idle:
            assert read_until_closed(idle) == b""
        with socket.create_connection(address, timeout=30) as slow_body:
            head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            slow_body.sendall(head + b'Content-Length: 100\r\n\r\n{"model": ')
            answer = read_until_closed(slow_body)
        assert answer.startswith(b"HTTP/1.1 408 ") and b"did not arrive within 0.5 s" in answer
        assert httpx.get(f"{url}/health", timeout=30).status_code == 200


def read_until_closed(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (the socket's timeout bounds it)."""
    received = b""
    while chunk := sock.recv(65536):
        received += chunk
    return received


def test_an_unloaded_adapter_leaves_no_metrics(scripted: ScriptedEngine, tmp_path: Path) -> None:
    folder = adapter_folder(tmp_path / "short-lived")
    loading = LoadingPolicy(enabled=True, roots=(tmp_path.resolve(),))
    with serve_in_background(create_app(scripted, loading=loading)) as url:
        assert load(url, "short-lived", str(folder)).status_code == 201
        body = {"model": "short-lived", "prompt": "hi", "max_tokens": 2}
        assert httpx.post(f"{url}/v1/completions", json=body, timeout=30).status_code == 200
        assert 'model="short-lived"' in httpx.get(f"{url}/metrics", timeout=30).text

        scripted.gate.clear()  # one more request, in flight across the unload
        in_flight = threading.Thread(
            target=httpx.post, args=(f"{url}/v1/completions",), kwargs={"json": body}
        )
        in_flight.start()
        wait_until(lambda: len(scripted.handles) == 2)
        assert httpx.delete(f"{url}/v1/adapters/short-lived", timeout=30).status_code == 200
        scripted.gate.set()
        in_flight.join(30)
        metrics = httpx.get(f"{url}/metrics", timeout=30).text
    assert 'model="short-lived"' not in metrics
    assert 'adapterhub_completion_tokens_total{model="lora-a"}' not in metrics  # never asked for


@pytest.mark.parametrize("grace_s", [0.0, 2.0])
def test_shutdown_past_the_grace_answers_every_client(scripted: ScriptedEngine, grace_s: float) -> None:
    """Held requests outlive the grace and are cancelled with an error body or event; one released
    at the shutdown's start may finish; the summary counts what the clients saw."""
    scripted.gate.clear()
    scripted.hold_after = 1
    released = scripted.adapter_gates["ia3-b"] = threading.Event()
    app = create_app(scripted)
    server = AdapterServer(
        uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"), app.state.drain, grace_s
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_until(lambda: server.started)
    url = f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
    outcomes: dict[str, object] = {}

    def ask(name: str, body: dict) -> None:
        if body.get("stream"):
            with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as response:
                outcomes[name] = [
                    line.removeprefix("data: ") for line in response.iter_lines() if line.startswith("data: ")
                ]
        else:
            response = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
            outcomes[name] = (response.status_code, response.json())

    clients = {
        "whole": {"model": "lora-a", "prompt": "hi", "max_tokens": 4},
        "stream": {"model": "lora-a", "prompt": "hi", "max_tokens": 4, "stream": True},
        "released": {"model": "ia3-b", "prompt": "hi", "max_tokens": 4},
    }
    threads = [threading.Thread(target=ask, args=item) for item in clients.items()]
    for client in threads:
        client.start()
    wait_until(lambda: len(app.state.drain.generations) == 3)
    server.should_exit = True  # what uvicorn's SIGTERM handler does
    wait_until(lambda: app.state.drain.draining)
    released.set()
    for client in threads:
        client.join(60)
    thread.join(60)

    assert outcomes["whole"][0] == 503 and outcomes["whole"][1]["error"]["code"] == "cancelled"
    assert "shutting down" in outcomes["whole"][1]["error"]["message"]
    events = outcomes["stream"]
    assert events[-1] == "[DONE]" and json.loads(events[-2])["error"]["code"] == "cancelled"
    status, answer = outcomes["released"]
    full = status == 200 and answer["choices"][0]["text"] == scripted.reply_text(
        "ia3-b", scripted.tokenizer("hi").input_ids, 4
    )
    assert full or (status == 503 and answer["error"]["code"] == "cancelled")
    finished = int(full)
    cancelled = f"{3 - finished} cancelled after the {grace_s:g} s grace"
    assert (
        app.state.drain.summary(grace_s) == f"{finished} in-flight request(s) finished, {cancelled}; stopping"
    )
