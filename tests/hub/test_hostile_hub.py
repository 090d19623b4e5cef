"""Pulls from a hostile Hub: every attack ends in one line, no code run, and the store as it was."""

from __future__ import annotations

import errno
import json
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from scripted_engine import ScriptedEngine, wait_until

from adapterhub.hub import pull, push_folder, store

from .conftest import hub_env, run_main, store_listing, upload_raw
from .fake_hub import FakeHub, alias_bomb, marker_pickle
from .test_bad_input import assert_one_line_error

WEIGHTS = "adapter_model.safetensors"


def test_a_repo_listing_more_than_the_cap_is_refused_before_any_byte(
    hub: FakeHub, held, adapter_copy, capsys, monkeypatch
):
    push_folder(adapter_copy("lora-builtin"), "alice/huge")
    hub.listed_sizes[WEIGHTS] = 50 << 30
    hub.requests.clear()
    code, err = run_main(["pull", "alice/huge"], capsys, monkeypatch)
    assert_one_line_error(code, err, "alice/huge@main lists 50.0 GB", "10.0 GB limit", "--max-size")
    assert not [path for _, path in hub.requests if "/resolve/" in path], "no file was fetched"

    hub.listed_sizes[WEIGHTS] = 1 << 50  # more than any disk here holds
    code, err = run_main(["pull", "alice/huge", "--max-size", "2048TB"], capsys, monkeypatch)
    assert_one_line_error(code, err, "needs 1024.0 TB but", "free", "ADAPTERHUB_HOME")
    assert not [path for _, path in hub.requests if "/resolve/" in path]
    assert store_listing() == held


def test_a_file_that_keeps_coming_past_its_listed_size_is_cut(
    hub: FakeHub, held, adapter_copy, capsys, monkeypatch
):
    source = adapter_copy("lora-builtin")
    push_folder(source, "alice/endless")
    hub.overflowing.add(WEIGHTS)
    started = time.monotonic()
    code, err = run_main(["pull", "alice/endless"], capsys, monkeypatch)
    assert_one_line_error(code, err, "alice/endless@main sent more than its listed", "transfer was cut")
    assert time.monotonic() - started < 30
    assert store_listing() == held


def test_a_connection_dropped_mid_file_forever_ends_at_the_deadline(
    hub: FakeHub, held, adapter_copy, capsys, monkeypatch
):
    import huggingface_hub.constants as hf_constants

    push_folder(adapter_copy("lora-builtin"), "alice/flaky")
    hub.dropping[WEIGHTS] = 1000  # each try: a 200 for the whole file, 1000 bytes, a dropped connection
    # huggingface_hub starts over as long as a try brings a whole chunk; the real attack drops every
    # 200 MB against its 10 MB chunks, this one every 1000 bytes against 512-byte chunks.
    monkeypatch.setattr(hf_constants, "DOWNLOAD_CHUNK_SIZE", 512)
    code, err = run_main(["pull", "alice/flaky", "--timeout", "2"], capsys, monkeypatch)
    assert_one_line_error(code, err, "pulling alice/flaky@main took over 2 s", "--timeout")
    assert 2 <= hub.downloads(WEIGHTS) <= 6, "huggingface_hub retried, and the deadline stopped it"
    assert store_listing() == held


def test_a_pickle_in_adapter_model_bin_is_never_run(
    hub: FakeHub, held, adapter_copy, capsys, monkeypatch, tmp_path
):
    marker = tmp_path / "pwned"
    config = (adapter_copy("lora-builtin") / "adapter_config.json").read_bytes()
    upload_raw(
        hub, "alice/pickled", {"adapter_config.json": config, "adapter_model.bin": marker_pickle(marker)}
    )
    code, err = run_main(["pull", "alice/pickled"], capsys, monkeypatch)
    assert_one_line_error(code, err, "adapter_model.bin holds more than plain tensors")
    assert not marker.exists()
    assert store_listing() == held


def test_an_alias_bomb_recipe_is_stored_as_bytes_and_never_expanded(hub: FakeHub, held, adapter_copy):
    """``pull`` does not read recipe.yaml; whatever reads it later must cap aliases (issue 15)."""
    source = adapter_copy("lora-builtin")
    (source / "recipe.yaml").write_bytes(alias_bomb())
    upload_raw(
        hub,
        "alice/bomb",
        {name: (source / name).read_bytes() for name in ("adapter_config.json", WEIGHTS, "recipe.yaml")},
    )
    started = time.monotonic()
    pulled = pull("alice/bomb")
    assert time.monotonic() - started < 30
    assert (pulled.path / "recipe.yaml").read_bytes() == alias_bomb()
    assert store.verify("bomb") == []


def test_a_full_disk_mid_download_is_one_line_and_leaves_nothing(
    hub: FakeHub, held, adapter_copy, capsys, monkeypatch
):
    import huggingface_hub.file_download as file_download

    push_folder(adapter_copy("lora-builtin"), "alice/big")
    real_http_get = file_download.http_get

    class FullDisk:
        """The download's temp file on a disk that fills up after 1000 bytes."""

        def __init__(self, inner) -> None:
            self.inner, self.written = inner, 0

        def write(self, data: bytes) -> int:
            if self.written + len(data) > 1000:
                raise OSError(errno.ENOSPC, "No space left on device")
            self.written += len(data)
            return self.inner.write(data)

        def __getattr__(self, name: str):
            return getattr(self.inner, name)

    def http_get_onto_a_full_disk(url, temp_file, **kwargs):
        return real_http_get(url, FullDisk(temp_file), **kwargs)

    monkeypatch.setattr(file_download, "http_get", http_get_onto_a_full_disk)
    code, err = run_main(["pull", "alice/big"], capsys, monkeypatch)
    assert_one_line_error(code, err, "adapters/big: no space left on the device", "free some space")
    assert store_listing() == held


@pytest.mark.slow
def test_two_pulls_to_one_name_one_wins_the_other_fails_at_once(hub: FakeHub, adapter_copy, tmp_path: Path):
    push_folder(adapter_copy("lora-builtin"), "alice/one")
    push_folder(adapter_copy("ia3"), "alice/two")
    hub.download_gate = threading.Event()
    env = hub_env(hub, tmp_path)
    command = [sys.executable, "-m", "adapterhub", "pull"]
    first = subprocess.Popen(
        [*command, "alice/one", "--name", "same"], env=env, stderr=subprocess.PIPE, text=True
    )
    try:
        wait_until(lambda: any("/alice/one/resolve/" in path for _, path in hub.requests))
        lock_file = store.root() / ".same.lock"
        assert lock_file.read_text() == str(first.pid)
        second = subprocess.run(
            [*command, "alice/two", "--name", "same"], env=env, capture_output=True, text=True, timeout=120
        )
        assert second.returncode == 1
        assert second.stderr.strip() == (
            f"error: store name 'same' is being written by another adapterhub process (PID {first.pid}): "
            "wait for it to finish, or use another name"
        )
        hub.download_gate.set()
        assert first.wait(120) == 0, first.stderr.read()
    finally:
        hub.download_gate.set()
        if first.poll() is None:
            first.kill()
    assert store.read("same").source == "alice/one" and store.verify("same") == []
    assert not lock_file.exists()


@pytest.fixture
def loading_server(hub: FakeHub, tiny_llama: Path):
    """A server (scripted engine) that may pull Hub ids: its URL and app."""
    from transformers import AutoTokenizer

    from adapterhub.server.app import create_app
    from adapterhub.server.background import serve_in_background
    from adapterhub.server.loading_policy import LoadingPolicy

    engine = ScriptedEngine(AutoTokenizer.from_pretrained(tiny_llama))
    app = create_app(engine, loading=LoadingPolicy(enabled=True, hub_pulls=True))
    with serve_in_background(app) as url:
        yield url, app, engine


def test_the_servers_pulls_have_the_same_bounds(hub: FakeHub, held, adapter_copy, loading_server) -> None:
    url, _, engine = loading_server
    push_folder(adapter_copy("lora-builtin"), "alice/huge")
    hub.listed_sizes[WEIGHTS] = 50 << 30
    refused = httpx.post(f"{url}/v1/adapters", json={"name": "huge", "source": "alice/huge"}, timeout=60)
    assert refused.status_code == 400 and refused.json()["error"]["code"] == "bad_adapter_source"
    assert "alice/huge@main lists 50.0 GB" in refused.json()["error"]["message"]
    hub.listed_sizes.clear()
    pulled = httpx.post(f"{url}/v1/adapters", json={"name": "huge", "source": "alice/huge"}, timeout=60)
    assert pulled.status_code == 201 and engine.adapters["huge"].source == str(store.entry_path("huge"))
    assert store.verify("huge") == []


def test_a_client_that_hangs_up_stops_the_servers_pull(
    hub: FakeHub, held, adapter_copy, loading_server
) -> None:
    url, app, engine = loading_server
    push_folder(adapter_copy("lora-builtin"), "alice/slow")
    hub.download_gate = threading.Event()
    body = json.dumps({"name": "slow", "source": "alice/slow"}).encode()
    head = "POST /v1/adapters HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    with socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1]))) as sock:
        sock.sendall(f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body)
        wait_until(lambda: any("/alice/slow/resolve/" in path for _, path in hub.requests))
    wait_until(lambda: app.state.drain.pulls and all(cancel.is_set() for cancel in app.state.drain.pulls))
    hub.download_gate.set()  # the first bytes arrive; the pull sees it was cancelled and stops
    wait_until(lambda: not app.state.drain.pulls)
    assert "slow" not in engine.adapters
    assert store_listing() == held
