"""Building the PEFT model a recipe describes, on real weights, random weights or the meta device."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from peft import PeftModel, get_peft_model, prepare_model_for_kbit_training
from transformers import PreTrainedModel, set_seed

from adapterhub import methods
from adapterhub.methods.base import BuildContext
from adapterhub.models import (
    ModelSpec,
    auto_class,
    base_id,
    is_seq2seq,
    load_config,
    load_model,
    local_path,
    raw_config_dict,
    record_name,
    split_random,
)
from adapterhub.recipe import Recipe


@dataclass
class ParamCount:
    trainable: int
    total: int

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / self.total if self.total else 0.0


def build_context(recipe: Recipe, *, weights_available: bool) -> BuildContext:
    name, random_prefix = split_random(recipe.model.name)
    config = load_config(name)
    return BuildContext(
        task_type="SEQ_2_SEQ_LM" if is_seq2seq(config) else "CAUSAL_LM",
        base_model=base_id(name),
        tokenizer_path=local_path(name),
        weights_available=weights_available and not (recipe.model.random_init or random_prefix),
    )


def peft_config_for(recipe: Recipe, *, weights_available: bool = True):
    method = methods.get(recipe.method.type, recipe.source)
    return method.peft_config(
        recipe.method.params, build_context(recipe, weights_available=weights_available)
    )


def model_spec(recipe: Recipe, device: str = "auto") -> ModelSpec:
    model = recipe.model
    return ModelSpec(model.name, model.quantization, model.dtype, model.random_init, device)


def build_peft_model(recipe: Recipe, *, device: str = "auto") -> PeftModel:
    """Load the base as the recipe says, prepare it for k-bit training if quantized, and wrap it.

    Random weights and the adapter's initial values come from ``training.seed``, so a run repeats.
    """
    set_seed(recipe.training.seed)
    model = load_model(model_spec(recipe, device))
    if recipe.model.quantization != "none":
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=recipe.training.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    elif recipe.training.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    return get_peft_model(model, peft_config_for(recipe))


def count_parameters(model: torch.nn.Module, *, untied_lm_head: bool = False) -> ParamCount:
    """Trainable and total parameters; shared tensors count once, 4-bit weights by their logical size."""
    trainable = total = 0
    seen: set[int] = set()
    for param in model.parameters():
        if id(param) in seen:
            continue
        seen.add(id(param))
        numel = param.numel()
        if hasattr(param, "quant_state"):  # bitsandbytes packs two 4-bit values per byte
            numel = int(torch.Size(param.quant_state.shape).numel())
        total += numel
        trainable += numel if param.requires_grad else 0
    if untied_lm_head:
        total += model.get_output_embeddings().weight.numel()
    return ParamCount(trainable, total)


def checkpoint_unties_lm_head(model: PreTrainedModel, model_name: str) -> bool:
    """True when the checkpoint stores a separate lm_head that transformers ties to the embeddings.

    transformers 5.x forces ``tie_word_embeddings=True`` on MT5/T5 configs; mt0-large's checkpoint
    has its own lm_head, so counting the tied model would miss 256M parameters.
    """
    output, inputs = model.get_output_embeddings(), model.get_input_embeddings()
    shares_storage = output is not None and output.weight is inputs.weight
    return shares_storage and raw_config_dict(model_name).get("tie_word_embeddings") is False


def count_recipe_parameters(recipe: Recipe) -> ParamCount:
    """Count without loading weights: the model is built on the meta device from its config."""
    name, _ = split_random(recipe.model.name)
    config = load_config(name)
    with torch.device("meta"):
        model = auto_class(config).from_config(config)
    record_name(model, name)
    untied = checkpoint_unties_lm_head(model, name)
    peft_model = get_peft_model(model, peft_config_for(recipe, weights_available=False))
    return count_parameters(peft_model, untied_lm_head=untied)
