"""Every decoder family the fast runtime serves gives PEFT's outputs in one mixed batch of all five
adapter families and base rows: Mistral (sliding window), Qwen2 (biases), Qwen3 (q/k norms), Gemma
(scaled embeddings, (1 + w) norms), Gemma 2 (sandwich norms, softcaps, alternating windows), Gemma 3
(q/k norms, a rotary embedding per layer type) and Phi-3 (fused projections, partial rotary)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import IA3Config, LoraConfig, PeftModel
from transformers import AutoConfig, AutoModelForCausalLM

from adapterhub.models import ModelSpec, load_model
from adapterhub.runtime.api import GenerationRequest, SamplingParams
from adapterhub.runtime.engine import Engine, EngineConfig
from adapterhub.runtime.random_adapters import peft_config, write_random_adapter
from adapterhub.tiny import build_tokenizer, tiny_config

pytestmark = pytest.mark.slow

# The longest prompt runs past the sliding windows below (4 positions), prefix tokens included.
PROMPT_IDS = [[5, 70, 81, 99, 120, 7, 33, 61, 200, 14, 9], [9, 44]]
NEW_TOKENS = 6
LOGIT_TOLERANCE = 1e-4
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
# Small enough that the windows and caps change the outputs of a tiny random model.
ARCHITECTURES = {
    "mistral": dict(sliding_window=4),
    "qwen2": {},
    "qwen3": {},
    "gemma": {},
    "gemma2": dict(
        sliding_window=4, query_pre_attn_scalar=8, attn_logit_softcapping=1.5, final_logit_softcapping=2.0
    ),
    "gemma3_text": dict(
        sliding_window=4, layer_types=["sliding_attention", "full_attention"], query_pre_attn_scalar=12
    ),
    "phi3": dict(partial_rotary_factor=0.5),
}
FUSED = {"phi3": (["qkv_proj", "o_proj", "gate_up_proj", "down_proj"], ["gate_up_proj", "down_proj"])}


def _tiny_base(root: Path, model_type: str) -> Path:
    llama = tiny_config("llama").to_dict()
    shared = {key: llama[key] for key in SHAPE_KEYS}
    config = AutoConfig.for_model(
        model_type,
        head_dim=16,
        tie_word_embeddings=model_type.startswith("gemma"),
        **shared,
        **ARCHITECTURES[model_type],
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):  # give Qwen2's q/k/v biases values that matter
                param.normal_(0, 0.5)
            elif "norm" in name and model_type.startswith("gemma"):  # (1 + w) norms start at w = 0
                param.normal_(0, 0.3)
    folder = root / model_type
    model.save_pretrained(folder)
    build_tokenizer().save_pretrained(folder)
    return folder


def _configs(model_type: str) -> dict:
    if model_type not in FUSED:
        return {
            family: peft_config(family)
            for family in ("lora", "ia3", "prompt_tuning", "p_tuning", "prefix_tuning")
        }
    lora_targets, ia3_targets = FUSED[model_type]
    return {
        "lora": LoraConfig(
            task_type="CAUSAL_LM", r=8, lora_alpha=16, target_modules=lora_targets, use_dora=True
        ),
        "ia3": IA3Config(
            task_type="CAUSAL_LM", target_modules=ia3_targets, feedforward_modules=["down_proj"]
        ),
        **{family: peft_config(family) for family in ("prompt_tuning", "p_tuning", "prefix_tuning")},
    }


def _peft_reference(base: Path, folder: Path | None, ids: list[int], quantization: str):
    model = load_model(ModelSpec(str(base), quantization=quantization, device="cpu")).eval()
    if folder is not None:
        model = PeftModel.from_pretrained(model, str(folder)).eval()
    prompt = torch.tensor([ids])
    mask = torch.ones_like(prompt)
    with torch.no_grad():
        logits = model(input_ids=prompt, attention_mask=mask).logits[0, -1].float()
        out = model.generate(
            input_ids=prompt, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False
        )
    return out[0, len(ids) :].tolist(), logits


def _check(root: Path, model_type: str, quantization: str) -> None:
    base = _tiny_base(root, model_type)
    writer = load_model(ModelSpec(str(base), device="cpu"))
    folders = {
        family: write_random_adapter(writer, config, root / f"{model_type}-{family}", seed=i)
        for i, (family, config) in enumerate(_configs(model_type).items(), start=1)
    }
    engine = Engine(EngineConfig(base=str(base), quantization=quantization, device="cpu", max_lora_rank=8))
    for name, folder in folders.items():
        engine.register(name, str(folder))
    rows = [(name, ids) for name in [None, *folders] for ids in PROMPT_IDS]
    requests = [
        GenerationRequest(ids, adapter=name, params=SamplingParams(max_tokens=NEW_TOKENS))
        for name, ids in rows
    ]
    first_logits = engine.score(requests)
    handles = [engine.submit(request) for request in requests]
    engine.start()
    try:
        results = [handle.result(timeout=300).token_ids for handle in handles]
    finally:
        engine.stop()
    for (name, ids), got, logits in zip(rows, results, first_logits, strict=True):
        want, want_logits = _peft_reference(base, None if name is None else folders[name], ids, quantization)
        assert got == want, (model_type, name, ids)
        gap = (logits - want_logits).abs().max().item()
        assert gap <= LOGIT_TOLERANCE, (model_type, name, ids, gap)


@pytest.mark.parametrize("model_type", list(ARCHITECTURES))
def test_mixed_batch_matches_peft_on_each_architecture(tmp_path: Path, model_type: str) -> None:
    _check(tmp_path, model_type, "none")


@pytest.mark.parametrize("model_type", ["gemma2", "gemma3_text", "phi3"])
def test_mixed_batch_matches_peft_on_an_nf4_base(tmp_path: Path, model_type: str) -> None:
    _check(tmp_path, model_type, "nf4")
