"""Adapters with distinct random, non-trivial weights, written by plain PEFT ``save_pretrained``.

PEFT initialises LoRA B to zero and IA3 to ones, which would make a row served the wrong adapter
indistinguishable; tests and the serving benchmark perturb every trainable tensor instead.
"""

from __future__ import annotations

from pathlib import Path

import torch
from peft import (
    IA3Config,
    LoraConfig,
    PeftConfig,
    PrefixTuningConfig,
    PromptEncoderConfig,
    PromptTuningConfig,
    get_peft_model,
)
from torch import nn

from adapterhub.models import unwrap_peft
from adapterhub.paths import atomic_dir

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def peft_config(
    family: str,
    *,
    rank: int = 8,
    num_virtual_tokens: int = 4,
    rslora: bool = False,
    target_modules: list[str] | None = None,
    task_type: str = "CAUSAL_LM",
    llama_targets: bool = True,
    **lora_options,
) -> PeftConfig:
    """A PEFT config of one family. LoRA and IA3 target every projection of a Llama-family layer, or
    with ``llama_targets=False`` PEFT's own defaults for the base's architecture (MT5, GPT-2, ...).

    ``lora_options`` go to ``LoraConfig`` as they are (``use_dora``, ``lora_bias``,
    ``trainable_token_indices``, ...).
    """
    if family == "lora":
        targets = target_modules or (list(PROJECTIONS) if llama_targets else None)
        return LoraConfig(
            task_type=task_type,
            r=rank,
            lora_alpha=2 * rank,
            target_modules=targets,
            use_rslora=rslora,
            lora_dropout=0.0,
            **lora_options,
        )
    if family == "ia3":
        if not llama_targets:
            return IA3Config(task_type=task_type)
        return IA3Config(
            task_type=task_type,
            target_modules=["k_proj", "v_proj", "down_proj", "up_proj"],
            feedforward_modules=["down_proj"],
        )
    if family == "prompt_tuning":
        return PromptTuningConfig(task_type=task_type, num_virtual_tokens=num_virtual_tokens)
    if family == "p_tuning":
        return PromptEncoderConfig(
            task_type=task_type, num_virtual_tokens=num_virtual_tokens, encoder_hidden_size=64
        )
    if family == "prefix_tuning":
        return PrefixTuningConfig(task_type=task_type, num_virtual_tokens=num_virtual_tokens)
    raise ValueError(f"unknown PEFT family {family}")


def write_random_adapter(model: nn.Module, config: PeftConfig, folder: Path, seed: int) -> Path:
    """Wrap ``model`` with ``config``, give every adapter tensor seeded random values, save, unwrap.

    LoRA and IA3 layers are removed again, so ``model`` can be reused afterwards.
    """
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if not param.requires_grad:
                continue
            noise = torch.randn(param.shape, generator=generator).to(param.device, param.dtype)
            if "ia3_l" in name:
                param.copy_(1.0 + 0.5 * noise)
            elif "lora_" in name:
                param.copy_(0.2 * noise)
            else:
                param.copy_(noise)
    with atomic_dir(Path(folder)) as tmp:
        peft_model.save_pretrained(tmp)
    unwrap_peft(model)
    return Path(folder)
