"""The seed benchmark's own model family end to end: the five seed recipes train on the tiny MT5,
``adapterhub serve`` serves the five adapters together (PEFT fallback), concurrent completions
through the openai client equal plain PEFT's greedy output, and ``adapterhub chat`` answers."""

from __future__ import annotations

import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest
import torch
from peft import PeftModel
from scripted_engine import wait_until

from adapterhub.models import ModelSpec, load_model, load_tokenizer
from adapterhub.recipe import load_recipe
from tests.chat.harness import chat_terminal
from tests.chat.test_serve import answers_health
from tests.ports import free_port
from tests.train.helpers import REPO, quiet_train, write_seed_style_data

pytestmark = pytest.mark.slow

BASE = "builtin:tiny-mt5"
METHODS = ("lora", "prompt_tuning", "p_tuning", "prefix_tuning", "ia3")
TRAIN = [
    f"model.name={BASE}",
    "training.max_steps=3",
    "training.batch_size=4",
    "training.eval_max_samples=4",
    "training.optim=adamw_torch",
    "training.precision=fp32",
    "training.compile=false",  # the recipes compile for a GPU; the flow is the same without
]
PROMPTS = ("profits rose sharply this quarter", "the company cut its forecast", "sales were flat")


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("seed-flow")
    data = write_seed_style_data(root / "data.jsonl")
    folders = {}
    for method in METHODS:
        recipe = REPO / "recipes" / "seed" / f"{method}.yaml"
        out = root / method
        quiet_train(load_recipe(recipe, [*TRAIN, f"data.path={data}", f"output.dir={out}"]))
        folders[method] = out
    return folders


def _peft_greedy(folder: Path, prompt: str, new_tokens: int) -> str:
    tokenizer = load_tokenizer(BASE)
    model = PeftModel.from_pretrained(load_model(ModelSpec(BASE, device="cpu")), str(folder)).eval()
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens)
    return tokenizer.decode(out[0], skip_special_tokens=True)


def test_the_five_seed_adapters_served_together_equal_peft(trained: dict[str, Path]) -> None:
    port = free_port()
    specs = ",".join(f"{method}={folder}" for method, folder in trained.items())
    command = [sys.executable, "-m", "adapterhub", "serve", "--base", BASE, "--adapters", specs]
    server = subprocess.Popen(
        [*command, "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: server.poll() is not None or answers_health(url), timeout=180)
        assert server.poll() is None, server.stderr.read().decode()[-2000:]
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
        models = {model.id: model.metadata for model in client.models.list().data}
        assert models[BASE]["backend"] == "PEFT fallback: one adapter per batch"
        jobs = [(method, prompt) for method in METHODS for prompt in PROMPTS]

        def complete(job: tuple[str, str]) -> str:
            method, prompt = job
            reply = client.completions.create(model=method, prompt=prompt, max_tokens=4, temperature=0)
            return reply.choices[0].text

        with ThreadPoolExecutor(8) as pool:
            texts = list(pool.map(complete, jobs))
    finally:
        server.terminate()
        server.wait(30)
    for (method, prompt), text in zip(jobs, texts, strict=True):
        assert text == _peft_greedy(trained[method], prompt, 4), (method, prompt)


def test_chat_answers_with_a_seed_adapter(trained: dict[str, Path]) -> None:
    with chat_terminal("--base", BASE, "--adapter", str(trained["lora"]), "--max-tokens", "4") as chat:
        chat.prompt("lora")
        chat.say("profits rose sharply this quarter", r"lora \(lora\) · \d+ tokens")
        assert chat.close() == 0
