"""``adapterhub bench http``: what the HTTP layer costs over calling the engine directly.

The same requests (random prompts, adapters of all five families round-robin plus the base)
run twice at the same concurrency: once as ``engine.generate`` calls from worker threads, once
as HTTP completions from as many clients against a real uvicorn server on 127.0.0.1.
Every request generates exactly ``--new-tokens`` (EOS is ignored), so token counts match.
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
from adapterhub.runtime.engine import Engine
from adapterhub.server.app import create_app
from adapterhub.server.background import serve_in_background

ADAPTER_RANK = 8


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
            if chunk["choices"] and chunk["choices"][0]["text"]:
                first_token = first_token or time.perf_counter() - started
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return time.perf_counter() - started, first_token, tokens


def _percentile_ms(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return round(1000 * ordered[min(len(ordered) - 1, int(fraction * len(ordered)))], 2)


def engine_phase(
    engine: Engine, jobs: list[tuple[list[int], str | None]], params: SamplingParams, concurrency: int
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
) -> dict:
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
        bodies = [
            {
                "model": name or engine.base_name,
                "prompt": prompt,
                "max_tokens": new_tokens,
                "temperature": 0,
                "stream": stream,
                "stream_options": {"include_usage": True} if stream else None,
            }
            for prompt, name in jobs
        ]
        engine.start()
        try:
            progress("warming up")
            engine_phase(engine, jobs[: len(names)], params, concurrency)
            progress(f"engine: {requests} requests from {concurrency} threads")
            engine_s, engine_tokens = engine_phase(engine, jobs, params, concurrency)
            progress(f"http: {requests} requests from {concurrency} clients")
            with serve_in_background(create_app(engine, max_queue=requests)) as url:
                http_s, timings = http_phase(url, bodies, concurrency)
        finally:
            engine.stop()
    latencies = [latency for latency, _, _ in timings]
    first_tokens = [first for _, first, _ in timings if first is not None]
    http_tokens = sum(tokens for _, _, tokens in timings)
    result = {
        "engine_tok_s": round(engine_tokens / engine_s, 2),
        "http_tok_s": round(http_tokens / http_s, 2),
        "http_over_engine": round((http_tokens / http_s) / (engine_tokens / engine_s), 3),
        "http_requests_s": round(requests / http_s, 2),
        "http_latency_p50_ms": _percentile_ms(latencies, 0.5),
        "http_latency_p95_ms": _percentile_ms(latencies, 0.95),
        "http_latency_mean_ms": round(1000 * statistics.fmean(latencies), 2),
        "engine_tokens": engine_tokens,
        "http_tokens": http_tokens,
    }
    if first_tokens:
        result["http_ttft_p50_ms"] = _percentile_ms(first_tokens, 0.5)
        result["http_ttft_p95_ms"] = _percentile_ms(first_tokens, 0.95)
    return {
        **result,
        "device": engine.device,
        "device_name": torch.cuda.get_device_name() if engine.device.startswith("cuda") else "cpu",
        "base": base,
        "quantization": engine.quantization,
        "adapters": adapters,
        "requests": requests,
        "concurrency": concurrency,
        "prompt_len": prompt_len,
        "new_tokens": new_tokens,
        "stream": stream,
    }
