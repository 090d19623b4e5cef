"""``adapterhub bench http`` runs on tiny shapes and reports what it measured (no timed asserts)."""

from __future__ import annotations

import json

from click.testing import CliRunner

from adapterhub.bench import bench_http


def test_http_bench_prints_json_with_matching_token_counts() -> None:
    args = [
        "--requests",
        "12",
        "--concurrency",
        "4",
        "--adapters",
        "5",
        "--prompt-len",
        "8",
        "--new-tokens",
        "3",
    ]
    run = CliRunner().invoke(bench_http, [*args, "--json"], catch_exceptions=False)
    result = json.loads(run.stdout)
    assert result["engine_tokens"] == result["http_tokens"] == 12 * 3
    assert result["http_tok_s"] > 0 and result["http_ttft_p50_ms"] <= result["http_latency_p95_ms"]
