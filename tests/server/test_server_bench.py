"""``adapterhub bench http`` runs on tiny shapes and reports what it measured (no timed asserts)."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from adapterhub.bench import bench_http
from adapterhub.runtime.engine import Engine, EngineConfig
from adapterhub.server.app import create_app
from adapterhub.server.background import serve_in_background

SHAPE = ["--requests", "12", "--concurrency", "4", "--prompt-len", "8", "--new-tokens", "3"]
SCHEMA = {"type": "array", "items": {"type": "string"}}


def test_http_bench_reports_plain_logprobs_and_constrained_runs(tmp_path: Path) -> None:
    schema = tmp_path / "strings.json"
    schema.write_text(json.dumps(SCHEMA))
    args = [*SHAPE, "--adapters", "5", "--logprobs", "--json-schema", str(schema), "--json"]
    run = CliRunner().invoke(bench_http, args, catch_exceptions=False)
    result = json.loads(run.stdout)
    assert result["engine_tokens"] == result["http_tokens"] == result["logprobs_tokens"] == 12 * 3
    assert 0 < result["json_schema_tokens"] <= 12 * 3
    assert result["phases"] == ["plain", "logprobs", "json_schema"]
    assert result["http_tok_s"] > 0 and result["http_ttft_p50_ms"] <= result["http_latency_p95_ms"]
    for name in ("logprobs", "json_schema"):
        assert result[f"{name}_over_plain"] == result[f"{name}_over_plain_each"][0] > 0


def test_http_bench_drives_another_server_by_url() -> None:
    engine = Engine(EngineConfig(base="builtin:tiny-llama", max_batch_size=4))
    engine.start()
    try:
        with serve_in_background(create_app(engine, served_model_name="other")) as url:
            run = CliRunner().invoke(bench_http, [*SHAPE, "--url", f"{url}/v1", "--no-stream", "--json"])
    finally:
        engine.stop()
    result = json.loads(run.stdout)
    assert result["models"] == ["other"] and result["http_tokens"] == 12 * 3
    assert "engine_tok_s" not in result
    refused = CliRunner().invoke(bench_http, [*SHAPE, "--models", "a"])
    assert refused.exit_code != 0 and "--url" in refused.output
