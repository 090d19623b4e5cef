"""The serving benchmark runs end to end on CPU with tiny shapes and reports every documented key."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from adapterhub.bench import bench_serve
from adapterhub.runtime.api import FAMILIES

KEYS = (
    "base_tok_s",
    "one_adapter_tok_s",
    "mixed_tok_s",
    "mixed_over_base",
    "one_adapter_over_base",
    "peft_tok_s",
    "speedup_vs_peft",
    "adapter_load_ms",
    "adapter_swap_ms",
    "transformers_base_tok_s",
)


def phases_with_detail(stderr: str) -> list[str]:
    """Each phase line less the seconds it started at: ``name (detail) (3 s)`` -> ``name (detail)``."""
    return [line.rsplit(" (", 1)[0] for line in stderr.splitlines() if line.endswith(" s)")]


# nf4 matters: PEFT cannot unload IA3 from a 4-bit base, which the benchmark must work around.
@pytest.mark.parametrize("quantization", ["none", "nf4"])
def test_bench_serve_prints_json_with_all_metrics(tiny_llama, quantization: str) -> None:
    args = (
        f"--device cpu --adapters 6 --batch 3 --prompt-len 16 --new-tokens 4 --quantize {quantization} "
        "--repeats 2 --json"
    )
    outcome = CliRunner().invoke(bench_serve, [*args.split(), "--json"])
    assert outcome.exit_code == 0, outcome.output
    result = json.loads(outcome.stdout)
    assert all(result[key] > 0 for key in KEYS)
    assert set(result["families"].values()) == set(FAMILIES)
    assert (result["batch"], result["new_tokens"], result["quantization"]) == (3, 4, quantization)
    assert result["repeats"] == 2
    for phase in ("one_adapter", "mixed"):
        rounds = result[f"{phase}_over_base_rounds"]
        assert len(rounds) == 2 and result[f"{phase}_over_base"] == pytest.approx(sum(rounds) / 2, abs=1e-3)
    # Not a terminal here: each phase is a line on stderr as it starts, stdout stays pure JSON.
    phases = [line.split(" (")[0] for line in outcome.stderr.splitlines()]
    assert phases[0] == "bench serve: loading builtin:tiny-llama"
    assert "bench serve: engine: mixed" in phases and "bench serve: adapter load and swap" in phases
    assert "bench serve: engine: mixed (round 2 of 2)" in phases_with_detail(outcome.stderr)


def test_bench_serve_many_adapters_pairs_each_batch_with_a_base_batch(tiny_llama) -> None:
    args = (
        "--device cpu --distinct 3 --registered 7 --slots 4 --rounds 2 --repeats 2 --batch 3 --new-tokens 2"
    )
    outcome = CliRunner().invoke(bench_serve, [*args.split(), "--rank", "4", "--json"])
    assert outcome.exit_code == 0, outcome.output
    result = json.loads(outcome.stdout)
    assert result["base_tok_s"] > 0 and result["many_tok_s"] > 0 and result["many_over_base"] > 0
    assert (result["registered"], result["slots"], result["rounds"], result["repeats"]) == (7, 4, 2, 2)
    assert result["adapter_loads"] >= 0 and result["cpu_tier_mib"] > 0
    assert "bench serve (many adapters): engine: round 2 of 2 (pass 2 of 2)" in phases_with_detail(
        outcome.stderr
    )


def test_bench_serve_refuses_too_few_adapters_for_five_families() -> None:
    outcome = CliRunner().invoke(bench_serve, ["--adapters", "3", "--json"])
    assert outcome.exit_code != 0
    assert "all five families" in str(outcome.exception)


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["--registered", "100"], "--registered is for the many-adapter bench"),
        (["--skew", "zipf"], "--skew is for the many-adapter bench"),
        (["--distinct", "4", "--adapters", "8"], "--adapters sizes the families bench"),
    ],
)
def test_bench_serve_refuses_an_option_its_mode_would_not_use(args: list[str], named: str) -> None:
    outcome = CliRunner().invoke(bench_serve, [*args, "--json"])
    assert outcome.exit_code == 2 and named in outcome.output, outcome.output


def test_bench_http_against_a_url_refuses_the_local_engine_options() -> None:
    from adapterhub.bench import bench_http

    outcome = CliRunner().invoke(bench_http, ["--url", "http://127.0.0.1:9", "--quantize", "nf4"])
    assert outcome.exit_code == 2 and "--quantize sets up a local engine" in outcome.output, outcome.output
