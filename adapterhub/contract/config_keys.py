"""Every ``adapter_config.json`` key of the five families, and what adapterhub does with it.

An allowlist: a key is either honoured with PEFT's own semantics (the module plan comes from PEFT
itself, see ``targets.py``) or refused when it holds a value the runtime would otherwise ignore. A key
this table does not know is refused unless it holds the installed PEFT's default for it, so a newer
PEFT's option can never be taken and silently dropped.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from adapterhub.runtime.api import RequestError

# The PEFT release whose config classes this table was written against, key by key; a test checks
# that every field of the installed PEFT's classes has a rule here.
WRITTEN_AGAINST_PEFT = "0.21.2"

# Returns why a value is refused, or None when it is honoured.
Rule = Callable[[Any, dict], str | None]


def honoured(value: Any, config: dict) -> str | None:
    return None


def off_only(fix: str) -> Rule:
    """The option changes the computation in a way the runtime does not implement: only its off value."""

    def rule(value: Any, config: dict) -> str | None:
        return None if value in (None, False, {}, [], "") else fix

    return rule


def _task_type(allowed: tuple[str | None, ...]) -> Rule:
    def rule(value: Any, config: dict) -> str | None:
        if value in allowed:
            return None
        names = " or ".join("null" if a is None else a for a in allowed)
        return f"the runtime serves {names} adapters of this family"

    return rule


# PEFT initialisations that only set the starting values of A and B, which the saved weights replace.
INIT_ONLY = (True, False, "gaussian", "eva", "orthogonal")
CONVERT_FIRST = (
    "PEFT rewrites the base weights when it loads such an adapter: convert it with "
    "save_pretrained(..., path_initial_model_for_weight_conversion=...) into a plain LoRA, then serve it"
)


def _init_lora_weights(value: Any, config: dict) -> str | None:
    if value in INIT_ONLY:
        return None
    if isinstance(value, str) and value.startswith(("pissa", "olora", "corda", "lora_ga")):
        return CONVERT_FIRST
    if value == "loftq":
        return "a LoftQ adapter belongs with the quantized residual base it was initialised from; merge it"
    return f"initialisation {value!r} changes the base weights at load time; retrain with the default"


MODULES_TO_SAVE = off_only(
    "the runtime keeps one copy of every base module and cannot swap whole modules per request: "
    "fold the adapter into a standalone model with `adapterhub merge`, or retrain without modules_to_save"
)

COMMON: dict[str, Rule] = {
    "peft_type": honoured,
    "auto_mapping": honoured,  # which PEFT class loads it: informational
    "peft_version": honoured,  # informational
    "base_model_name_or_path": honoured,  # compared with the served base separately
    "revision": honoured,  # the base model's revision: informational
    "inference_mode": honoured,  # the runtime always infers
    "modules_to_save": MODULES_TO_SAVE,
}

LORA: dict[str, Rule] = {
    **COMMON,
    "task_type": _task_type((None, "CAUSAL_LM", "SEQ_2_SEQ_LM")),  # checked against the base's kind
    # Which modules, at which rank and scaling, with DoRA and LoRA biases: read off PEFT's own layers.
    "r": honoured,
    "target_modules": honoured,
    "exclude_modules": honoured,
    "lora_alpha": honoured,
    "use_rslora": honoured,
    "layers_to_transform": honoured,
    "layers_pattern": honoured,
    "rank_pattern": honoured,
    "alpha_pattern": honoured,
    "use_dora": honoured,
    "lora_bias": honoured,
    "bias": honoured,
    "trainable_token_indices": honoured,
    "fan_in_fan_out": honoured,  # PEFT sets it False on nn.Linear; checked on the plan
    "lora_dropout": honoured,  # identity at inference
    "runtime_config": honoured,  # where DoRA's norm is computed, not what it is
    "qalora_group_size": honoured,  # only read when use_qalora is on
    "megatron_core": honoured,  # only read with a megatron_config
    "init_lora_weights": _init_lora_weights,
    # Initialisation inputs: without their init (refused above) they do nothing.
    "eva_config": honoured,
    "corda_config": honoured,
    "lora_ga_config": honoured,
    "loftq_config": off_only("LoftQ adapters are not served: merge it into its base"),
    "ensure_weight_tying": honoured,  # checked on the plan: refused where tied layers are adapted
    "megatron_config": off_only("Megatron-parallel LoRA layers are not served: save it as a plain LoRA"),
    "alora_invocation_tokens": off_only(
        "activated LoRA switches on after its invocation tokens, which the runtime does not do: "
        "serve it with plain PEFT"
    ),
    "layer_replication": off_only(
        "the adapter duplicates base layers, which the runtime does not: merge it with PEFT first"
    ),
    "use_qalora": off_only("QA-LoRA pools its inputs per group, which the runtime does not: merge it"),
    "target_parameters": off_only("LoRA on raw parameters (MoE experts) is not served"),
    "velora_config": off_only("the VeLoRA variant is not served: retrain as plain LoRA"),
    "monteclora_config": off_only("the MonteCLoRA variant is not served: retrain as plain LoRA"),
    "use_bdlora": off_only("the BD-LoRA variant is not served: retrain as plain LoRA"),
    "arrow_config": off_only("Arrow routing over several LoRAs is not served: serve the experts one by one"),
    "kasa_config": off_only("the KaSA variant is not served: retrain as plain LoRA"),
}

IA3: dict[str, Rule] = {
    **COMMON,
    "task_type": _task_type((None, "CAUSAL_LM", "SEQ_2_SEQ_LM")),
    "target_modules": honoured,
    "exclude_modules": honoured,
    "feedforward_modules": honoured,
    "fan_in_fan_out": honoured,
    "init_ia3_weights": honoured,  # the saved vectors replace the initial ones
}

# PEFT only prepends virtual tokens for a task model (PeftModelForCausalLM/Seq2SeqLM): with task_type
# null it loads a plain PeftModel that ignores them.
PROMPT_COMMON: dict[str, Rule] = {
    **COMMON,
    "task_type": _task_type(("CAUSAL_LM", "SEQ_2_SEQ_LM")),
    "num_virtual_tokens": honoured,  # checked against the saved embeddings
    "token_dim": honoured,  # checked against the base
    "num_transformer_submodules": honoured,  # checked: 1 for a decoder
    "num_attention_heads": honoured,
    "num_layers": honoured,  # checked against the base for prefix tuning
}

PROMPT_TUNING: dict[str, Rule] = {
    **PROMPT_COMMON,
    # How the embeddings started; the saved ones replace them.
    "prompt_tuning_init": honoured,
    "prompt_tuning_init_text": honoured,
    "tokenizer_name_or_path": honoured,
    "tokenizer_kwargs": honoured,
}

# PEFT saves P-tuning's encoder output and prefix tuning's projection, and uses them directly when it
# loads for inference, so the encoder settings describe training only.
P_TUNING: dict[str, Rule] = {
    **PROMPT_COMMON,
    "encoder_reparameterization_type": honoured,
    "encoder_hidden_size": honoured,
    "encoder_num_layers": honoured,
    "encoder_dropout": honoured,
}

PREFIX_TUNING: dict[str, Rule] = {
    **PROMPT_COMMON,
    "encoder_hidden_size": honoured,
    "prefix_projection": honoured,
    "init_weights": honoured,  # initial values, replaced by the saved ones
}

RULES: dict[str, dict[str, Rule]] = {
    "lora": LORA,
    "ia3": IA3,
    "prompt_tuning": PROMPT_TUNING,
    "p_tuning": P_TUNING,
    "prefix_tuning": PREFIX_TUNING,
}


def peft_config_class(method: str) -> type:
    from peft import IA3Config, LoraConfig, PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig

    return {
        "lora": LoraConfig,
        "ia3": IA3Config,
        "prompt_tuning": PromptTuningConfig,
        "p_tuning": PromptEncoderConfig,
        "prefix_tuning": PrefixTuningConfig,
    }[method]


def installed_defaults(method: str) -> dict[str, Any]:
    """The installed PEFT's default value of every field of the family's config class."""
    cls = peft_config_class(method)
    instance = cls()
    return {field.name: _plain(getattr(instance, field.name)) for field in dataclasses.fields(cls)}


def _plain(value: Any) -> Any:
    """A PEFT default as JSON would hold it (enums by value, dataclasses as dicts)."""
    if hasattr(value, "value") and not isinstance(value, (int, float, str)):
        return value.value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    return value


def check_keys(method: str, config: dict, where: str) -> None:
    """Refuse the first key whose value the runtime would not honour, naming it and the fix."""
    rules = RULES[method]
    defaults = None
    for key, value in config.items():
        rule = rules.get(key)
        if rule is not None:
            reason = rule(value, config)
        else:
            defaults = defaults if defaults is not None else installed_defaults(method)
            reason = (
                None
                if key in defaults and value == defaults[key]
                else "adapterhub does not know this option (written against PEFT "
                f"{WRITTEN_AGAINST_PEFT}), so it cannot honour it"
            )
        if reason is not None:
            raise RequestError(
                f"adapter {where}: {key}={_short(value)} is not served: {reason}", "unsupported_adapter"
            )


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
