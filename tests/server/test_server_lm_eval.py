"""lm-evaluation-harness end to end: its ``local-completions`` model against a real ``adapterhub serve``
process, on the local tasks in ``lm_eval_tasks/`` (``dataset_path: json``), for a LoRA and a prefix
adapter. Every loglikelihood and every generation lm-eval records must be plain PEFT's for that
adapter alone (a fresh base each), and so must the accuracies it reports."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from adapterhub.runtime.random_adapters import peft_config, write_random_adapter
from tests.ports import free_port

TASKS = Path(__file__).parent / "lm_eval_tasks"
ADAPTERS = {"lora": ("lora", 3), "prefix": ("prefix_tuning", 4)}


@pytest.fixture(scope="module")
def served(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("lm-eval-adapters")
    folders = {}
    for name, (family, seed) in ADAPTERS.items():
        model = AutoModelForCausalLM.from_pretrained(tiny_llama)
        folders[name] = write_random_adapter(model, peft_config(family), root / name, seed=seed)
    port = free_port()
    specs = ",".join(f"{name}={folder}" for name, folder in folders.items())
    command = [
        sys.executable,
        "-m",
        "adapterhub",
        "serve",
        "--base",
        "builtin:tiny-llama",
        "--adapters",
        specs,
        "--served-model-name",
        "tiny",
    ]
    server = subprocess.Popen(
        [*command, "--port", str(port)],
        env=os.environ.copy(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, server.stdout.read().decode()
            assert time.monotonic() < deadline
            try:
                if httpx.get(f"{url}/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        cards = httpx.get(f"{url}/v1/models").json()["data"]
        assert [(card["id"], card["parent"]) for card in cards] == [
            ("tiny", None),
            ("lora", "tiny"),
            ("prefix", "tiny"),
        ]
        yield url, folders
    finally:
        server.terminate()
        server.wait(60)


def _peft(tiny_llama: Path, folder: Path):
    from peft import PeftModel

    base = AutoModelForCausalLM.from_pretrained(tiny_llama)  # a fresh base per PeftModel
    return PeftModel.from_pretrained(base, str(folder)).eval()


def _loglikelihood(model, tokenizer, context: str, continuation: str) -> float:
    """lm-eval's split: encode context + continuation whole, the context alone, no special tokens."""
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    start = len(tokenizer(context, add_special_tokens=False)["input_ids"])
    ids = torch.tensor([whole])
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0, -len(whole) :].float()
    logprobs = logits.log_softmax(-1)
    return sum(logprobs[t - 1, whole[t]].item() for t in range(start, len(whole)))


def _generate(model, tokenizer, prompt: str, max_new: int, stop: str) -> str:
    ids = torch.tensor([tokenizer(prompt, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new,
            do_sample=False,
            pad_token_id=0,
        )
    text = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    return text.split(stop)[0]


def _rows(name: str) -> list[dict]:
    return [json.loads(line) for line in (TASKS / name).read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.parametrize("adapter", list(ADAPTERS))
def test_lm_eval_scores_equal_peft_loglikelihoods_and_generations(
    served, tiny_llama: Path, adapter: str
) -> None:
    import lm_eval
    from lm_eval.tasks import TaskManager

    url, folders = served
    model_args = f"model={adapter},base_url={url}/v1/completions,num_concurrent=1,max_retries=1"
    tasks = TaskManager(include_path=str(TASKS), include_defaults=False)
    cwd = os.getcwd()
    os.chdir(TASKS)  # the task files name their data relative to themselves
    try:
        out = lm_eval.simple_evaluate(
            model="local-completions",
            model_args=model_args,
            tasks=["adapterhub_mc", "adapterhub_gen"],
            task_manager=tasks,
            log_samples=True,
        )
    finally:
        os.chdir(cwd)
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    peft = _peft(tiny_llama, folders[adapter])

    questions = _rows("mc.jsonl")
    samples = sorted(out["samples"]["adapterhub_mc"], key=lambda s: s["doc_id"])
    correct = []
    for doc, sample in zip(questions, samples, strict=True):
        want = [_loglikelihood(peft, tokenizer, doc["question"], " " + choice) for choice in doc["choices"]]
        got = [float(loglikelihood) for loglikelihood, _ in sample["filtered_resps"]]
        assert got == pytest.approx(want, abs=1e-4), doc["question"]
        correct.append(max(range(len(want)), key=want.__getitem__) == doc["answer"])
    assert out["results"]["adapterhub_mc"]["acc,none"] == pytest.approx(sum(correct) / len(correct))
    assert len(set(correct)) == 2  # the accuracy is neither 0 nor 1, so a wrong score would show

    prompts = _rows("gen.jsonl")
    generations = sorted(out["samples"]["adapterhub_gen"], key=lambda s: s["doc_id"])
    matches = []
    for doc, sample in zip(prompts, generations, strict=True):
        want = _generate(peft, tokenizer, doc["question"], 8, "\n")
        assert sample["filtered_resps"][0] == want, doc["question"]
        matches.append(want.strip() == doc["answer"])
    assert out["results"]["adapterhub_gen"]["exact_match,none"] == pytest.approx(sum(matches) / len(matches))
