"""Helpers shared by the runtime tests: the adapters under test, PEFT references, request builders.

Everything runs on the CPU in fp32 (or a quantized CPU base), whatever accelerator the machine has.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from adapterhub.models import ModelSpec, load_model, load_tokenizer
from adapterhub.runtime.api import GenerationRequest, SamplingParams
from adapterhub.runtime.engine import Engine, EngineConfig

BASE = "builtin:tiny-llama"
NEW_TOKENS = 8
PROMPTS = ("hello world how are", "the cat", "a quick brown fox jumps over the lazy dog and")
# Two LoRAs (one rsLoRA of another rank) so a row served the other LoRA's slot would show; and the
# LoRA options that add per-slot tables beyond A and B: DoRA, a bias on B, LoRA on the embedding and
# the output head with trainable tokens.
ADAPTERS = {
    "lora": dict(family="lora", rank=8),
    "lora_rs": dict(family="lora", rank=4, rslora=True),
    "dora": dict(family="lora", rank=4, use_dora=True),
    "lora_bias": dict(family="lora", rank=2, lora_bias=True, target_modules=["q_proj", "down_proj"]),
    "embed_head": dict(family="lora", rank=4, target_modules=["embed_tokens", "lm_head", "v_proj"]),
    "tokens": dict(family="lora", rank=4, target_modules=["o_proj"], trainable_token_indices=[5, 70, 120]),
    "ia3": dict(family="ia3"),
    "prompt": dict(family="prompt_tuning", num_virtual_tokens=4),
    "ptune": dict(family="p_tuning", num_virtual_tokens=5),
    "prefix": dict(family="prefix_tuning", num_virtual_tokens=3),
}


def make_engine(adapter_dirs: dict[str, Path], **overrides) -> Engine:
    settings = dict(
        base=BASE, quantization="none", device="cpu", max_adapters=12, max_lora_rank=16, max_batch_size=32
    )
    engine = Engine(EngineConfig(**(settings | overrides)))
    for name, folder in adapter_dirs.items():
        engine.register(name, str(folder))
    return engine


@functools.cache
def _peft_model(folder: str | None, quantization: str):
    from peft import PeftModel

    # A fresh base per PeftModel: two PeftModels around one base object silently give wrong outputs.
    base = load_model(ModelSpec(BASE, quantization=quantization, device="cpu"))
    return base.eval() if folder is None else PeftModel.from_pretrained(base, folder).eval()


@functools.cache
def peft_reference(
    folder: str | None, prompt: str, quantization: str = "none"
) -> tuple[list[int], torch.Tensor]:
    """PEFT's greedy tokens (``generate`` with batch size 1) and first-step logits for one adapter alone."""
    model = _peft_model(folder, quantization)
    ids = load_tokenizer(BASE)(prompt, return_tensors="pt")["input_ids"]
    mask = torch.ones_like(ids)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits[0, -1].float()
        out = model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0
        )
    return out[0, ids.shape[1] :].tolist(), logits


@functools.cache
def peft_teacher_forced(folder: str | None, ids: tuple[int, ...], quantization: str = "none") -> torch.Tensor:
    """PEFT's float logits at every position of ``ids`` for one adapter alone: row ``t`` predicts
    token ``t + 1`` (virtual-token positions dropped)."""
    model = _peft_model(folder, quantization)
    tensor = torch.tensor([ids])
    with torch.no_grad():
        logits = model(input_ids=tensor, attention_mask=torch.ones_like(tensor)).logits[0].float()
    return logits[-len(ids) :]


def greedy(
    prompt: str, adapter: str | None = None, max_tokens: int = NEW_TOKENS, **kwargs
) -> GenerationRequest:
    return GenerationRequest(prompt, adapter=adapter, params=SamplingParams(max_tokens=max_tokens), **kwargs)


def _accumulating_gemm(_out, x, tables, out_shape=None, **_options) -> int:
    """FLOPs of ``out += x @ tables``, 2-D or batched (shapes in, as the counter passes them)."""
    *batch, rows, inner = x
    return 2 * rows * inner * tables[-1] * (batch[0] if batch else 1)


def flop_counter() -> FlopCounterMode:
    """A FLOP counter that also counts the in-place GEMMs LoRA accumulates with (``addmm_``,
    ``baddbmm_``), which torch's counter has no formula for and would count as nothing."""
    in_place = {torch.ops.aten.addmm_: _accumulating_gemm, torch.ops.aten.baddbmm_: _accumulating_gemm}
    return FlopCounterMode(display=False, custom_mapping=in_place)
