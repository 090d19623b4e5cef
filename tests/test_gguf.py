"""GGUF bases: a tiny GGUF written here converts into exactly the model it was written from, and trains,
serves and merges with outputs equal to PEFT's on that converted base; bad files get one clear line."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from peft import PeftModel

from adapterhub import gguf
from adapterhub.errors import UserError
from adapterhub.hub.adapter import check_base_model
from adapterhub.merge import MergeRequest, merge
from adapterhub.models import ModelSpec, base_id, load_model, load_tokenizer, local_path
from adapterhub.runtime.api import GenerationRequest, SamplingParams
from adapterhub.server.launch import ServeOptions, build_engine, parse_adapter_specs
from tests.cli_runner import run_cli
from tests.tiny_gguf import write_tiny_gguf
from tests.train.helpers import recipe

PROMPTS = ("the food was", "a quick brown fox jumps over the lazy dog and then")
NEW_TOKENS = 6


@pytest.fixture(scope="module")
def tiny_gguf(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_gguf(tiny_llama, tmp_path_factory.mktemp("gguf") / "tiny.gguf")


@pytest.fixture(scope="module")
def trained(tiny_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A LoRA and a prompt-tuning adapter trained a few steps on the GGUF base."""
    from tests.train.helpers import quiet_train

    out = {}
    for method in (
        {"type": "lora", "r": 4, "target_modules": ["q_proj", "v_proj"]},
        {"type": "prompt_tuning"},
    ):
        folder = tmp_path_factory.mktemp(method["type"])
        run = recipe(
            folder,
            method,
            model={"name": str(tiny_gguf)},
            training={"max_steps": 8, "eval_max_samples": 8, "generation_eval": False},
        )
        out[method["type"]] = quiet_train(run).output_dir
    return out


def test_a_gguf_converts_once_into_the_model_and_tokenizer_it_was_written_from(
    tiny_gguf: Path, tiny_llama: Path
) -> None:
    digest = hashlib.sha256(tiny_gguf.read_bytes()).hexdigest()
    assert base_id(str(tiny_gguf)) == f"gguf:tiny.gguf@sha256:{digest}"
    folder = Path(local_path(str(tiny_gguf)))
    assert folder == gguf.cache_dir(digest)
    converted = load_model(ModelSpec(f"gguf:{tiny_gguf}", device="cpu"))
    reference = load_model(ModelSpec("builtin:tiny-llama", device="cpu"))
    assert converted.name_or_path == base_id(str(tiny_gguf))
    expected = reference.state_dict()
    assert converted.state_dict().keys() == expected.keys()
    assert all(torch.equal(tensor, expected[name]) for name, tensor in converted.state_dict().items())

    tokenizer, reference_tokenizer = load_tokenizer(str(tiny_gguf)), load_tokenizer("builtin:tiny-llama")
    for text in (*PROMPTS, "Mixed CASE, punctuation!\n  and spaces"):
        assert tokenizer(text).input_ids == reference_tokenizer(text).input_ids
    assert tokenizer.chat_template == reference_tokenizer.chat_template
    assert tokenizer.eos_token == reference_tokenizer.eos_token

    # Later loads read the cached folder; a renamed copy of the same file is the same base.
    weights = folder / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    copy = tiny_gguf.with_name("renamed.gguf")
    shutil.copy(tiny_gguf, copy)
    assert Path(local_path(str(copy))) == folder
    assert weights.stat().st_mtime_ns == stamp
    # A recorded source finds the cache without the file.
    assert Path(local_path(f"gguf:elsewhere/tiny.gguf@sha256:{digest}")) == folder


@pytest.mark.slow
def test_adapters_on_a_gguf_base_record_it_and_serve_exactly_as_peft(
    tiny_gguf: Path, trained: dict[str, Path]
) -> None:
    for folder in trained.values():
        config = json.loads((folder / "adapter_config.json").read_text())
        assert config["base_model_name_or_path"] == base_id(str(tiny_gguf))
    # No --base: serve takes the adapters' recorded GGUF source and finds its converted folder.
    specs = parse_adapter_specs(",".join(f"{name}={folder}" for name, folder in trained.items()))
    engine = build_engine(ServeOptions(adapters=specs, quantization="none", device="cpu", strict_base=True))
    assert engine.base_name == base_id(str(tiny_gguf))
    tokenizer = load_tokenizer(str(tiny_gguf))
    for name, folder in trained.items():
        # A fresh converted base per PeftModel, straight from the GGUF path.
        model = PeftModel.from_pretrained(load_model(ModelSpec(str(tiny_gguf), device="cpu")), str(folder))
        for prompt in PROMPTS:
            ids = tokenizer(prompt, return_tensors="pt").input_ids
            with torch.no_grad():
                expected = (
                    model.eval()
                    .generate(
                        input_ids=ids,
                        attention_mask=torch.ones_like(ids),
                        max_new_tokens=NEW_TOKENS,
                        do_sample=False,
                        pad_token_id=tokenizer.pad_token_id,
                    )[0, ids.shape[1] :]
                    .tolist()
                )
            served = engine.generate(
                GenerationRequest(prompt, name, SamplingParams(max_tokens=NEW_TOKENS))
            ).token_ids
            assert served == expected, (name, prompt)


@pytest.mark.slow
def test_merge_on_a_gguf_base_equals_peft(tiny_gguf: Path, trained: dict[str, Path], tmp_path: Path) -> None:
    plan = merge(MergeRequest(adapters=[str(trained["lora"])], out=tmp_path / "merged"))
    assert plan.base == base_id(str(tiny_gguf))
    merged = load_model(ModelSpec(str(tmp_path / "merged"), device="cpu")).eval()
    peft_model = PeftModel.from_pretrained(
        load_model(ModelSpec(str(tiny_gguf), device="cpu")), str(trained["lora"])
    ).eval()
    ids = load_tokenizer(str(tiny_gguf))(PROMPTS[1], return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, peft_model(ids).logits, atol=1e-5)


def test_a_changed_gguf_is_told_apart_by_its_hash(tiny_gguf: Path, tmp_path: Path) -> None:
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "base_model_name_or_path": base_id(str(tiny_gguf))})
    )
    check_base_model(adapter, str(tiny_gguf), strict=True)  # the same file: accepted
    changed = tmp_path / "tiny.gguf"
    changed.write_bytes(tiny_gguf.read_bytes()[:-4] + b"\0\0\0\1")
    with pytest.raises(UserError, match=r"sha256:[0-9a-f]{64}', not 'gguf:tiny.gguf@sha256:"):
        check_base_model(adapter, str(changed), strict=True)
    digest = hashlib.sha256(tiny_gguf.read_bytes()).hexdigest()
    with pytest.raises(UserError, match="not the recorded"):
        local_path(f"gguf:{changed}@sha256:{digest}")


@pytest.mark.slow
def test_bad_gguf_bases_get_one_line(tiny_llama: Path, tmp_path: Path) -> None:
    unsupported = write_tiny_gguf(tiny_llama, tmp_path / "odd.gguf", architecture="rwkv6")
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"not a gguf file at all")
    cases = {
        str(unsupported): "(rwkv6 architecture) cannot be loaded by transformers",
        str(garbage): "is not a readable GGUF file",
        str(tmp_path / "missing.gguf"): "not found: give the path of a .gguf file",
        f"gguf:gone.gguf@sha256:{'0' * 64}": "is not converted on this machine",
    }
    for name, message in cases.items():
        with pytest.raises(UserError, match=re.escape(message)) as caught:
            local_path(name)
        assert "\n" not in str(caught.value)
    assert not gguf.cache_dir(gguf.file_sha256(unsupported)).exists()
    # Through the CLI: one line, exit 1, no traceback.
    result = run_cli(["params", "recipes/quickstart.yaml", f"model.name={unsupported}"])
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and cases[str(unsupported)] in result.stderr, result.stderr
