"""``adapterhub bench http``: what the HTTP layer, logprobs and constrained decoding cost.

The same requests (random token-id prompts, the base and adapters of all five families
round-robin) run at the same concurrency: as ``engine.generate`` calls from worker threads, then as
HTTP completions from as many clients against a real uvicorn server on 127.0.0.1 — plain, with
``logprobs`` (``--logprobs``) and constrained by a JSON schema (``--json-schema FILE``), each
reported as a ratio to the plain HTTP run of the same invocation. Every unconstrained request
generates exactly ``--new-tokens`` (``ignore_eos``); a constrained one ends when its schema is
complete, so its phase reports its own token count.

``--url URL`` drives any OpenAI-compatible server instead (vLLM, or another adapterhub) with the
same workload: prompts drawn from ``--base``'s vocabulary, the models that server lists (or
``--models``), the same lengths and concurrency. The engine phase is then skipped.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import torch

from adapterhub.runtime.api import GenerationRequest, SamplingParams
from adapterhub.runtime.bench import bench_engine, random_prompts, register_random_adapters
from adapterhub.runtime.serving import ServingEngine
from adapterhub.runtime.threads import engine_computes
from adapterhub.server.app import create_app
from adapterhub.server.background import serve_in_background

ADAPTER_RANK = 8
TOP_LOGPROBS = 5  # OpenAI's largest for completions


def http_request(http: httpx.Client, url: str, body: dict) -> tuple[float, float | None, int]:
    """(latency s, time to first token s when streaming, completion tokens) of one completion."""
    started = time.perf_counter()
    if not body["stream"]:
        response = http.post(f"{url}/v1/completions", json=body)
        response.raise_for_status()
        return time.perf_counter() - started, None, response.json()["usage"]["completion_tokens"]
    first_token, tokens = None, 0
    with http.stream("POST", f"{url}/v1/completions", json=body) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line.removeprefix("data: "))
            if "error" in chunk:
                raise RuntimeError(f"the server failed a request: {chunk['error']['message']}")
            if chunk["choices"] and chunk["choices"][0]["text"]:
                first_token = first_token or time.perf_counter() - started
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return time.perf_counter() - started, first_token, tokens


def _percentile_ms(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return round(1000 * ordered[min(len(ordered) - 1, int(fraction * len(ordered)))], 2)


def engine_phase(
    engine: ServingEngine, jobs: list[tuple[list[int], str | None]], params: SamplingParams, concurrency: int
) -> tuple[float, int]:
    """(seconds, tokens) with ``concurrency`` threads calling ``engine.generate``."""
    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(lambda job: engine.generate(GenerationRequest(job[0], job[1], params)), jobs))
    return time.perf_counter() - started, sum(r.completion_tokens for r in results)


def http_phase(
    url: str, bodies: list[dict], concurrency: int
) -> tuple[float, list[tuple[float, float | None, int]]]:
    """(seconds, per-request timings) with ``concurrency`` clients, each its own connection pool."""
    clients = [httpx.Client(timeout=600) for _ in range(concurrency)]
    try:
        started = time.perf_counter()
        with ThreadPoolExecutor(concurrency) as pool:
            timings = list(
                pool.map(lambda i: http_request(clients[i % concurrency], url, bodies[i]), range(len(bodies)))
            )
        return time.perf_counter() - started, timings
    finally:
        for client in clients:
            client.close()


def workload_bodies(
    jobs: list[tuple[list[int], str]], new_tokens: int, stream: bool, extra: dict
) -> list[dict]:
    return [
        {
            "model": model,
            "prompt": prompt,
            "max_tokens": new_tokens,
            "temperature": 0,
            "stream": stream,
            **({"stream_options": {"include_usage": True}} if stream else {}),
            **extra,
        }
        for prompt, model in jobs
    ]


def phase_variants(logprobs: bool, json_schema: Path | None) -> dict[str, dict]:
    """The HTTP phases to run, by name, as extra request fields; ``plain`` first, always."""
    variants: dict[str, dict] = {"plain": {"ignore_eos": True}}
    if logprobs:
        variants["logprobs"] = {"ignore_eos": True, "logprobs": TOP_LOGPROBS}
    if json_schema is not None:
        schema = json.loads(json_schema.read_text())
        response_format = {"type": "json_schema", "json_schema": {"name": json_schema.stem, "schema": schema}}
        variants["json_schema"] = {"response_format": response_format}
    return variants


def http_phases(
    url: str,
    jobs: list[tuple[list[int], str]],
    *,
    new_tokens: int,
    stream: bool,
    concurrency: int,
    variants: dict[str, dict],
    repeats: int,
    progress: Callable[[str], None],
) -> dict:
    """Run every variant over HTTP (after one untimed warm-up round of each), ``repeats`` rounds of
    all of them in turn, and report each one's median throughput, its latencies over all rounds,
    and its ratio to the plain run (median over rounds; every round's ratio is listed too)."""
    bodies = {name: workload_bodies(jobs, new_tokens, stream, extra) for name, extra in variants.items()}
    for name, batch in bodies.items():
        progress(f"http {name}: warming up")
        http_phase(url, batch[:concurrency], concurrency)
    rates: dict[str, list[float]] = {name: [] for name in variants}
    timings: dict[str, list[tuple[float, float | None, int]]] = {name: [] for name in variants}
    tokens: dict[str, int] = {}
    for round_ in range(repeats):
        for name, batch in bodies.items():
            progress(
                f"http {name} ({round_ + 1}/{repeats}): {len(batch)} requests from {concurrency} clients"
            )
            seconds, measured = http_phase(url, batch, concurrency)
            tokens[name] = sum(count for _, _, count in measured)
            rates[name].append(tokens[name] / seconds)
            timings[name] += measured
    result: dict = {}
    for name in variants:
        latencies = [latency for latency, _, _ in timings[name]]
        first_tokens = [first for _, first, _ in timings[name] if first is not None]
        prefix = "http" if name == "plain" else name
        result[f"{prefix}_tok_s"] = round(statistics.median(rates[name]), 2)
        result[f"{prefix}_tokens"] = tokens[name]
        result[f"{prefix}_requests_s"] = round(statistics.median(rates[name]) * len(jobs) / tokens[name], 2)
        result[f"{prefix}_latency_p50_ms"] = _percentile_ms(latencies, 0.5)
        result[f"{prefix}_latency_p95_ms"] = _percentile_ms(latencies, 0.95)
        if name == "plain":
            result["http_latency_mean_ms"] = round(1000 * statistics.fmean(latencies), 2)
        if first_tokens:
            result[f"{prefix}_ttft_p50_ms"] = _percentile_ms(first_tokens, 0.5)
            result[f"{prefix}_ttft_p95_ms"] = _percentile_ms(first_tokens, 0.95)
        if name != "plain":
            each = [rate / plain for rate, plain in zip(rates[name], rates["plain"], strict=True)]
            result[f"{name}_over_plain"] = round(statistics.median(each), 3)
            result[f"{name}_over_plain_each"] = [round(ratio, 3) for ratio in each]
    return result


def remote_models(url: str, models: str | None) -> list[str]:
    if models:
        return [name.strip() for name in models.split(",") if name.strip()]
    listed = httpx.get(f"{url}/v1/models", timeout=60)
    listed.raise_for_status()
    return [card["id"] for card in listed.json()["data"]]


def run_http_bench(
    *,
    device: str,
    base: str,
    quantize: str,
    adapters: int,
    requests: int,
    concurrency: int,
    prompt_len: int,
    new_tokens: int,
    stream: bool,
    progress: Callable[[str], None],
    logprobs: bool = False,
    json_schema: Path | None = None,
    url: str | None = None,
    models: str | None = None,
    repeats: int = 1,
) -> dict:
    variants = phase_variants(logprobs, json_schema)
    shape = {
        "base": base,
        "requests": requests,
        "concurrency": concurrency,
        "prompt_len": prompt_len,
        "new_tokens": new_tokens,
        "stream": stream,
        "phases": list(variants),
        "repeats": repeats,
    }
    if url is not None:
        from adapterhub.models import load_config

        url = url.rstrip("/").removesuffix("/v1")
        names = remote_models(url, models)
        generator = torch.Generator().manual_seed(0)
        vocab = load_config(base).vocab_size
        prompts = torch.randint(3, vocab, (requests, prompt_len), generator=generator).tolist()
        jobs = [(prompts[i], names[i % len(names)]) for i in range(requests)]
        measured = http_phases(
            url,
            jobs,
            new_tokens=new_tokens,
            stream=stream,
            concurrency=concurrency,
            variants=variants,
            repeats=repeats,
            progress=progress,
        )
        return {**measured, "url": url, "models": names, **shape}
    with engine_computes():  # the engine thread computes; set-up runs on short-lived threads
        progress(f"loading {base}")
        engine = bench_engine(
            base=base,
            quantize=quantize,
            device=device,
            adapters=adapters,
            batch=concurrency,
            prompt_len=prompt_len,
            new_tokens=new_tokens,
            rank=ADAPTER_RANK,
        )
        prompts = random_prompts(engine, requests, prompt_len)
        params = SamplingParams(max_tokens=new_tokens)
        with tempfile.TemporaryDirectory(prefix="adapterhub-bench-http-") as tmp:
            progress(f"writing {adapters} random adapters with PEFT")
            _, families = register_random_adapters(engine, adapters, Path(tmp), rank=ADAPTER_RANK)
            names = [None, *families]
            jobs = [(prompts[i], names[i % len(names)]) for i in range(requests)]
            engine.start()
            try:
                progress("warming up")
                engine_phase(engine, jobs[: len(names)], params, concurrency)
                progress(f"engine: {requests} requests from {concurrency} threads")
                engine_s, engine_tokens = engine_phase(engine, jobs, params, concurrency)
                app = create_app(engine, max_queue=requests)
                with serve_in_background(app) as local:
                    http_jobs = [(prompt, name or engine.base_name) for prompt, name in jobs]
                    measured = http_phases(
                        local,
                        http_jobs,
                        new_tokens=new_tokens,
                        stream=stream,
                        concurrency=concurrency,
                        variants=variants,
                        repeats=repeats,
                        progress=progress,
                    )
            finally:
                engine.stop()
    return {
        "engine_tok_s": round(engine_tokens / engine_s, 2),
        "http_over_engine": round(measured["http_tok_s"] / (engine_tokens / engine_s), 3),
        "engine_tokens": engine_tokens,
        **measured,
        "device": engine.device,
        "device_name": torch.cuda.get_device_name() if engine.device.startswith("cuda") else "cpu",
        "quantization": engine.quantization,
        "adapters": adapters,
        **shape,
    }
