"""``adapterhub serve --replicas 2`` on a local Ray (2 CPUs, 127.0.0.1): greedy output through the openai
client equals plain PEFT's for every family, streamed too; requests for an adapter stay on the replica
that loaded it; loads and unloads reach every replica; a replica killed mid-traffic fails its requests
with an error body, and Ray brings it back."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest

pytest.importorskip("ray.serve", reason="Ray Serve is the cluster extra: pip install -e '.[cluster]'")

from adapterhub.models import load_tokenizer
from tests.ports import free_port
from tests.runtime.references import BASE, NEW_TOKENS, peft_reference

pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]

FAMILIES = {"lora": "lora", "ia3": "ia3", "prompt": "prompt_tuning", "prefix": "prefix_tuning"}
PROMPTS = ("the food was", "Review: the room was very clean\nSentiment:")
METRIC = re.compile(r"^(\w+)\{(.*?)\} (\S+)$", re.M)


@pytest.fixture(scope="module")
def folders(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from transformers import AutoModelForCausalLM

    from adapterhub.runtime.random_adapters import peft_config, write_random_adapter

    root = tmp_path_factory.mktemp("cluster-adapters")
    made = {**FAMILIES, "extra": "lora"}
    return {
        name: write_random_adapter(
            AutoModelForCausalLM.from_pretrained(tiny_llama), peft_config(family), root / name, seed
        )
        for seed, (name, family) in enumerate(made.items(), start=11)
    }


def _started(pid: int) -> int | None:
    """A process's start time (clock ticks since boot): with its pid, what identifies it."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def _descendants(pid: int) -> list[tuple[int, int | None]]:
    """Every process below ``pid`` (Ray's gcs_server, raylet and workers below the serve process)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append((child, _started(child)))
            todo.append(child)
    return found


@pytest.fixture(scope="module")
def cluster(folders: dict[str, Path]) -> Iterator[str]:
    port = free_port()
    specs = ",".join(f"{name}={folders[name]}" for name in FAMILIES)
    command = [sys.executable, "-m", "adapterhub", "serve", "--replicas", "2", "--base", BASE]
    command += ["--adapters", specs, "--port", str(port), "--grace", "5"]
    # Clients may load folders under the adapters' root: the loads and unloads below go to every replica.
    command += ["--allow-runtime-loading", "--adapter-root", str(folders["extra"].parent)]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        line = server.stderr.readline()  # "serving ..." once both replicas are up, or the error
        assert "2 replica(s) on a local Ray" in line, line + server.stderr.read()[-3000:]
        threading.Thread(target=server.stderr.read, daemon=True).start()  # never let the pipe fill
        yield url
    finally:
        below = _descendants(server.pid)
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(60)
        finally:
            # Whatever of Ray outlived the serve process; a pid is only ours while its start time is.
            for pid, started in below:
                if started is not None and _started(pid) == started:
                    os.kill(pid, signal.SIGKILL)


def _client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)


def _peft_text(folder: Path | None, prompt: str) -> str:
    """Plain PEFT's greedy continuation (a fresh base per adapter), as text up to EOS."""
    tokens, _ = peft_reference(None if folder is None else str(folder), prompt)
    tokenizer = load_tokenizer(BASE)
    kept = tokens[: tokens.index(tokenizer.eos_token_id)] if tokenizer.eos_token_id in tokens else tokens
    return tokenizer.decode(kept, skip_special_tokens=True)


SERVED: set[tuple[str, str]] = set()  # (adapter, replica) pairs that have served a request


def _complete(api: openai.OpenAI, model: str, prompt: str, stream: bool, **extra) -> tuple[str, str]:
    """(text, the replica that served it)."""
    kwargs = {"model": model, "prompt": prompt, "max_tokens": NEW_TOKENS, "temperature": 0, **extra}
    if stream:
        with api.completions.with_streaming_response.create(stream=True, **kwargs) as response:
            text = "".join(chunk.choices[0].text for chunk in response.parse())
            replica = response.headers["x-adapterhub-replica"]
    else:
        response = api.completions.with_raw_response.create(**kwargs)
        text, replica = response.parse().choices[0].text, response.headers["x-adapterhub-replica"]
    if model != BASE:
        SERVED.add((model, replica))
    return text, replica


def _metrics(url: str) -> dict[tuple[str, str], float]:
    """(metric, replica) -> value of every replica-labelled sample; ("pid", replica) -> its process."""
    found = {}
    for name, labels, value in METRIC.findall(httpx.get(f"{url}/metrics").text):
        replica = re.search(r'replica="([^"]+)"', labels)
        if replica:
            found[(name, replica.group(1))] = float(value)
            pid = re.search(r'pid="(\d+)"', labels)
            if pid:
                found[("pid", replica.group(1))] = float(pid.group(1))
    return found


def _per_replica(url: str, metric: str) -> dict[str, float]:
    return {replica: value for (name, replica), value in _metrics(url).items() if name == metric}


def _wait_for(condition, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := condition():
            return value
        time.sleep(0.25)
    raise AssertionError("condition not met in time")


def test_concurrent_requests_of_every_family_equal_peft_streamed_or_not(
    cluster: str, folders: dict[str, Path]
) -> None:
    jobs = [(name, prompt, stream) for name in (*FAMILIES, BASE) for prompt in PROMPTS for stream in (0, 1)]
    api = _client(cluster)
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda job: _complete(api, *job), jobs))
    for (model, prompt, stream), (text, _) in zip(jobs, answers, strict=True):
        assert text == _peft_text(folders.get(model), prompt), (model, prompt, stream)
    assert [card.id for card in api.models.list().data] == [BASE, *FAMILIES]


def test_requests_stay_on_the_replica_that_loaded_their_adapter(cluster: str) -> None:
    api = _client(cluster)
    for name in FAMILIES:  # warm: each adapter loaded by some replica (it may already be)
        _complete(api, name, PROMPTS[0], False)
    time.sleep(2)  # which replica holds what reaches Ray's routers; metrics reach the router
    requests = _per_replica(cluster, "adapterhub_replica_adapter_requests_total")
    jobs = [name for name in FAMILIES for _ in range(6)]
    with ThreadPoolExecutor(8) as pool:
        served = list(pool.map(lambda name: (name, _complete(api, name, PROMPTS[1], False)[1]), jobs))
    # Every request went to a replica that already held its adapter, so nothing was loaded again:
    # one load per adapter per replica that ever served it, not one per request.
    assert set(served) <= SERVED
    time.sleep(2.5)  # two metric reports
    loads = _per_replica(cluster, "adapterhub_replica_adapter_loads_total")
    assert len(loads) == 2 and sum(loads.values()) == len(SERVED), (loads, SERVED)
    later = _per_replica(cluster, "adapterhub_replica_adapter_requests_total")
    assert sum(later.values()) - sum(requests.values()) == len(jobs)
    slot_loads = _per_replica(cluster, "adapterhub_engine_adapter_loads_total")
    assert sum(slot_loads.values()) == len(SERVED)  # the engines' device slots agree


def test_loads_and_unloads_reach_every_replica(cluster: str, folders: dict[str, Path]) -> None:
    def versions() -> dict[str, float]:
        return _per_replica(cluster, "adapterhub_replica_catalog_version")

    start = max(_wait_for(lambda: len(found := versions()) == 2 and found).values())
    added = httpx.post(f"{cluster}/v1/adapters", json={"name": "extra", "source": str(folders["extra"])})
    assert added.status_code == 201, added.text
    _wait_for(lambda: set(versions().values()) == {start + 1})  # both replicas registered it
    api = _client(cluster)
    assert _complete(api, "extra", PROMPTS[0], True)[0] == _peft_text(folders["extra"], PROMPTS[0])
    assert "extra" in [card.id for card in api.models.list().data]

    assert httpx.delete(f"{cluster}/v1/adapters/extra").status_code == 200
    _wait_for(lambda: set(versions().values()) == {start + 2})
    with pytest.raises(openai.NotFoundError):
        _complete(api, "extra", PROMPTS[0], False)
    assert "extra" not in [card.id for card in api.models.list().data]


def test_a_replica_killed_mid_traffic_fails_its_requests_and_ray_replaces_it(
    cluster: str, folders: dict[str, Path]
) -> None:
    api = _client(cluster)
    _, victim = _complete(api, "lora", PROMPTS[0], False)  # lora lives here (affinity)
    pid = int(_wait_for(lambda: _metrics(cluster).get(("pid", victim))))
    long = {"max_tokens": 400, "extra_body": {"ignore_eos": True}}
    outcomes: list[object] = []
    started = [threading.Event() for _ in range(3)]

    def stream(first: threading.Event) -> None:
        try:
            kwargs = {"model": "lora", "prompt": PROMPTS[0], "temperature": 0, "stream": True, **long}
            for _ in api.completions.create(**kwargs):
                first.set()
            outcomes.append("finished")
        except openai.APIError as err:
            outcomes.append(err)
        finally:
            first.set()

    def whole() -> None:
        try:
            api.completions.create(model="lora", prompt=PROMPTS[1], temperature=0, **long)
            outcomes.append("finished")
        except openai.APIStatusError as err:
            outcomes.append(err)

    threads = [threading.Thread(target=whole)] + [threading.Thread(target=stream, args=(e,)) for e in started]
    for thread in threads:
        thread.start()
    for event in started:
        assert event.wait(60)
    os.kill(pid, signal.SIGKILL)
    for thread in threads:
        thread.join(60)
    assert not any(thread.is_alive() for thread in threads), "a request hung on the dead replica"
    failures = [outcome for outcome in outcomes if outcome != "finished"]
    assert failures, "the killed replica had requests in flight"
    for failure in failures:
        assert "replica" in str(failure), failure
    statuses = [f.status_code for f in failures if isinstance(f, openai.APIStatusError)]
    assert all(status == 503 for status in statuses), statuses

    # Later requests succeed at once (on the other replica), and Ray starts a new replica.
    assert _complete(api, "lora", PROMPTS[1], False)[0] == _peft_text(folders["lora"], PROMPTS[1])

    def replaced() -> bool:
        replicas = _per_replica(cluster, "adapterhub_replica_info")
        return len(replicas) == 2 and victim not in replicas

    _wait_for(replaced, timeout=180)
    with ThreadPoolExecutor(4) as pool:
        texts = list(pool.map(lambda name: _complete(api, name, PROMPTS[0], False)[0], FAMILIES))
    assert texts == [_peft_text(folders[name], PROMPTS[0]) for name in FAMILIES]
