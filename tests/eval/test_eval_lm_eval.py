"""``adapterhub eval`` against lm-evaluation-harness itself: over a LoRA, a prefix adapter and the base
on the local tasks of ``tests/server/lm_eval_tasks`` (multiple choice, and generate_until scored by
exact match and chrF, which moves with every generated character), each adapter's scores must be
exactly what lm-eval's own ``hf`` model with ``peft=ADAPTER`` gives, and what ``local-completions``
gives against ``adapterhub serve``. Perplexities (loglikelihood_rolling) are sums of float32
logprobs, so they agree to float32 precision."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.cli_runner import run_cli
from tests.ports import free_port

TASKS = Path(__file__).resolve().parents[1] / "server" / "lm_eval_tasks"
TASK_NAMES = ["adapterhub_mc", "adapterhub_gen", "adapterhub_rolling"]
ADAPTERS = {"lora": ("lora", 3), "prefix": ("prefix_tuning", 4)}
METRICS = {
    "adapterhub_mc": ("acc", "acc_stderr"),
    "adapterhub_gen": ("exact_match", "chrf"),
    "adapterhub_rolling": ("word_perplexity", "bits_per_byte"),
}
ROLLING = "adapterhub_rolling"


@pytest.fixture(scope="module")
def adapters(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from transformers import AutoModelForCausalLM

    from adapterhub.runtime.random_adapters import peft_config, write_random_adapter

    root = tmp_path_factory.mktemp("eval-adapters")
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    return {
        name: write_random_adapter(model, peft_config(family), root / name, seed=seed)
        for name, (family, seed) in ADAPTERS.items()
    }


@pytest.fixture
def in_tasks_dir() -> Iterator[None]:
    cwd = os.getcwd()
    os.chdir(TASKS)  # the task files name their data relative to the working directory, as lm-eval reads
    try:
        yield
    finally:
        os.chdir(cwd)


def _lm_eval(model: str, model_args: str) -> dict[str, dict[str, float]]:
    import lm_eval
    from lm_eval.tasks import TaskManager

    out = lm_eval.simple_evaluate(
        model=model,
        model_args=model_args,
        tasks=TASK_NAMES,
        task_manager=TaskManager(include_path=str(TASKS), include_defaults=False),
        log_samples=False,
    )
    return {task: _metrics(task, out["results"][task]) for task in TASK_NAMES}


def _metrics(task: str, entry: dict) -> dict[str, float]:
    return {name: float(entry[f"{name},none"]) for name in METRICS[task]}


def _ours(report: dict, adapter: str) -> dict[str, dict[str, float]]:
    found = {}
    for task in TASK_NAMES:
        scores = report["results"][adapter][task]
        found[task] = {
            name: scores[name.removesuffix("_stderr")]["stderr" if name.endswith("_stderr") else "value"]
            for name in METRICS[task]
        }
    return found


@pytest.fixture(scope="module")
def served(adapters: dict[str, Path]) -> Iterator[str]:
    port = free_port()
    specs = ",".join(f"{name}={folder}" for name, folder in adapters.items())
    command = [sys.executable, "-m", "adapterhub", "serve", "--base", "builtin:tiny-llama"]
    command += ["--adapters", specs, "--served-model-name", "base", "--port", str(port)]
    server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, server.stdout.read().decode()
            assert time.monotonic() < deadline, "serve did not come up"
            try:
                if httpx.get(f"{url}/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        yield url
    finally:
        server.terminate()
        server.wait(60)


@pytest.mark.slow
def test_eval_equals_lm_eval_hf_with_peft_and_local_completions_against_serve(
    adapters: dict[str, Path], tiny_llama: Path, served: str, in_tasks_dir: None
) -> None:
    names = ["base", *(f"{name}={folder}" for name, folder in adapters.items())]
    result = run_cli(["eval", *names, "--tasks", "mc.yaml,gen.yaml,rolling.yaml", "--json"], cwd=TASKS)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)
    assert list(report["results"]) == ["base", "lora", "prefix"]

    for adapter in ["base", *ADAPTERS]:
        ours = _ours(report, adapter)
        peft = f",peft={adapters[adapter]}" if adapter != "base" else ""
        completions = f"model={adapter},base_url={served}/v1/completions,num_concurrent=1,max_retries=1"
        for reference in (
            ("hf", f"pretrained={tiny_llama},device=cpu{peft}"),
            ("local-completions", completions),
        ):
            theirs = _lm_eval(*reference)
            assert ours[ROLLING] == pytest.approx(theirs.pop(ROLLING), rel=1e-5), (adapter, reference)
            assert {task: ours[task] for task in theirs} == theirs, (adapter, reference)

    # The scores tell the models apart, so equal scores above are not equal by accident.
    assert len({report["results"][a]["adapterhub_gen"]["chrf"]["value"] for a in report["results"]}) == 3
    for adapter, folder in adapters.items():
        for task in TASK_NAMES:
            saved = json.loads((folder / "eval" / f"{task}.json").read_text())
            assert saved["task"] == task and saved["run"]["adapter"] == adapter
            assert saved["metrics"] == report["results"][adapter][task]
    assert report["saved"].keys() == {"lora", "prefix"}
