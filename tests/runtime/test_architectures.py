"""Every supported Llama-family architecture serves mixed batches exactly (Qwen2 biases, Qwen3 q/k norms)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoConfig, AutoModelForCausalLM

from adapterhub.models import ModelSpec, load_model
from adapterhub.runtime.api import GenerationRequest, SamplingParams
from adapterhub.runtime.engine import Engine, EngineConfig
from adapterhub.runtime.random_adapters import peft_config, write_random_adapter
from adapterhub.tiny import build_tokenizer, tiny_config

PROMPT_IDS = [[5, 70, 81, 99, 120, 7], [9, 44]]
SHAPE_KEYS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "vocab_size",
    "max_position_embeddings",
    "pad_token_id",
    "bos_token_id",
    "eos_token_id",
)
FAMILIES = {"lora": "lora", "ia3": "ia3", "prefix": "prefix_tuning", "prompt": "prompt_tuning"}


def _tiny_base(tmp_path: Path, model_type: str) -> Path:
    # The builtin tiny Llama's shapes, in another architecture.
    llama = tiny_config("llama").to_dict()
    shared = {key: llama[key] for key in SHAPE_KEYS}
    config = AutoConfig.for_model(model_type, head_dim=16, tie_word_embeddings=False, **shared)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    if model_type == "qwen2":  # give the q/k/v biases values that matter
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith("bias"):
                    param.normal_(0, 0.5)
    folder = tmp_path / model_type
    model.save_pretrained(folder)
    build_tokenizer().save_pretrained(folder)
    return folder


@pytest.mark.parametrize("model_type", ["mistral", "qwen2", "qwen3"])
def test_mixed_batch_matches_peft_on_each_architecture(tmp_path: Path, model_type: str) -> None:
    base = _tiny_base(tmp_path, model_type)
    folders = {
        name: write_random_adapter(
            load_model(ModelSpec(str(base), device="cpu")), peft_config(family), tmp_path / name, seed=i
        )
        for i, (name, family) in enumerate(FAMILIES.items(), start=1)
    }
    engine = Engine(EngineConfig(base=str(base), quantization="none", device="cpu", max_lora_rank=8))
    for name, folder in folders.items():
        engine.register(name, str(folder))
    rows = [(name, ids) for name in [None, *FAMILIES] for ids in PROMPT_IDS]
    params = SamplingParams(max_tokens=6)
    handles = [engine.submit(GenerationRequest(ids, adapter=name, params=params)) for name, ids in rows]
    engine.start()
    try:
        results = [handle.result(timeout=120).token_ids for handle in handles]
    finally:
        engine.stop()
    for (name, ids), got in zip(rows, results, strict=True):
        model = load_model(ModelSpec(str(base), device="cpu"))
        if name is not None:
            model = PeftModel.from_pretrained(model, str(folders[name]))
        prompt = torch.tensor([ids])
        with torch.no_grad():
            out = model.generate(
                input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6, do_sample=False
            )
        assert got == out[0, len(ids) :].tolist(), (model_type, name, ids)
