"""Prometheus metrics of one server app, in a registry of its own so several apps can coexist.

Request counts, tokens and latencies are recorded by the app as requests finish; queue depth,
batch size and adapter loads/evictions are read from ``engine.stats()`` at scrape time.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
ENGINE_GAUGES = {
    "queue_depth": "Requests waiting for a batch slot.",
    "running": "Requests in the running batch.",
    "last_batch_size": "Rows in the engine's most recent decode step.",
}
ENGINE_COUNTERS = {
    "adapter_loads": "Adapters copied into a device slot.",
    "adapter_evictions": "Adapters evicted from a device slot to the CPU tier.",
}


class EngineStatsCollector(Collector):
    def __init__(self, engine: Any) -> None:
        self.engine = engine

    def collect(self) -> Iterator[Metric]:
        stats = self.engine.stats()
        for key, help_text in ENGINE_GAUGES.items():
            yield GaugeMetricFamily(f"adapterhub_engine_{key}", help_text, value=stats.get(key, 0))
        for key, help_text in ENGINE_COUNTERS.items():
            yield CounterMetricFamily(f"adapterhub_engine_{key}", help_text, value=stats.get(key, 0))
        yield GaugeMetricFamily(
            "adapterhub_engine_merged",
            "1 while an adapter is merged into the base.",
            value=int(bool(stats.get("merged"))),
        )


class ServerMetrics:
    """``served`` says whether a model name is served now: per-model series exist only for those, and
    an unloaded adapter's series go with it (clients choose adapter names; they must not pile up)."""

    def __init__(self, engine: Any, served: Callable[[str], bool] = lambda model: True) -> None:
        self.served = served
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "adapterhub_requests",
            "HTTP requests answered, by route and status code.",
            ["route", "status"],
            registry=self.registry,
        )
        self.prompt_tokens = Counter(
            "adapterhub_prompt_tokens", "Prompt tokens processed.", ["model"], registry=self.registry
        )
        self.completion_tokens = Counter(
            "adapterhub_completion_tokens", "Tokens generated.", ["model"], registry=self.registry
        )
        self.in_flight = Gauge(
            "adapterhub_in_flight_generations",
            "Generations submitted and not finished.",
            registry=self.registry,
        )
        self.latency = Histogram(
            "adapterhub_request_latency_seconds",
            "Time from request to last token.",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.first_token = Histogram(
            "adapterhub_time_to_first_token_seconds",
            "Time from request to first generated token.",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.registry.register(EngineStatsCollector(engine))

    def count_tokens(self, model: str, prompt_tokens: int, completion_tokens: int) -> None:
        if self.served(model):  # a request that outlived its adapter's unload leaves no series behind
            self.prompt_tokens.labels(model).inc(prompt_tokens)
            self.completion_tokens.labels(model).inc(completion_tokens)

    def forget(self, model: str) -> None:
        """Drop the series of a model that is no longer served."""
        for counter in (self.prompt_tokens, self.completion_tokens):
            with contextlib.suppress(KeyError):
                counter.remove(model)
